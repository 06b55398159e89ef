//! AutoencoderKL: parity with diffusers on `tests/fixtures/golden/vae.safetensors` (batch of 2, the candle#3744
//! trap), gradient coverage of the decoder and encoder, and loader errors.

mod common;
use candle_core::{DType, Device, Tensor, Var};
use common::randn;
use diffpref_pipelines::checks::CheckContext;
use diffpref_pipelines::golden::Golden;
use diffpref_pipelines::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use diffpref_pipelines::weights::find_weight_files;
use diffpref_pipelines::{Error, Params};
use std::path::{Path, PathBuf};

// The check itself (`src/checks/vae.rs`) is written against the public API only; compile it into this test so
// the test runs exactly the code `diffpref verify` runs. Its `crate::` / `super::` paths resolve to these names.
#[allow(dead_code)]
#[path = "../src/checks/vae.rs"]
mod check;
use diffpref_pipelines::{golden, models, Result};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn vae_dir() -> PathBuf {
    fixtures().join("tiny-sd/vae")
}

fn golden() -> Golden {
    Golden::load(fixtures().join("golden/vae.safetensors")).expect("golden vae.safetensors")
}

#[test]
fn config_reads_diffusers_keys_and_defaults() {
    let cfg = AutoencoderKLConfig::from_file(&vae_dir().join("config.json")).unwrap();
    assert_eq!(cfg.block_out_channels, vec![32, 64]);
    assert_eq!(cfg.layers_per_block, 2);
    assert_eq!(cfg.latent_channels, 4);
    assert_eq!(cfg.scaling_factor, 0.18215);
    assert_eq!(cfg.shift_factor, None);
    assert!(
        cfg.force_upcast
            && cfg.use_quant_conv
            && cfg.use_post_quant_conv
            && cfg.mid_block_add_attention
    );

    let d = AutoencoderKLConfig::default();
    assert_eq!(d.block_out_channels, vec![64]);
    assert_eq!(d.layers_per_block, 1);
    assert_eq!(d.down_block_types, vec!["DownEncoderBlock2D".to_string()]);
    assert_eq!(d.scaling_factor, 0.18215);
    assert_eq!(
        (
            d.in_channels,
            d.out_channels,
            d.latent_channels,
            d.norm_num_groups
        ),
        (3, 3, 4, 32)
    );
    assert!(d.use_quant_conv && d.use_post_quant_conv && d.mid_block_add_attention);
}

#[test]
fn golden_parity_batch_of_two() {
    let g = golden();
    assert_eq!(
        g.get("image").unwrap().dim(0).unwrap(),
        2,
        "the golden batch is 2 (candle#3744)"
    );
    let ctx = CheckContext::cpu(Some(fixtures().join("tiny-sd")));
    let results = check::check_vae(&g, &ctx).unwrap();
    let expected = [
        "posterior_mean",
        "posterior_logvar",
        "posterior_std",
        "posterior_sample",
        "latents_scaled",
        "decode_out",
        "reconstruction",
        "decode_out_small",
        "posterior_mean_small",
    ];
    assert_eq!(
        results.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        expected
    );
    for c in &results {
        println!("{c}");
    }
    let failed: Vec<String> = results
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.to_string())
        .collect();
    assert!(failed.is_empty(), "failed:\n{}", failed.join("\n"));
}

#[test]
fn decode_helpers_and_sample() {
    let g = golden();
    let vae = AutoencoderKL::load(vae_dir(), None, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(vae.downscale_factor(), 2);
    let z = g.get("decode_in").unwrap().clone();
    // scale / unscale are inverses; decode_to_image01 = clamp(decode(unscale(z)) / 2 + 0.5, 0, 1).
    let back = vae
        .unscale_latents(&vae.scale_latents(&z).unwrap())
        .unwrap();
    let err = (back - &z)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(err < 1e-5, "unscale(scale(z)) off by {err}");
    let zs = vae.scale_latents(&z).unwrap();
    let img = vae.decode_to_image01(&zs).unwrap();
    let want = ((vae.decode(&z).unwrap() / 2.0).unwrap() + 0.5)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap();
    let err = (img.clone() - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(err < 1e-6, "decode_to_image01 off by {err}");
    let (lo, hi) = (
        img.min_all().unwrap().to_scalar::<f32>().unwrap(),
        img.max_all().unwrap().to_scalar::<f32>().unwrap(),
    );
    assert!((0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi));

    // sample(None) draws noise: finite, differs from the mode.
    let post = vae.encode(g.get("image").unwrap()).unwrap();
    let s = post.sample(None).unwrap();
    assert_eq!(s.dims(), &[2, 4, 16, 16]);
    let d = (s - post.mode())
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d.is_finite() && d > 0.0);
    let kl = post.kl().unwrap();
    assert_eq!(kl.dims(), &[2]);
}

fn grad_ok(
    grads: &candle_core::backprop::GradStore,
    t: &Tensor,
) -> std::result::Result<f64, String> {
    let g = grads.get(t).ok_or("no gradient")?;
    let n = g
        .abs()
        .and_then(|a| a.sum_all())
        .and_then(|s| s.to_dtype(DType::F64))
        .and_then(|s| s.to_scalar::<f64>());
    let n = n.map_err(|e| e.to_string())?;
    if !n.is_finite() {
        return Err(format!("non-finite gradient ({n})"));
    }
    if n == 0.0 {
        return Err("zero gradient".into());
    }
    Ok(n)
}

#[test]
fn gradients_reach_every_parameter() {
    let g = golden();
    let files = find_weight_files(&vae_dir(), "diffusion_pytorch_model", None).unwrap();
    let cfg = AutoencoderKLConfig::from_file(&vae_dir().join("config.json")).unwrap();
    let p = Params::from_files(&files, DType::F32, &Device::Cpu)
        .unwrap()
        .trainable();
    let vae = AutoencoderKL::new(&p, cfg).unwrap();
    let vars = p.vars();
    assert!(vars.len() > 100, "only {} vars", vars.len());

    // Decoder: a non-trivial scalar of decode(z), z a Var.
    let z = Var::from_tensor(g.get("decode_in").unwrap()).unwrap();
    let y = vae.decode(z.as_tensor()).unwrap();
    let w = randn(1, 1.0, y.dims(), &Device::Cpu, DType::F32);
    let loss =
        (y.mul(&w).unwrap().sum_all().unwrap() + y.sqr().unwrap().mean_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    grad_ok(&grads, z.as_tensor()).expect("z");
    let mut bad = Vec::new();
    let mut n_dec = 0;
    for (name, v) in &vars {
        if name.starts_with("decoder.") || name.starts_with("post_quant_conv.") {
            n_dec += 1;
            if let Err(e) = grad_ok(&grads, v.as_tensor()) {
                bad.push(format!("{name}: {e}"));
            }
        }
    }
    assert!(n_dec > 50, "only {n_dec} decoder vars");
    assert!(
        bad.is_empty(),
        "decoder vars without a usable gradient:\n{}",
        bad.join("\n")
    );

    // Encoder: a scalar of the posterior sample (mean and logvar halves), image a Var.
    let x = Var::from_tensor(g.get("image").unwrap()).unwrap();
    let post = vae.encode(x.as_tensor()).unwrap();
    let s = post.sample(Some(g.get("noise").unwrap())).unwrap();
    let w = randn(2, 1.0, s.dims(), &Device::Cpu, DType::F32);
    let loss = (s.mul(&w).unwrap().sum_all().unwrap() + post.std.sum_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    grad_ok(&grads, x.as_tensor()).expect("image");
    let mut n_enc = 0;
    for (name, v) in &vars {
        if name.starts_with("encoder.") || name.starts_with("quant_conv.") {
            n_enc += 1;
            if let Err(e) = grad_ok(&grads, v.as_tensor()) {
                bad.push(format!("{name}: {e}"));
            }
        }
    }
    assert!(n_enc > 40, "only {n_enc} encoder vars");
    assert!(
        bad.is_empty(),
        "encoder vars without a usable gradient:\n{}",
        bad.join("\n")
    );
    assert_eq!(
        n_enc + n_dec,
        vars.len(),
        "vars outside encoder/decoder/quant convs"
    );
}

/// A temp copy of the tiny VAE folder with `edit` applied to its config.
fn vae_copy(edit: impl FnOnce(&mut serde_json::Value), weights: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vae_dir().join("config.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    if weights {
        let w = "diffusion_pytorch_model.safetensors";
        std::fs::copy(vae_dir().join(w), dir.path().join(w)).unwrap();
    }
    dir
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let dir = vae_copy(
        |c| c["block_out_channels"] = serde_json::json!([32, 128]),
        true,
    );
    let err = AutoencoderKL::load(dir.path(), None, DType::F32, &Device::Cpu)
        .err()
        .expect("must fail");
    let msg = err.to_string();
    println!("{msg}");
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("encoder.down_blocks.1.resnets.0.conv1.weight"),
        "{msg}"
    );
    assert!(
        msg.contains("[64, 32, 3, 3]") && msg.contains("[128, 32, 3, 3]"),
        "{msg}"
    );
}

#[test]
fn missing_weights_file_is_named() {
    let dir = vae_copy(|_| {}, false);
    let err = AutoencoderKL::load(dir.path(), None, DType::F32, &Device::Cpu)
        .err()
        .expect("must fail");
    let msg = err.to_string();
    assert!(matches!(err, Error::MissingFile(_)), "{msg}");
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
    let err = AutoencoderKL::load(dir.path(), Some("fp16"), DType::F32, &Device::Cpu)
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("diffusion_pytorch_model.fp16.safetensors"),
        "{err}"
    );
}

#[test]
fn unsupported_block_type_is_rejected() {
    let dir = vae_copy(
        |c| {
            c["down_block_types"] =
                serde_json::json!(["DownEncoderBlock2D", "AttnDownEncoderBlock2D"])
        },
        true,
    );
    let err = AutoencoderKL::load(dir.path(), None, DType::F32, &Device::Cpu)
        .err()
        .expect("must fail");
    let msg = err.to_string();
    assert!(matches!(err, Error::UnsupportedConfig { .. }), "{msg}");
    assert!(
        msg.contains("AttnDownEncoderBlock2D") && msg.contains("config.json"),
        "{msg}"
    );
}

#[test]
fn old_attention_names_load() {
    // Rename the mid-block attention weights to the pre-0.14 names; outputs must be identical.
    let files = find_weight_files(&vae_dir(), "diffusion_pytorch_model", None).unwrap();
    let map = candle_core::safetensors::load(&files[0], &Device::Cpu).unwrap();
    let renamed = map
        .iter()
        .map(|(k, v)| {
            let k = k
                .replace(".attentions.0.to_q.", ".attentions.0.query.")
                .replace(".attentions.0.to_k.", ".attentions.0.key.")
                .replace(".attentions.0.to_v.", ".attentions.0.value.")
                .replace(".attentions.0.to_out.0.", ".attentions.0.proj_attn.");
            (k, v.clone())
        })
        .collect::<std::collections::HashMap<_, _>>();
    assert!(renamed
        .keys()
        .any(|k| k.ends_with("attentions.0.proj_attn.weight")));
    let cfg = AutoencoderKLConfig::from_file(&vae_dir().join("config.json")).unwrap();
    let old = AutoencoderKL::new(
        &Params::from_map(renamed, DType::F32, &Device::Cpu),
        cfg.clone(),
    )
    .unwrap();
    let new = AutoencoderKL::new(&Params::from_map(map, DType::F32, &Device::Cpu), cfg).unwrap();
    let z = golden().get("decode_in").unwrap().clone();
    let d = (old.decode(&z).unwrap() - new.decode(&z).unwrap()).unwrap();
    assert_eq!(
        d.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}

/// The posterior KL against diffusers' `DiagonalGaussianDistribution.kl()` (`golden/vae_kl.safetensors`, made
/// by `tests/fixtures/parity/make_vae_kl_golden.py`): on the tiny-sd posterior of non-square images, and on
/// hand-made moments whose logvar goes below -30 and above 20 (diffusers clamps before the KL). The file is
/// also a complete `vae` golden on its 24x16 inputs, run here through the same check as `verify`.
#[test]
fn posterior_kl_matches_diffusers() {
    use diffpref_pipelines::models::vae::DiagonalGaussian;
    let g = Golden::load(fixtures().join("golden/vae_kl.safetensors")).unwrap();
    let ctx = CheckContext::cpu(Some(fixtures().join("tiny-sd")));
    let mut results = check::check_vae(&g, &ctx).unwrap();
    let vae = AutoencoderKL::load(vae_dir(), None, DType::F32, &Device::Cpu).unwrap();
    let post = vae.encode(g.get("image").unwrap()).unwrap();
    assert_eq!(post.mean.dims(), &[2, 4, 12, 8]);
    let kl = post.kl().unwrap();
    assert_eq!(kl.dims(), &[2]);
    results.push(g.compare("kl", &kl, 1.0).unwrap());
    for (moments, name) in [
        ("moments", "moments_kl"),
        ("moments_high", "moments_high_kl"),
    ] {
        let m = g.get(moments).unwrap();
        let kl = DiagonalGaussian::from_moments(m).unwrap().kl().unwrap();
        results.push(g.compare(name, &kl, 1.0).unwrap());
    }
    for c in &results {
        println!("{c}");
    }
    let failed: Vec<String> = results
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.to_string())
        .collect();
    assert!(failed.is_empty(), "failed:\n{}", failed.join("\n"));
}
