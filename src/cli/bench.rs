//! `diffpref bench foundation`: UNet forward and forward+backward time, and pipeline seconds per step, on a
//! model folder (default: the tiny test model) and on an SD1.5-sized random UNet at a 32x32 latent.

use super::common::ComputeArgs;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use diffpref_pipelines::loading::{resolve_model, LoadOptions, StableDiffusion};
use diffpref_pipelines::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use diffpref_pipelines::pipeline::{GenerateOptions, Pipeline};
use diffpref_pipelines::Params;
use std::time::Instant;

/// The UNet config of Stable Diffusion 1.5 (random weights are drawn for it).
pub const SD15_UNET_CONFIG: &str = r#"{
  "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false, "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
  "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// UNet forward / forward+backward and pipeline s/step.
    Foundation,
    /// Reward models: images scored per second (score, and score + gradient to the pixels) on the tiny
    /// fixtures next to --model and, with --large, on real-sized random ViT-L/14 and ViT-H/14 models.
    Rewards,
}

/// Arguments of `diffpref bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(value_enum, default_value = "foundation")]
    pub suite: Suite,
    /// Model folder for the small-model rows.
    #[arg(long, default_value = "tests/fixtures/tiny-sd")]
    pub model: String,
    /// Also run the SD1.5-sized random UNet (about 3.5 GB of weights, ~11 GB peak for the backward at 32x32).
    #[arg(long)]
    pub sd15: bool,
    /// rewards: also the real-sized random-weight models (CLIP ViT-L/14: CLIP score and aesthetic;
    /// open_clip ViT-H/14: HPSv2; ~6 GB of f32 weights).
    #[arg(long)]
    pub large: bool,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// One benchmark row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub model: String,
    pub what: String,
    pub seconds: f64,
}

fn time<F: FnMut() -> Result<()>>(iters: usize, mut f: F) -> Result<f64> {
    f()?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    Ok(t.elapsed().as_secs_f64() / iters.max(1) as f64)
}

fn sync(d: &Device) -> Result<()> {
    d.synchronize()?;
    Ok(())
}

/// Times UNet forward and forward+backward (all weights trainable) at latent size `hw`.
pub fn unet_rows(
    name: &str,
    unet: &UNet2DConditionModel,
    batch: usize,
    hw: usize,
    iters: usize,
) -> Result<Vec<Row>> {
    let dev = unet.device().clone();
    let dt = unet.dtype();
    let c = unet.config().in_channels;
    let ctx_dim = unet.config().per_block(
        "cross_attention_dim",
        &unet.config().cross_attention_dim,
        unet.config().block_out_channels.len(),
    )?[0];
    let x = Tensor::randn(0f32, 1., (batch, c, hw, hw), &dev)?.to_dtype(dt)?;
    let ehs = Tensor::randn(0f32, 1., (batch, 77, ctx_dim), &dev)?.to_dtype(dt)?;
    let t = Tensor::full(500f32, batch, &dev)?;
    let fwd = time(iters, || {
        let y = unet.forward(&x, &t, &ehs, None)?;
        drop(y);
        sync(&dev)
    })?;
    let fb = time(iters, || {
        let y = unet.forward(&x, &t, &ehs, None)?;
        let g = y.to_dtype(DType::F32)?.sqr()?.mean_all()?.backward()?;
        drop(g);
        sync(&dev)
    })?;
    Ok(vec![
        Row {
            model: name.into(),
            what: format!("unet forward b{batch} {hw}x{hw}"),
            seconds: fwd,
        },
        Row {
            model: name.into(),
            what: format!("unet forward+backward b{batch} {hw}x{hw}"),
            seconds: fb,
        },
    ])
}

pub fn foundation(a: &BenchArgs) -> Result<Vec<Row>> {
    let device = a.compute.device()?;
    let dtype = a.compute.dtype()?;
    let mut rows = Vec::new();
    let dir = resolve_model(&a.model, None).with_context(|| format!("--model {}", a.model))?;
    let name = dir
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("model")
        .to_string();
    {
        let cfg = UNet2DConditionConfig::load(&dir.join("unet/config.json"))?;
        let files = diffpref_pipelines::weights::find_weight_files(
            &dir.join("unet"),
            "diffusion_pytorch_model",
            None,
        )?;
        let p = Params::from_files(&files, dtype, &device)?.trainable();
        let unet = UNet2DConditionModel::new(&p, cfg)?;
        let hw = unet
            .config()
            .sample_size
            .as_ref()
            .and_then(|v| v.as_u64())
            .unwrap_or(32) as usize;
        rows.extend(unet_rows(&name, &unet, a.batch, hw, a.iters)?);
    }
    let model = StableDiffusion::load(
        &dir,
        &LoadOptions {
            dtype,
            device: device.clone(),
            variant: None,
        },
    )?;
    let pipe = Pipeline::new(&model)?;
    let steps = 10;
    let opts = GenerateOptions {
        steps,
        ..Default::default()
    };
    let s = time(a.iters, || {
        pipe.generate(&vec!["a red circle"; a.batch], &[], &opts, None)?;
        sync(&device)
    })?;
    rows.push(Row {
        model: name,
        what: format!("pipeline s/step (b{}, cfg, ddim)", a.batch),
        seconds: s / steps as f64,
    });
    if a.sd15 {
        let cfg: UNet2DConditionConfig = serde_json::from_str(SD15_UNET_CONFIG)?;
        let p = Params::random(0, dtype, &device).trainable();
        let unet = UNet2DConditionModel::new(&p, cfg)?;
        rows.extend(unet_rows("sd15-random", &unet, a.batch, 32, a.iters)?);
    }
    Ok(rows)
}

/// Times `reward` on `images` (score alone, then score + gradient with respect to the pixels).
pub fn reward_rows(
    model: &str,
    reward: &dyn diffpref_rewards::Reward,
    images: &Tensor,
    prompts: &[&str],
    iters: usize,
) -> Result<Vec<Row>> {
    let dev = images.device().clone();
    let (b, _, h, w) = images.dims4()?;
    let fwd = time(iters, || {
        reward.score(images, prompts)?;
        sync(&dev)
    })?;
    let fb = time(iters, || {
        reward.score_and_grad(images, prompts, b)?;
        sync(&dev)
    })?;
    let name = reward.name();
    Ok(vec![
        Row {
            model: model.into(),
            what: format!("{name} score b{b} {h}x{w}: {:.2} img/s", b as f64 / fwd),
            seconds: fwd,
        },
        Row {
            model: model.into(),
            what: format!("{name} score+grad b{b} {h}x{w}: {:.2} img/s", b as f64 / fb),
            seconds: fb,
        },
    ])
}

/// `diffpref bench rewards`: every CLIP-family reward on the tiny fixtures (`tiny-clip-hf`,
/// `tiny-open-clip`, `tiny-aesthetic`, `clip-tokenizer`, looked up next to --model) and, with --large, on
/// real-sized random weights, scoring 512x512 images (the resize to the model's size included).
pub fn rewards(a: &BenchArgs) -> Result<Vec<Row>> {
    use diffpref_rewards::aesthetic::{Aesthetic, AestheticHead};
    use diffpref_rewards::clip::{ClipConfig, ClipLoadOptions, ClipModel};
    use diffpref_rewards::{ClipReward, ClipScoring};
    use std::sync::Arc;
    let device = a.compute.device()?;
    let dtype = a.compute.dtype()?;
    let fixtures = std::path::Path::new(&a.model)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf();
    let tok_dir = fixtures.join("clip-tokenizer");
    let tokenizer =
        diffpref_pipelines::tokenizer::ClipTokenizer::from_dir(&tok_dir).with_context(|| {
            format!(
                "the CLIP tokenizer of the reward benchmark ({})",
                tok_dir.display()
            )
        })?;
    let b = a.batch.max(1);
    let images = Tensor::rand(0f32, 1f32, (b, 3, 512, 512), &device)?;
    let prompts = vec!["a photograph of an astronaut riding a horse"; b];
    let mut rows = Vec::new();
    let opts = ClipLoadOptions {
        tokenizer: Some(tok_dir.clone()),
        ..Default::default()
    };
    let hf = fixtures.join("tiny-clip-hf");
    for scoring in [ClipScoring::ClipScore, ClipScoring::PickScore] {
        let r = ClipReward::load(&hf, scoring, &opts, dtype, &device)?;
        rows.extend(reward_rows("tiny-clip-hf", &r, &images, &prompts, a.iters)?);
    }
    let hps = ClipReward::load(
        fixtures.join("tiny-open-clip"),
        ClipScoring::Hps,
        &opts,
        dtype,
        &device,
    )?;
    rows.extend(reward_rows(
        "tiny-open-clip",
        &hps,
        &images,
        &prompts,
        a.iters,
    )?);
    let aes = Aesthetic::load(fixtures.join("tiny-aesthetic"), &hf, dtype, &device)?;
    rows.extend(reward_rows("tiny-aesthetic", &aes, &images, &[], a.iters)?);
    if a.large {
        let p = Params::random(0, dtype, &device);
        let mut l14 = ClipModel::from_params(&p, ClipConfig::hf_vit_l_14(), true)?;
        l14.set_tokenizer(tokenizer.clone());
        let l14 = Arc::new(l14);
        let clip = ClipReward::new(l14.clone(), ClipScoring::ClipScore)?;
        rows.extend(reward_rows(
            "vit-l14-random",
            &clip,
            &images,
            &prompts,
            a.iters,
        )?);
        let head = AestheticHead::from_params(&Params::random(1, DType::F32, &device), 768)?;
        let aes = Aesthetic::new(l14, head)?;
        rows.extend(reward_rows("vit-l14-random", &aes, &images, &[], a.iters)?);
        drop(clip);
        drop(aes);
        let p = Params::random(2, dtype, &device);
        let mut h14 = ClipModel::from_params(&p, ClipConfig::open_clip_vit_h_14(), true)?;
        h14.set_tokenizer(tokenizer);
        let hps = ClipReward::new(Arc::new(h14), ClipScoring::Hps)?;
        rows.extend(reward_rows(
            "vit-h14-random",
            &hps,
            &images,
            &prompts,
            a.iters,
        )?);
    }
    Ok(rows)
}

pub fn print(rows: &[Row]) {
    println!("{:<16} {:<44} {:>12}", "model", "measure", "seconds");
    for r in rows {
        println!("{:<16} {:<44} {:>12.4}", r.model, r.what, r.seconds);
    }
}

pub fn run(a: BenchArgs) -> Result<()> {
    let rows = match a.suite {
        Suite::Foundation => foundation(&a)?,
        Suite::Rewards => rewards(&a)?,
    };
    print(&rows);
    Ok(())
}
