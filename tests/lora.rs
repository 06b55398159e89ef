//! LoRA adapters on the tiny test UNet: attach/enable, gradients, PEFT and kohya files, merging, the CLI.

use candle_core::{DType, Device, Tensor};
use diffpref::pipelines::models::unet::UNet2DConditionModel;
use diffpref::train::lora::{
    lora_specs, merge_into_unet_weights, LoadMode, LoraConfig, LoraFormat, LoraSet,
};
use diffpref::train::rng::Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn unet_dir() -> PathBuf {
    fixtures().join("tiny-sd/unet")
}

/// A float32 copy of the fixture's UNet folder under `dir` (the fixture may store float16; merging keeps the
/// stored dtype, and the exact merge checks need float32 weights).
fn unet_dir_f32(dir: &Path) -> PathBuf {
    let out = dir.join("unet32");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(unet_dir().join("config.json"), out.join("config.json")).unwrap();
    let (w, _) = read_file(&unet_dir().join("diffusion_pytorch_model.safetensors"));
    let w: HashMap<String, Tensor> = w
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap()))
        .collect();
    candle_core::safetensors::save(&w, out.join("diffusion_pytorch_model.safetensors")).unwrap();
    out
}

fn load_unet(dtype: DType) -> UNet2DConditionModel {
    UNet2DConditionModel::load(unet_dir(), None, dtype, &Device::Cpu).unwrap()
}

fn randn(seed: u64, shape: &[usize], std: f64) -> Tensor {
    (Rng::new(seed).normal_tensor(shape, &Device::Cpu).unwrap() * std).unwrap()
}

/// A fixed batch of two: latents, per-sample timesteps, text context.
fn inputs() -> (Tensor, Tensor, Tensor) {
    (
        randn(1, &[2, 4, 8, 8], 1.0),
        Tensor::new(&[10i64, 700], &Device::Cpu).unwrap(),
        randn(2, &[2, 5, 32], 1.0),
    )
}

fn fwd(unet: &UNet2DConditionModel) -> Tensor {
    let (x, t, c) = inputs();
    let x = x.to_dtype(unet.dtype()).unwrap();
    let c = c.to_dtype(unet.dtype()).unwrap();
    unet.forward(&x, &t, &c, None).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn all_targets() -> Vec<String> {
    [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn config(rank: usize, alpha: Option<f64>, targets: Vec<String>) -> LoraConfig {
    LoraConfig {
        rank,
        alpha,
        target_modules: targets,
        init_seed: 5,
        ..Default::default()
    }
}

/// Gives every B (and, with `also_a`, every A) random values.
fn randomize(set: &LoraSet, seed: u64, std: f64, also_a: bool) {
    for (i, (name, var)) in set.vars().iter().enumerate() {
        if name.ends_with("lora_B.weight") || also_a {
            var.set(&randn(seed + i as u64, var.dims(), std)).unwrap();
        }
    }
}

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

#[test]
fn zero_initialised_lora_leaves_the_unet_unchanged() {
    let unet = load_unet(DType::F32);
    let base = fwd(&unet);
    let set = LoraSet::attach(&unet, &config(4, None, all_targets()), &Device::Cpu).unwrap();
    // 2 attention blocks with attn1/attn2 in the down block, 1 mid, 3 up: 6 transformer blocks × 10 layers
    // (2 × 4 projections + 2 ff) plus proj_in/proj_out each.
    assert_eq!(set.len(), 6 * 12);
    assert!(set.is_trainable());
    assert_eq!(set.vars().len(), 2 * set.len());
    let n: usize = set.vars().iter().map(|(_, v)| v.elem_count()).sum();
    assert_eq!(set.num_params(), n);
    let first = &set.vars()[0];
    assert!(
        first.0.starts_with("unet.") && first.0.ends_with(".lora_A.weight"),
        "{}",
        first.0
    );
    // A is kaiming-uniform within ±1/√fan_in, B is zero.
    for ad in set.adapters() {
        let fan_in = ad.a().elem_count() / ad.rank();
        let bound = 1.0 / (fan_in as f32).sqrt();
        let amax = ad.a().abs().unwrap().max_all().unwrap();
        let amax = amax.to_scalar::<f32>().unwrap();
        assert!(
            amax > 0.5 * bound && amax <= bound,
            "{}: {amax} vs {bound}",
            ad.path()
        );
        let bmax = ad.b().abs().unwrap().max_all().unwrap();
        assert_eq!(bmax.to_scalar::<f32>().unwrap(), 0.0);
    }
    assert_eq!(max_diff(&fwd(&unet), &base), 0.0);
    // The 1×1 conv projections of SD1 get conv-shaped A/B.
    let proj = set
        .adapters()
        .iter()
        .find(|a| a.path().ends_with("proj_in"))
        .unwrap();
    assert_eq!(proj.a().dims(), &[4, 32, 1, 1]);
    assert_eq!(proj.b().dims(), &[32, 4, 1, 1]);
}

#[test]
fn nonzero_lora_changes_the_output_and_disabling_restores_the_base_exactly() {
    let unet = load_unet(DType::F32);
    let base = fwd(&unet);
    let set = LoraSet::attach(&unet, &config(4, Some(8.0), all_targets()), &Device::Cpu).unwrap();
    randomize(&set, 100, 0.2, false);
    let with = fwd(&unet);
    assert!(max_diff(&with, &base) > 1e-3, "LoRA had no effect");
    set.set_enabled(false);
    assert!(!set.is_enabled());
    assert_eq!(max_diff(&fwd(&unet), &base), 0.0);
    set.set_enabled(true);
    assert_eq!(max_diff(&fwd(&unet), &with), 0.0);
    set.detach_from(&unet);
    assert_eq!(max_diff(&fwd(&unet), &base), 0.0);
}

#[test]
fn every_lora_var_gets_a_gradient() {
    let unet = load_unet(DType::F32);
    let set = LoraSet::attach(&unet, &config(4, None, all_targets()), &Device::Cpu).unwrap();
    let w = randn(9, &[2, 4, 8, 8], 1.0);
    let grads = || {
        let loss = (fwd(&unet) * &w).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        set.vars()
            .into_iter()
            .map(|(name, v)| {
                let gv = g.get(v.as_tensor()).cloned();
                (name, gv)
            })
            .collect::<Vec<_>>()
    };
    let stats = |t: &Tensor| {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        (
            v.iter().all(|x| x.is_finite()),
            v.iter().fold(0f32, |m, x| m.max(x.abs())),
        )
    };
    // At init (B = 0): B gets a non-zero gradient, A's gradient is zero (it is multiplied by B), as in PEFT.
    for (name, g) in grads() {
        let (finite, max) = g.as_ref().map(stats).unwrap_or((true, 0.0));
        assert!(finite, "{name}: non-finite gradient");
        if name.ends_with("lora_B.weight") {
            assert!(max > 0.0, "{name}: zero gradient at init");
        } else {
            assert_eq!(max, 0.0, "{name}: A should get a zero gradient while B = 0");
        }
    }
    // Once B is non-zero every var gets a finite non-zero gradient.
    randomize(&set, 200, 0.1, false);
    for (name, g) in grads() {
        let g = g.unwrap_or_else(|| panic!("{name}: no gradient"));
        let (finite, max) = stats(&g);
        assert!(finite && max > 0.0, "{name}: gradient max {max}");
        assert_eq!(g.dtype(), DType::F32);
    }
}

#[test]
fn f32_master_weights_train_a_f16_unet() {
    // (candle's CPU matmul has no bf16; f16 exercises the same casts.)
    let unet = load_unet(DType::F16);
    let set = LoraSet::attach(&unet, &config(4, None, all_targets()), &Device::Cpu).unwrap();
    randomize(&set, 300, 0.1, false);
    let out = fwd(&unet);
    assert_eq!(out.dtype(), DType::F16);
    let loss = out
        .to_dtype(DType::F32)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    for (name, v) in set.vars() {
        assert_eq!(v.dtype(), DType::F32);
        let gv = g
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert_eq!(gv.dtype(), DType::F32, "{name}");
    }
}

#[test]
fn dropout_acts_only_in_training_mode() {
    let unet = load_unet(DType::F32);
    let cfg = LoraConfig {
        dropout: 0.5,
        ..config(4, None, all_targets())
    };
    let set = LoraSet::attach(&unet, &cfg, &Device::Cpu).unwrap();
    randomize(&set, 400, 0.3, false);
    assert!(set.is_training());
    let a = fwd(&unet);
    let b = fwd(&unet);
    assert!(
        max_diff(&a, &b) > 0.0,
        "dropout masks should differ between calls"
    );
    set.set_training(false);
    let c = fwd(&unet);
    assert_eq!(max_diff(&c, &fwd(&unet)), 0.0);
    set.set_dropout(0.0).unwrap();
    set.set_training(true);
    assert_eq!(max_diff(&c, &fwd(&unet)), 0.0);
    assert!(set.set_dropout(1.0).is_err());
}

#[test]
fn config_defaults_scaling_and_target_errors() {
    let d = LoraConfig::default();
    assert_eq!(d.rank, 8);
    assert_eq!(d.alpha(), 8.0);
    assert_eq!(d.scale(), 1.0);
    assert_eq!(d.target_modules, ["to_q", "to_k", "to_v", "to_out.0"]);
    let parsed: LoraConfig = serde_json::from_str(r#"{"rank": 16, "alpha": 4}"#).unwrap();
    assert_eq!(parsed.scale(), 0.25);
    assert_eq!(parsed.target_modules, d.target_modules);
    let rs = LoraConfig {
        rank: 16,
        alpha: Some(8.0),
        use_rslora: true,
        ..Default::default()
    };
    assert_eq!(rs.scale(), 2.0);
    // Suffixes match on module-path components only.
    assert!(d.matches("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"));
    assert!(!d.matches("down_blocks.0.attentions.0.transformer_blocks.0.attn1.xto_q"));
    let unet = load_unet(DType::F32);
    let e = err_text(LoraSet::attach(
        &unet,
        &config(4, None, vec!["q_proj".into(), "nope".into()]),
        &Device::Cpu,
    ));
    assert!(e.contains("q_proj") && e.contains("nope"), "{e}");
    // A longer suffix selects fewer layers.
    let set = LoraSet::attach(
        &unet,
        &config(2, None, vec!["attn2.to_k".into()]),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(set.len(), 6);
    assert!(set
        .adapters()
        .iter()
        .all(|a| a.path().ends_with("attn2.to_k")));
    let e = err_text(LoraSet::attach(
        &unet,
        &LoraConfig {
            rank: 0,
            ..Default::default()
        },
        &Device::Cpu,
    ));
    assert!(e.contains("rank"), "{e}");
}

fn read_file(path: &Path) -> (HashMap<String, Tensor>, HashMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap_or_default();
    (
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap(),
        meta,
    )
}

#[test]
fn peft_file_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("pytorch_lora_weights.safetensors");
    let unet = load_unet(DType::F32);
    let base = fwd(&unet);
    // alpha != rank: the scale (2) is folded into lora_B.
    let set = LoraSet::attach(&unet, &config(4, Some(8.0), all_targets()), &Device::Cpu).unwrap();
    randomize(&set, 500, 0.2, true);
    let with = fwd(&unet);
    set.save(&file, LoraFormat::Peft).unwrap();
    let saved_vars: Vec<(String, Tensor)> = set
        .vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().copy().unwrap()))
        .collect();
    set.detach_from(&unet);
    assert_eq!(max_diff(&fwd(&unet), &base), 0.0);

    // The layout diffusers' load_lora_weights reads, with B scaled and alpha/rank in the metadata.
    let (tensors, meta) = read_file(&file);
    assert_eq!(tensors.len(), 2 * set.len());
    let key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    assert_eq!(tensors[&format!("{key}.lora_A.weight")].dims(), &[4, 32]);
    let b_file = &tensors[&format!("{key}.lora_B.weight")];
    let b_var = &saved_vars
        .iter()
        .find(|(n, _)| n == &format!("{key}.lora_B.weight"))
        .unwrap()
        .1;
    assert_eq!(max_diff(b_file, &(b_var * 2.0).unwrap()), 0.0);
    assert_eq!(meta["lora_alpha"], "8");
    assert_eq!(meta["rank"], "4");
    assert_eq!(meta["lora_scale_folded"], "true");
    assert!(tensors.contains_key("unet.mid_block.attentions.0.proj_in.lora_A.weight"));
    assert_eq!(
        tensors["unet.mid_block.attentions.0.proj_in.lora_B.weight"].dims(),
        &[64, 4, 1, 1]
    );

    // Frozen (inference) load reproduces the output.
    let frozen = LoraSet::load_into(&unet, &file, 1.0).unwrap();
    assert!(!frozen.is_trainable() && frozen.vars().is_empty());
    assert!(max_diff(&fwd(&unet), &with) < 1e-5);
    frozen.detach_from(&unet);

    // Trainable load (resume) recovers alpha, the un-folded B and the output.
    let resumed = LoraSet::load(&unet, &file, LoadMode::Trainable).unwrap();
    assert_eq!(resumed.target_modules(), all_targets().as_slice());
    for ad in resumed.adapters() {
        assert_eq!((ad.rank(), ad.alpha(), ad.scale()), (4, 8.0, 2.0));
    }
    let vars = resumed.vars();
    assert_eq!(vars.len(), saved_vars.len());
    for ((n1, v1), (n2, v2)) in vars.iter().zip(&saved_vars) {
        assert_eq!(n1, n2);
        assert!(max_diff(v1.as_tensor(), v2) < 1e-6, "{n1}");
    }
    assert!(max_diff(&fwd(&unet), &with) < 1e-5);
    resumed.detach_from(&unet);

    // f16 files load too.
    let half = tmp.path().join("half.safetensors");
    let again = LoraSet::load(&unet, &file, LoadMode::Trainable).unwrap();
    again
        .save_with_dtype(&half, LoraFormat::Peft, DType::F16)
        .unwrap();
    again.detach_from(&unet);
    assert_eq!(
        read_file(&half).0[&format!("{key}.lora_A.weight")].dtype(),
        DType::F16
    );
    let h = LoraSet::load_into(&unet, &half, 1.0).unwrap();
    assert!(max_diff(&fwd(&unet), &with) < 1e-2);
    h.detach_from(&unet);
}

#[test]
fn kohya_file_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("kohya.safetensors");
    let unet = load_unet(DType::F32);
    let set = LoraSet::attach(&unet, &config(4, Some(2.0), all_targets()), &Device::Cpu).unwrap();
    randomize(&set, 600, 0.2, true);
    let with = fwd(&unet);
    set.save(&file, LoraFormat::Kohya).unwrap();
    let saved: Vec<Tensor> = set
        .vars()
        .iter()
        .map(|(_, v)| v.as_tensor().copy().unwrap())
        .collect();
    set.detach_from(&unet);

    let (tensors, meta) = read_file(&file);
    let key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj";
    assert_eq!(tensors[&format!("{key}.lora_down.weight")].dims(), &[4, 32]);
    assert_eq!(tensors[&format!("{key}.lora_up.weight")].dims(), &[256, 4]);
    let alpha = &tensors[&format!("{key}.alpha")];
    assert_eq!(alpha.dims(), &[] as &[usize]);
    assert_eq!(alpha.to_scalar::<f32>().unwrap(), 2.0);
    assert_eq!(meta["ss_network_dim"], "4");
    assert_eq!(tensors.len(), 3 * set.len());

    let frozen = LoraSet::load_into(&unet, &file, 1.0).unwrap();
    assert_eq!(max_diff(&fwd(&unet), &with), 0.0);
    frozen.detach_from(&unet);
    let resumed = LoraSet::load(&unet, &file, LoadMode::Trainable).unwrap();
    for ((n, v), s) in resumed.vars().iter().zip(&saved) {
        assert_eq!(max_diff(v.as_tensor(), s), 0.0, "{n}");
    }
    assert_eq!(max_diff(&fwd(&unet), &with), 0.0);
    resumed.detach_from(&unet);

    // rsLoRA: kohya stores alpha·√r so that alpha_k / r is the scale; resuming recovers alpha.
    let rs = LoraSet::attach(
        &unet,
        &LoraConfig {
            use_rslora: true,
            ..config(4, Some(3.0), vec!["to_v".into()])
        },
        &Device::Cpu,
    )
    .unwrap();
    randomize(&rs, 700, 0.2, false);
    let with_rs = fwd(&unet);
    let rs_file = tmp.path().join("rs.safetensors");
    rs.save(&rs_file, LoraFormat::Kohya).unwrap();
    rs.detach_from(&unet);
    let back = LoraSet::load(&unet, &rs_file, LoadMode::Trainable).unwrap();
    for ad in back.adapters() {
        assert!(ad.use_rslora());
        assert!((ad.alpha() - 3.0).abs() < 1e-5 && (ad.scale() - 1.5).abs() < 1e-6);
    }
    assert!(max_diff(&fwd(&unet), &with_rs) < 1e-5);
    back.detach_from(&unet);
}

#[test]
fn several_frozen_loras_stack_with_their_scales() {
    let tmp = tempfile::tempdir().unwrap();
    let unet = load_unet(DType::F32);
    let base = fwd(&unet);
    let a = LoraSet::attach(&unet, &config(2, None, vec!["to_q".into()]), &Device::Cpu).unwrap();
    randomize(&a, 800, 0.3, false);
    let fa = tmp.path().join("a.safetensors");
    a.save(&fa, LoraFormat::Peft).unwrap();
    a.detach_from(&unet);
    let b = LoraSet::attach(
        &unet,
        &config(3, None, vec!["to_q".into(), "ff.net.2".into()]),
        &Device::Cpu,
    )
    .unwrap();
    randomize(&b, 900, 0.3, false);
    let fb = tmp.path().join("b.safetensors");
    b.save(&fb, LoraFormat::Kohya).unwrap();
    b.detach_from(&unet);

    let la = LoraSet::load_into(&unet, &fa, 0.5).unwrap();
    let lb = LoraSet::load_into(&unet, &fb, -1.0).unwrap();
    let both = fwd(&unet);
    assert!(max_diff(&both, &base) > 1e-3);
    lb.set_enabled(false);
    let only_a = fwd(&unet);
    la.set_enabled(false);
    assert_eq!(max_diff(&fwd(&unet), &base), 0.0);
    la.detach_from(&unet);
    lb.detach_from(&unet);
    // Scale 0 is exactly the base model.
    let zero = LoraSet::load_into(&unet, &fa, 0.0).unwrap();
    assert_eq!(max_diff(&fwd(&unet), &base), 0.0);
    zero.detach_from(&unet);
    // Merging both with the same scales gives the same model.
    let src = unet_dir_f32(tmp.path());
    let merged_dir = tmp.path().join("unet");
    let summary =
        merge_into_unet_weights(&src, &[(fa.clone(), 0.5), (fb.clone(), -1.0)], &merged_dir)
            .unwrap();
    // to_q of attn1 and attn2 (12) and ff.net.2 (6).
    assert_eq!(summary.merged_layers.len(), 18);
    let merged = UNet2DConditionModel::load(&merged_dir, None, DType::F32, &Device::Cpu).unwrap();
    assert!(max_diff(&fwd(&merged), &both) < 1e-5);
    let merged_a = tmp.path().join("unet_a");
    merge_into_unet_weights(&src, &[(fa, 0.5)], &merged_a).unwrap();
    let merged_a = UNet2DConditionModel::load(&merged_a, None, DType::F32, &Device::Cpu).unwrap();
    assert!(max_diff(&fwd(&merged_a), &only_a) < 1e-5);
}

#[test]
fn merged_unet_equals_the_unet_with_the_lora_attached() {
    let tmp = tempfile::tempdir().unwrap();
    let unet = load_unet(DType::F32);
    // Include 3×3 convolutions (one with stride 2) to cover the k×k conv adapter.
    let mut targets = all_targets();
    targets.extend([
        "resnets.0.conv1".to_string(),
        "downsamplers.0.conv".to_string(),
    ]);
    let set = LoraSet::attach(&unet, &config(4, Some(6.0), targets), &Device::Cpu).unwrap();
    let conv = set
        .adapters()
        .iter()
        .find(|a| a.path().ends_with("downsamplers.0.conv"))
        .unwrap();
    assert_eq!(conv.a().dims(), &[4, 32, 3, 3]);
    assert_eq!(conv.b().dims(), &[32, 4, 1, 1]);
    randomize(&set, 1000, 0.2, true);
    let file = tmp.path().join("l.safetensors");
    set.save(&file, LoraFormat::Peft).unwrap();
    set.detach_from(&unet);
    let attached = LoraSet::load_into(&unet, &file, 0.7).unwrap();
    let with = fwd(&unet);
    attached.detach_from(&unet);

    let src = unet_dir_f32(tmp.path());
    let out = tmp.path().join("merged/unet");
    let summary = merge_into_unet_weights(&src, &[(file, 0.7)], &out).unwrap();
    assert_eq!(summary.merged_layers.len(), attached.len());
    let merged = UNet2DConditionModel::load(&out, None, DType::F32, &Device::Cpu).unwrap();
    let d = max_diff(&fwd(&merged), &with);
    assert!(d < 1e-5, "merged vs attached: {d}");
    // Untouched tensors are copied byte for byte; the config is copied.
    let (orig, _) = read_file(&src.join("diffusion_pytorch_model.safetensors"));
    let (new, meta) = read_file(&out.join("diffusion_pytorch_model.safetensors"));
    assert_eq!(orig.len(), new.len());
    assert_eq!(meta["format"], "pt");
    for (k, v) in &orig {
        let changed = summary
            .merged_layers
            .iter()
            .any(|p| k == &format!("{p}.weight"));
        assert_eq!(v.dtype(), new[k].dtype());
        if !changed {
            assert_eq!(max_diff(v, &new[k]), 0.0, "{k}");
        }
    }
    assert_eq!(
        std::fs::read(unet_dir().join("config.json")).unwrap(),
        std::fs::read(out.join("config.json")).unwrap()
    );
}

#[test]
fn merging_keeps_half_precision_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let unet = load_unet(DType::F32);
    // An f16 copy of the UNet folder.
    let f16_dir = tmp.path().join("unet16");
    std::fs::create_dir_all(&f16_dir).unwrap();
    std::fs::copy(unet_dir().join("config.json"), f16_dir.join("config.json")).unwrap();
    let (orig, _) =
        read_file(&unet_dir_f32(tmp.path()).join("diffusion_pytorch_model.safetensors"));
    let half: HashMap<String, Tensor> = orig
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::F16).unwrap()))
        .collect();
    candle_core::safetensors::save(
        &half,
        f16_dir.join("diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    let set = LoraSet::attach(&unet, &config(2, None, vec!["to_k".into()]), &Device::Cpu).unwrap();
    randomize(&set, 1100, 0.2, false);
    let file = tmp.path().join("k.safetensors");
    set.save(&file, LoraFormat::Kohya).unwrap();
    let out = tmp.path().join("out");
    merge_into_unet_weights(&f16_dir, &[(file, 1.0)], &out).unwrap();
    let (new, _) = read_file(&out.join("diffusion_pytorch_model.safetensors"));
    assert!(new.values().all(|t| t.dtype() == DType::F16));
    let k = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight";
    let want = (orig[k].clone() + set.adapters()[0].delta_weight().unwrap()).unwrap();
    assert!(max_diff(&new[k], &want) < 1e-2);
    assert!(max_diff(&new[k], &half[k]) > 0.0);
}

/// Writes a safetensors file of named f32 tensors.
fn write_lora(path: &Path, tensors: &[(&str, Tensor)]) {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

#[test]
fn bad_lora_files_are_named_and_leave_the_unet_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let unet = load_unet(DType::F32);
    let base = fwd(&unet);
    let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let z = |s: &[usize]| Tensor::ones(s, DType::F32, &Device::Cpu).unwrap();
    let f = tmp.path().join("bad.safetensors");
    let load = |f: &Path| LoraSet::load_into(&unet, f, 1.0);

    // A layer the UNet does not have (PEFT), with a valid layer before it.
    write_lora(
        &f,
        &[
            (&format!("unet.{q}.lora_A.weight"), z(&[4, 32])),
            (&format!("unet.{q}.lora_B.weight"), z(&[32, 4])),
            (
                "unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
                z(&[4, 32]),
            ),
            (
                "unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight",
                z(&[32, 4]),
            ),
        ],
    );
    let e = err_text(load(&f));
    assert!(
        e.contains("down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q")
            && e.contains("bad.safetensors"),
        "{e}"
    );
    assert_eq!(max_diff(&fwd(&unet), &base), 0.0);

    // ... and in kohya naming.
    write_lora(
        &f,
        &[
            (
                "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight",
                z(&[4, 32, 1, 1]),
            ),
            (
                "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight",
                z(&[32, 4, 1, 1]),
            ),
        ],
    );
    let e = err_text(load(&f));
    assert!(
        e.contains("lora_unet_down_blocks_7_attentions_0_proj_in"),
        "{e}"
    );
    write_lora(
        &f,
        &[(
            "lora_unet_input_blocks_1_1_proj_in.lora_down.weight",
            z(&[4, 32, 1, 1]),
        )],
    );
    let e = err_text(load(&f));
    assert!(
        e.contains("input_blocks_1_1_proj_in") && e.contains("not supported"),
        "{e}"
    );

    // Shape mismatch: both shapes are named.
    write_lora(
        &f,
        &[
            (&format!("unet.{q}.lora_A.weight"), z(&[4, 31])),
            (&format!("unet.{q}.lora_B.weight"), z(&[32, 4])),
        ],
    );
    let e = err_text(load(&f));
    assert!(
        e.contains("[4, 31]") && e.contains("[4, 32]") && e.contains("lora_A"),
        "{e}"
    );
    write_lora(
        &f,
        &[
            (&format!("unet.{q}.lora_A.weight"), z(&[4, 32])),
            (&format!("unet.{q}.lora_B.weight"), z(&[32, 5])),
        ],
    );
    let e = err_text(load(&f));
    assert!(e.contains("[32, 5]") && e.contains("[32, 4]"), "{e}");

    // Missing half, unknown keys, text-encoder parts, no LoRA at all, missing file.
    write_lora(&f, &[(&format!("unet.{q}.lora_A.weight"), z(&[4, 32]))]);
    let e = err_text(load(&f));
    assert!(e.contains(q) && e.contains("lora_B"), "{e}");
    write_lora(
        &f,
        &[
            (&format!("unet.{q}.lora_A.weight"), z(&[4, 32])),
            (&format!("unet.{q}.lora_B.weight"), z(&[32, 4])),
            (&format!("unet.{q}.lora_magnitude_vector"), z(&[32])),
        ],
    );
    let e = err_text(load(&f));
    assert!(e.contains("lora_magnitude_vector"), "{e}");
    write_lora(
        &f,
        &[
            (&format!("unet.{q}.lora_A.weight"), z(&[4, 32])),
            (&format!("unet.{q}.lora_B.weight"), z(&[32, 4])),
            (
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
                z(&[4, 32]),
            ),
        ],
    );
    let e = err_text(load(&f));
    assert!(e.contains("text-encoder") && e.contains("q_proj"), "{e}");
    write_lora(&f, &[("conv_in.weight", z(&[4, 4]))]);
    let e = err_text(load(&f));
    assert!(
        e.contains("not a LoRA file") && e.contains("conv_in.weight"),
        "{e}"
    );
    let e = err_text(load(&tmp.path().join("missing.safetensors")));
    assert!(e.contains("missing.safetensors"), "{e}");
    assert_eq!(max_diff(&fwd(&unet), &base), 0.0);

    // Merging reports the same problems.
    write_lora(
        &f,
        &[
            (&format!("unet.{q}.lora_A.weight"), z(&[4, 31])),
            (&format!("unet.{q}.lora_B.weight"), z(&[32, 4])),
        ],
    );
    let e = err_text(merge_into_unet_weights(
        &unet_dir(),
        &[(f.clone(), 1.0)],
        &tmp.path().join("m"),
    ));
    assert!(e.contains("[4, 31]") && e.contains("[4, 32]"), "{e}");

    // --lora / --lora-scale pairing.
    let files = vec![PathBuf::from("a"), PathBuf::from("b")];
    assert_eq!(lora_specs(&files, &[]).unwrap()[1].1, 1.0);
    assert_eq!(lora_specs(&files, &[0.5]).unwrap()[1].1, 0.5);
    assert_eq!(lora_specs(&files, &[0.5, 2.0]).unwrap()[1].1, 2.0);
    assert!(err_text(lora_specs(&files, &[1.0, 2.0, 3.0])).contains("3 --lora-scale"));
    assert!(lora_specs(&[], &[1.0]).is_err());
}

#[test]
fn diffusers_style_files_without_our_metadata_use_alpha_equal_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let unet = load_unet(DType::F32);
    let q = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v";
    let a = randn(1, &[2, 32], 0.3);
    let b = randn(2, &[64, 2], 0.3);
    // Bare PEFT keys (no `unet.` prefix), no metadata: delta = B·A.
    let f = tmp.path().join("plain.safetensors");
    write_lora(
        &f,
        &[
            (&format!("{q}.lora_A.weight"), a.clone()),
            (&format!("{q}.lora_B.weight"), b.clone()),
        ],
    );
    let set = LoraSet::load_into(&unet, &f, 1.0).unwrap();
    assert_eq!(set.len(), 1);
    assert_eq!(set.adapters()[0].scale(), 1.0);
    let want = b.matmul(&a).unwrap();
    assert_eq!(
        max_diff(&set.adapters()[0].delta_weight().unwrap(), &want),
        0.0
    );
    set.detach_from(&unet);
    // A kohya file without alpha also means alpha = r; with alpha 1 and r 2 the scale is 0.5.
    let k = tmp.path().join("k.safetensors");
    let name = format!("lora_unet_{}", q.replace('.', "_"));
    write_lora(
        &k,
        &[
            (&format!("{name}.lora_down.weight"), a.clone()),
            (&format!("{name}.lora_up.weight"), b.clone()),
            (
                &format!("{name}.alpha"),
                Tensor::new(1f32, &Device::Cpu).unwrap(),
            ),
        ],
    );
    let set = LoraSet::load_into(&unet, &k, 2.0).unwrap();
    assert_eq!(set.adapters()[0].scale(), 1.0);
    set.detach_from(&unet);
    // diffusers' `lora_adapter_metadata` (save_lora_adapter) gives lora_alpha: scale 8 / 2 = 4.
    let m = tmp.path().join("m.safetensors");
    let bytes = |t: &Tensor| -> Vec<u8> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    };
    let (ab, bb) = (bytes(&a), bytes(&b));
    let views = vec![
        (
            format!("unet.{q}.lora_A.weight"),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 32], &ab)
                .unwrap(),
        ),
        (
            format!("unet.{q}.lora_B.weight"),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![64, 2], &bb)
                .unwrap(),
        ),
    ];
    let meta = HashMap::from([(
        "lora_adapter_metadata".to_string(),
        r#"{"unet.r": 2, "unet.lora_alpha": 8, "unet.use_rslora": false}"#.to_string(),
    )]);
    safetensors::serialize_to_file(views, Some(meta), &m).unwrap();
    let set = LoraSet::load_into(&unet, &m, 1.0).unwrap();
    assert_eq!(set.adapters()[0].scale(), 4.0);
    set.detach_from(&unet);
    let resumed = LoraSet::load(&unet, &m, LoadMode::Trainable).unwrap();
    assert_eq!(
        (resumed.adapters()[0].alpha(), resumed.adapters()[0].scale()),
        (8.0, 4.0)
    );
    assert_eq!(max_diff(resumed.adapters()[0].b(), &b), 0.0);
    resumed.detach_from(&unet);
}

// ---------------------------------------------------------------------------------------------------------
// CLI

fn diffpref(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diffpref"))
        .args(args)
        .output()
        .expect("run diffpref")
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "diffpref failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tiny() -> String {
    fixtures().join("tiny-sd").display().to_string()
}

/// A LoRA on every attention/ff/projection layer of the tiny model, strong enough to change images.
fn strong_lora(path: &Path, format: LoraFormat) {
    strong_lora_from(path, format, 1234);
}

/// [`strong_lora`] with weights drawn from `seed`.
fn strong_lora_from(path: &Path, format: LoraFormat, seed: u64) {
    let unet = load_unet(DType::F32);
    let set = LoraSet::attach(&unet, &config(4, Some(8.0), all_targets()), &Device::Cpu).unwrap();
    randomize(&set, seed, 0.5, false);
    set.save(path, format).unwrap();
}

fn generate(model: &str, out: &Path, extra: &[&str]) -> image::RgbImage {
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "a red cube",
        "--steps",
        "3",
        "--seed",
        "7",
        "--out",
    ];
    args.push(out.to_str().unwrap());
    args.extend_from_slice(extra);
    let o = diffpref(&args);
    ok(&o);
    image::open(out.join("000-a-red-cube.png"))
        .unwrap()
        .to_rgb8()
}

fn max_pixel_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap()
}

#[test]
fn cli_generate_with_lora_and_lora_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let lora = t.join("style.safetensors");
    strong_lora(&lora, LoraFormat::Peft);
    let l = lora.to_str().unwrap();
    let base = generate(&tiny(), &t.join("base"), &[]);
    let with = generate(&tiny(), &t.join("with"), &["--lora", l]);
    assert!(
        max_pixel_diff(&base, &with) > 8,
        "the LoRA did not change the image"
    );
    let zero = generate(
        &tiny(),
        &t.join("zero"),
        &["--lora", l, "--lora-scale", "0"],
    );
    assert_eq!(max_pixel_diff(&base, &zero), 0);
    let half = generate(
        &tiny(),
        &t.join("half"),
        &["--lora", l, "--lora-scale", "0.5"],
    );
    assert!(max_pixel_diff(&half, &with) > 0 && max_pixel_diff(&half, &base) > 0);

    // `lora merge` writes a full model folder that generates the same image as --lora.
    let merged = t.join("merged");
    let o = diffpref(&[
        "lora",
        "merge",
        "--model",
        &tiny(),
        "--lora",
        l,
        "--out",
        merged.to_str().unwrap(),
    ]);
    ok(&o);
    for part in [
        "model_index.json",
        "scheduler",
        "tokenizer",
        "text_encoder",
        "vae",
        "unet/config.json",
    ] {
        assert!(
            merged.join(part).exists(),
            "{part} missing from the merged model"
        );
    }
    let from_merged = generate(merged.to_str().unwrap(), &t.join("m"), &[]);
    assert!(
        max_pixel_diff(&from_merged, &with) <= 1,
        "merged model differs from --lora by {}",
        max_pixel_diff(&from_merged, &with)
    );
    // A merge into a non-empty folder it did not write is refused and leaves it intact; into its own earlier
    // output it replaces it.
    let user = t.join("user");
    std::fs::create_dir_all(&user).unwrap();
    std::fs::write(user.join("notes.txt"), b"mine").unwrap();
    let merge = |out: &Path| {
        diffpref(&[
            "lora",
            "merge",
            "--model",
            &tiny(),
            "--lora",
            l,
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let o = merge(&user);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not empty"));
    assert_eq!(std::fs::read(user.join("notes.txt")).unwrap(), b"mine");
    assert_eq!(std::fs::read_dir(&user).unwrap().count(), 1);
    let o = merge(&merged);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(merged
        .join("unet/diffusion_pytorch_model.safetensors")
        .exists());

    // Errors name the file.
    let o = diffpref(&[
        "generate",
        "--model",
        &tiny(),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--out",
        t.join("e").to_str().unwrap(),
        "--lora",
        t.join("nope.safetensors").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope.safetensors"));
    let o = diffpref(&[
        "generate",
        "--model",
        &tiny(),
        "--prompt",
        "x",
        "--out",
        t.join("e").to_str().unwrap(),
        "--lora",
        l,
        "--lora-scale",
        "1",
        "--lora-scale",
        "2",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--lora-scale"));
}

#[test]
fn cli_grid_adds_a_column_per_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // alpha-style and beta hold the same weights (PEFT and kohya files); gamma other ones.
    let a = t.join("alpha-style.safetensors");
    let b = t.join("beta.safetensors");
    let c = t.join("gamma.safetensors");
    strong_lora(&a, LoraFormat::Peft);
    strong_lora(&b, LoraFormat::Kohya);
    strong_lora_from(&c, LoraFormat::Peft, 99);
    let prompts = ["a red cube", "a tree"];
    let grid = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "grid",
            "--model",
            &tiny(),
            "--prompt",
            prompts[0],
            "--prompt",
            prompts[1],
            "--steps",
            "2",
            "--out",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.push(out.display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        ok(&diffpref(&refs));
        image::open(out).unwrap().to_rgb8()
    };
    let plain = grid(&t.join("plain.png"), &[]);
    let with = grid(
        &t.join("with.png"),
        &[
            "--lora",
            a.to_str().unwrap(),
            "--lora",
            b.to_str().unwrap(),
            "--lora",
            c.to_str().unwrap(),
            "--lora-scale",
            "0.8",
        ],
    );
    assert_eq!(with.height(), plain.height());
    // One column without LoRA; with LoRAs four (no LoRA, alpha-style, beta, gamma), 32x32 cells (scale 1).
    let lp = common::GridLayout::of(&plain, 2, 1, (32, 32), 1);
    let lw = common::GridLayout::of(&with, 2, 4, (32, 32), 1);
    let cells: Vec<Vec<image::RgbImage>> = (0..2)
        .map(|r| (0..4).map(|col| lw.cell(&with, r, col)).collect())
        .collect();
    let (none, alpha, beta, gamma) = (0, 1, 2, 3);
    let many = 32 * 32 / 2;
    let diff = common::differing_pixels;
    for r in 0..2 {
        let row = &cells[r as usize];
        // The no-LoRA column is the plain grid's (same noise, base weights: the LoRAs are switched off).
        assert_eq!(
            diff(&row[none], &lp.cell(&plain, r, 0)),
            0,
            "row {r}: the no-LoRA column differs from a grid without --lora"
        );
        // Each LoRA column draws from the same noise but other weights: most pixels change.
        for col in [alpha, beta, gamma] {
            let n = diff(&row[none], &row[col]);
            assert!(
                n > many,
                "row {r}: LoRA column {col} differs from the base column in only {n} pixels"
            );
        }
        let n = diff(&row[alpha], &row[gamma]);
        assert!(
            n > many,
            "row {r}: two different LoRAs differ in only {n} pixels"
        );
        // Same noise, same weights (the PEFT and the kohya file), same scale: the same pixels.
        assert_eq!(
            diff(&row[alpha], &row[beta]),
            0,
            "row {r}: the PEFT and kohya columns of the same LoRA differ"
        );
    }
    // A column is `diffpref generate` with that LoRA alone at its scale (or none) from the grid's noise: the
    // seed's (0) `seeded_noise`, the same for every prompt of the column. (Generated as the same batch of two
    // prompts: one prompt at a time can move a pixel by one level through the LoRA matmuls' batch-size
    // dependent rounding.)
    let model = tiny();
    let lat = t.join("noise.safetensors");
    let noise = diffpref_pipelines::pipeline::seeded_noise(0, &[1, 4, 16, 16], &Device::Cpu)
        .unwrap()
        .repeat((2, 1, 1, 1))
        .unwrap();
    candle_core::safetensors::save(&HashMap::from([("init_latents".to_string(), noise)]), &lat)
        .unwrap();
    for (col, lora) in [(none, None), (alpha, Some(&a)), (gamma, Some(&c))] {
        let out = t.join(format!("gen-{col}"));
        let mut args = vec![
            "generate",
            "--model",
            &model,
            "--prompt",
            prompts[0],
            "--prompt",
            prompts[1],
            "--steps",
            "2",
            "--init-latents",
            lat.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(f) = lora {
            args.extend(["--lora", f.to_str().unwrap(), "--lora-scale", "0.8"]);
        }
        ok(&diffpref(&args));
        for (r, name) in ["000-a-red-cube.png", "001-a-tree.png"].iter().enumerate() {
            let single = image::open(out.join(name)).unwrap().to_rgb8();
            let n = diff(&single, &cells[r][col]);
            assert_eq!(
                n, 0,
                "row {r}, column {col} differs from `generate` in {n} pixels"
            );
        }
    }
}

#[test]
fn backward_stores_no_gradient_for_frozen_weights() {
    // candle's backward computes and keeps a gradient for every operand of every op on the way to a trainable
    // tensor; with a LoRA that was a weight-sized gradient per frozen layer and an activation-sized one per
    // bias, norm scale, softmax shift and residual. The guarded ops leave only the adapters' gradients, plus
    // one for the first skip connection (the `conv_in` output the up path concatenates, untracked).
    let unet = load_unet(DType::F32);
    let set = LoraSet::attach(&unet, &config(4, None, all_targets()), &Device::Cpu).unwrap();
    randomize(&set, 200, 0.1, false);
    let w = randn(9, &[2, 4, 8, 8], 1.0);
    let loss = diffpref::pipelines::autograd::mul(&fwd(&unet), &w)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    let vars = set.vars();
    let ids: std::collections::HashSet<_> = vars.iter().map(|(_, v)| v.as_tensor().id()).collect();
    let others: Vec<Vec<usize>> = g
        .get_ids()
        .filter(|id| !ids.contains(id))
        .map(|id| g.get_id(*id).unwrap().dims().to_vec())
        .collect();
    for (name, v) in &vars {
        assert!(g.get(v.as_tensor()).is_some(), "{name}: no gradient");
    }
    let c0 = unet.config().block_out_channels[0];
    assert!(
        others.len() <= 1 && others.iter().all(|d| d == &[2, c0, 8, 8]),
        "gradients stored beyond the adapters': {others:?}"
    );
}
