//! The lean adjoint holds one step's graph at a time: its peak memory beyond the tensors it returns does not
//! grow with the trajectory's length. (Its own test binary: the allocator below counts every byte of the
//! process, so no other test may run beside it.)

use candle_core::{Device, Tensor};
use diffpref::methods::adjoint::lean_adjoint;
use diffpref::pipelines::loading::{LoadOptions, StableDiffusion};
use diffpref::rollout::{Conditioning, RolloutConfig, Sampler, StepRule};
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

/// Peak bytes allocated during the lean adjoint of a `steps`-step trajectory (random latents: the adjoint's
/// cost does not depend on where they came from) beyond what was in use before, and the bytes it returns.
fn adjoint_peak(model: &StableDiffusion, steps: usize) -> (usize, usize) {
    let rule = StepRule::new(
        model,
        &RolloutConfig {
            steps,
            guidance: 1.0,
            sampler: Sampler::Ddim,
            ..Default::default()
        },
    )
    .unwrap();
    let cond = Conditioning::new(model, &["a red square", "a blue circle"], 1.0, 64).unwrap();
    let mut rng = Rng::new(1);
    let shape = [2, model.unet.config().in_channels, 8, 8];
    let latents: Vec<Tensor> = (0..=steps)
        .map(|_| rng.normal_tensor(&shape, &Device::Cpu).unwrap())
        .collect();
    let terminal = rng.normal_tensor(&shape, &Device::Cpu).unwrap();
    let before = IN_USE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let lean = lean_adjoint(&model.unet, &rule, &latents, &cond, 1.0, terminal).unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    eprintln!("{steps} steps: peak {peak} B");
    let kept = (lean.adjoints.len() + lean.base_means.len()) * shape.iter().product::<usize>() * 4;
    (peak, kept)
}

#[test]
fn lean_adjoint_memory_does_not_grow_with_the_trajectory() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd");
    let model = StableDiffusion::load(&dir, &LoadOptions::default()).unwrap();
    adjoint_peak(&model, 2); // warm-up (lazily built kernels and caches)
    let (short, short_kept) = adjoint_peak(&model, 3);
    let (long, long_kept) = adjoint_peak(&model, 24);
    // One step's graph dominates; 8x the steps may add the returned tensors and a little slack, not 8 graphs.
    let one_graph = short.saturating_sub(short_kept);
    assert!(
        one_graph > 0,
        "short run allocated nothing beyond its output ({short} bytes)"
    );
    assert!(
        long <= short + (long_kept - short_kept) + one_graph / 2,
        "peak {long} B for 24 steps vs {short} B for 3 (outputs {long_kept} vs {short_kept} B)"
    );
}
