//! `diffpref pretrain` smoke test: a tiny model trained for a few steps on 16x16 shapes loads with diffpref's
//! loader and `diffpref generate` runs on it; the VAE reconstruction loss falls; the example config parses.

use candle_core::{DType, Device};
use diffpref::train::metrics::{read_metrics, series};
use diffpref::train::pretrain::{pretrain, PretrainConfig};
use diffpref_pipelines::loading::{LoadOptions, StableDiffusion};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn tiny_config(dir: &Path, vae_steps: u64, unet_steps: u64) -> PretrainConfig {
    let sets = vec![
        format!("run_dir = \"{}\"", dir.join("run").display()),
        format!("output_dir = \"{}\"", dir.join("model").display()),
        format!(
            "tokenizer = \"{}\"",
            root().join("tests/fixtures/clip-tokenizer").display()
        ),
        "seed = 3".into(),
        "data.resolution = 16".into(),
        "vae.block_out_channels = [8, 16]".into(),
        "vae.norm_num_groups = 8".into(),
        "unet.block_out_channels = [16, 32]".into(),
        "unet.down_block_types = [\"CrossAttnDownBlock2D\", \"DownBlock2D\"]".into(),
        "unet.up_block_types = [\"UpBlock2D\", \"CrossAttnUpBlock2D\"]".into(),
        "unet.norm_num_groups = 8".into(),
        "unet.attention_head_dim = 2".into(),
        "text_encoder.hidden_size = 16".into(),
        "text_encoder.intermediate_size = 32".into(),
        "text_encoder.num_attention_heads = 2".into(),
        "text_encoder.num_hidden_layers = 1".into(),
        format!("vae_train.steps = {vae_steps}"),
        "vae_train.batch_size = 8".into(),
        "vae_train.lr = 2e-3".into(),
        "vae_train.warmup_steps = 0".into(),
        "vae_train.schedule = \"constant\"".into(),
        "vae_loss.scale_images = 16".into(),
        format!("unet_train.steps = {unet_steps}"),
        "unet_train.batch_size = 4".into(),
        "unet_train.warmup_steps = 1".into(),
        "unet_train.ema_decay = 0.99".into(),
        "log.checkpoint_every = 2".into(),
        "log.progress = false".into(),
    ];
    PretrainConfig::load(None, &sets).unwrap()
}

#[test]
fn pretrain_writes_a_loadable_model_and_the_vae_learns() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(tmp.path(), 30, 3);
    let s = pretrain(&cfg, None).unwrap();
    assert!(!s.interrupted);
    let sf = s.scaling_factor.unwrap();
    assert!(sf.is_finite() && sf > 0.0, "scaling factor {sf}");
    assert!(s.unet_loss.unwrap().is_finite());

    // The VAE reconstruction error falls over 30 steps.
    let recs = read_metrics(tmp.path().join("run/vae/metrics.jsonl")).unwrap();
    let mse: Vec<f64> = series(&recs, "mse").into_iter().map(|(_, v)| v).collect();
    assert_eq!(mse.len(), 30);
    let head = mse[..5].iter().sum::<f64>() / 5.0;
    let tail = mse[25..].iter().sum::<f64>() / 5.0;
    assert!(tail < 0.7 * head, "VAE mse {head:.4} -> {tail:.4}");
    let unet = read_metrics(tmp.path().join("run/unet/metrics.jsonl")).unwrap();
    assert_eq!(series(&unet, "loss").len(), 3);
    // Zero-initialised conv_out: the first UNet prediction is 0, so the loss is E[eps^2] ~ 1.
    let first = series(&unet, "loss")[0].1;
    assert!((0.5..1.5).contains(&first), "first UNet loss {first}");

    // The folder is complete and loads.
    let model = tmp.path().join("model");
    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(model.join(f).exists(), "missing {f}");
    }
    let sd = StableDiffusion::load(
        &model,
        &LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            variant: None,
        },
    )
    .unwrap();
    assert!((sd.vae.config().scaling_factor - sf).abs() < 1e-9);
    assert_eq!(sd.vae_scale_factor(), 2);
    let te =
        candle_core::safetensors::load(model.join("text_encoder/model.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(te.keys().all(|k| k.starts_with("text_model.")));

    // Resuming a finished run is a no-op that rewrites the same folder.
    let again = pretrain(&cfg, None).unwrap();
    assert_eq!(again.vae_loss, None);
    assert_eq!(again.unet_loss, None);

    // diffpref generate runs on it.
    let out = tmp.path().join("gen");
    let o = Command::new(env!("CARGO_BIN_EXE_diffpref"))
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a red circle",
            "--steps",
            "3",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let pngs: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("png".as_ref()))
        .collect();
    assert_eq!(pngs.len(), 1);
}

#[test]
fn example_config_parses_and_validates() {
    let cfg =
        PretrainConfig::load(Some(&root().join("examples/pretrain-shapes.toml")), &[]).unwrap();
    cfg.validate().unwrap();
    assert!(PretrainConfig::load(None, &["nope = 1".into()]).is_err());
}
