//! Gradient checkpointing (`gradient_checkpointing = true`): the same output, the same LoRA gradients up to the
//! order of floating-point additions, and a far lower peak of memory for the forward and backward pass. (Its
//! own test binary with a single test: the allocator below counts every byte of the process.)

use candle_core::{DType, Device, Tensor};
use diffpref::pipelines::autograd;
use diffpref::pipelines::models::unet::UNet2DConditionModel;
use diffpref::train::lora::{LoraConfig, LoraSet};
use diffpref::train::rng::Rng;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting the bytes in use and their peak.
struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded to the system allocator with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = IN_USE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

struct Pass {
    output: Vec<f32>,
    grads: Vec<(String, Vec<f32>)>,
    /// Peak bytes beyond those in use before the forward.
    peak: usize,
}

fn pass(unet: &UNet2DConditionModel, set: &LoraSet, checkpointing: bool) -> Pass {
    unet.set_gradient_checkpointing(checkpointing);
    let mut rng = Rng::new(3);
    let c = unet.config().in_channels;
    let x = rng.normal_tensor(&[2, c, 16, 16], &Device::Cpu).unwrap();
    let ctx = rng.normal_tensor(&[2, 5, 32], &Device::Cpu).unwrap();
    let w = rng.normal_tensor(&[2, c, 16, 16], &Device::Cpu).unwrap();
    let t = Tensor::new(&[10i64, 700], &Device::Cpu).unwrap();
    let before = IN_USE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let out = unet.forward(&x, &t, &ctx, None).unwrap();
    let loss = autograd::mul(&out, &w).unwrap().sum_all().unwrap();
    let store = autograd::backward(&loss).unwrap();
    let grads = set
        .vars()
        .into_iter()
        .map(|(name, v)| {
            let g = store
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient (checkpointing {checkpointing})"));
            (name, g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        })
        .collect();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    unet.set_gradient_checkpointing(false);
    Pass {
        output: out.flatten_all().unwrap().to_vec1().unwrap(),
        grads,
        peak,
    }
}

#[test]
fn gradient_checkpointing_keeps_gradients_and_lowers_the_peak() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd/unet");
    let unet = UNet2DConditionModel::load(dir, None, DType::F32, &Device::Cpu).unwrap();
    let targets = [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
    ];
    let cfg = LoraConfig {
        rank: 4,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
        init_seed: 5,
        ..Default::default()
    };
    let set = LoraSet::attach(&unet, &cfg, &Device::Cpu).unwrap();
    // Non-zero B, so every adapter (A included) gets a non-zero gradient.
    let mut rng = Rng::new(200);
    for (_, v) in set.vars() {
        let r = (rng.normal_tensor(v.dims(), &Device::Cpu).unwrap() * 0.1).unwrap();
        v.set(&r).unwrap();
    }
    pass(&unet, &set, false); // warm-up (lazily built kernels and caches)
    let plain = pass(&unet, &set, false);
    let ckpt = pass(&unet, &set, true);
    eprintln!("peak: plain {} B, checkpointed {} B", plain.peak, ckpt.peak);
    // The forward is the same computation.
    assert_eq!(plain.output, ckpt.output);
    // The gradients: the same sums in another order.
    assert_eq!(plain.grads.len(), ckpt.grads.len());
    for ((name, a), (_, b)) in plain.grads.iter().zip(&ckpt.grads) {
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.0, "{name}: zero gradient");
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff <= 1e-4 * scale,
            "{name}: checkpointed gradient differs by {diff} (max |g| {scale})"
        );
    }
    // Only the blocks' boundaries are kept through the forward; one block's graph is rebuilt at a time.
    assert!(
        ckpt.peak * 2 < plain.peak,
        "checkpointed peak {} B is not below half the plain pass's {} B",
        ckpt.peak,
        plain.peak
    );
}
