//! `diffpref bench foundation`: UNet forward and forward+backward time, and pipeline seconds per step, on a
//! model folder (default: the tiny test model) and on an SD1.5-sized random UNet at a 32x32 latent.
//! `diffpref bench rewards`: reward models scored per second. `diffpref bench dpo`: Diffusion-DPO training
//! steps per second (LoRA or full fine-tuning; random latents, noise and text states) and, on CUDA, the peak
//! device memory of a step. `diffpref bench align`: base model vs preference methods at a fixed step budget
//! on held-out prompts ([`crate::align`]).

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
    /// Diffusion-DPO training steps per second (policy forward+backward, reference forward, loss, AdamW) for
    /// --model's UNet or, with --sd15, an SD1.5-sized random UNet; LoRA (default) or --full; one row per
    /// --batch (pairs per step); on CUDA also the peak device memory of a step.
    Dpo,
    /// Alignment: the base model against each --method (default: dpo and grpo, each a LoRA trained with its
    /// configuration), on held-out prompts with the same noise: reward ± 95% CI, change, win rate, diversity,
    /// wall time, reward calls. Default: the embedded shapes world (assets/shapes/dpo.toml, grpo.toml).
    Align,
}

/// Arguments of `diffpref bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(value_enum, default_value = "foundation")]
    pub suite: Suite,
    /// Model folder for the small-model rows.
    #[arg(long, default_value = "tests/fixtures/tiny-sd")]
    pub model: String,
    /// Also run the SD1.5-sized random UNet (about 3.5 GB of weights; the LoRA DPO step at 32x32 peaks at ~9 GB, ~5 GB
    /// with --gradient-checkpointing).
    #[arg(long)]
    pub sd15: bool,
    /// rewards: also the real-sized random-weight models (CLIP ViT-L/14: CLIP score and aesthetic;
    /// open_clip ViT-H/14: HPSv2; ~6 GB of f32 weights).
    #[arg(long)]
    pub large: bool,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Batch size; repeat for several (`--batch 1 --batch 4`): one set of rows each. For `dpo` it counts
    /// preference pairs per step (the UNet sees twice as many latents).
    #[arg(long, default_values_t = [1])]
    pub batch: Vec<usize>,
    /// Latent side length (64 = 512x512 pixels for SD1.5). Default: the UNet's `sample_size` for `dpo` (64
    /// with --sd15); foundation keeps its defaults (the model's sample_size, 32 for --sd15).
    #[arg(long)]
    pub latent: Option<usize>,
    /// dpo: train every UNet weight (f32, with a frozen f32 reference copy) instead of LoRA adapters.
    #[arg(long)]
    pub full: bool,
    /// dpo: LoRA rank (adapters on to_q, to_k, to_v, to_out.0; f32 master weights).
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// dpo: gradient checkpointing of the UNet's resnet and transformer blocks (`gradient_checkpointing` in
    /// training configs).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// align: methods to train, one row each (dpo, ipo, hinge, robust, simpo, mapo, kto, sft, grpo, lpo, spo, seppo, seppo-noflip, adjoint; repeat
    /// the flag). Default: dpo and grpo.
    #[arg(long = "method", default_values_t = ["dpo".to_string(), "grpo".to_string()])]
    pub methods: Vec<String>,
    /// align: the DPO family's training configuration, whose model and `[eval]` judge every row (default:
    /// the embedded shapes-world one, assets/shapes/dpo.toml).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// align: the `grpo` row's configuration (default: assets/shapes/grpo.toml).
    #[arg(long)]
    pub grpo_config: Option<std::path::PathBuf>,
    /// align: the `lpo` row's configuration (default: assets/shapes/lpo.toml; its `lpo.lrm` is the LRM the row
    /// trains first).
    #[arg(long)]
    pub lpo_config: Option<std::path::PathBuf>,
    /// align: the `lpo` row's LRM configuration (default: assets/shapes/lrm.toml).
    #[arg(long)]
    pub lrm_config: Option<std::path::PathBuf>,
    /// align: the `spo` row's configuration (default: assets/shapes/spo.toml; its `spo.spm` is the SPM the row
    /// trains first).
    #[arg(long)]
    pub spo_config: Option<std::path::PathBuf>,
    /// align: the `spo` row's SPM configuration (default: assets/shapes/spm.toml).
    #[arg(long)]
    pub spm_config: Option<std::path::PathBuf>,
    /// align: the `seppo` row's configuration (default: assets/shapes/seppo.toml).
    #[arg(long)]
    pub seppo_config: Option<std::path::PathBuf>,
    /// align: the `adjoint` row's configuration (default: assets/shapes/adjoint.toml).
    #[arg(long)]
    pub adjoint_config: Option<std::path::PathBuf>,
    /// align: also judge every row on N freshly drawn caption lists (never trained or tuned on: the held-out
    /// list, the training prompts and the manifests' prompts are excluded; list i = `data prompts --seed
    /// 1000+i`) × `--fresh-seeds` sampling seeds, and report the change per cell and pooled. Default 0 (off).
    #[arg(long, default_value_t = 0)]
    pub fresh_lists: usize,
    /// align: sampling seeds per fresh list (`[eval] seed` + 1, + 2, ...).
    #[arg(long, default_value_t = 2)]
    pub fresh_seeds: usize,
    /// align: captions per fresh list.
    #[arg(long, default_value_t = 48)]
    pub fresh_prompts: usize,
    /// align: train each method this many times, with its configurations' seeds + 0, 1, ... (rows `dpo@seed0`,
    /// `dpo@seed1`, ...), and report each method's mean change over its seeds with the seed-to-seed standard
    /// deviation and a Student-t 95% interval across seeds. Default 1.
    #[arg(long, default_value_t = 1)]
    pub train_seeds: usize,
    /// align: configuration overrides, e.g. `--set optim.max_steps=200`: keys of the shared run section go to
    /// every method's configuration, `loss.*` / `data.*` to DPO's and SePPO's, `grpo.*` to GRPO's, `reward.*` to
    /// GRPO's, SPO's, SePPO's and Adjoint Matching's, `rollout.*` to GRPO's, LPO's, SPO's and Adjoint Matching's,
    /// `lpo.*` to LPO's, `spo.*` to SPO's, `seppo.*` to SePPO's, `adjoint.*` to Adjoint Matching's, `lrm.*` / `spm.*` (with the prefix stripped, e.g. `lrm.optim.max_steps=50`) to the
    /// LPO row's LRM / the SPO row's SPM.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// align: output folder (one subfolder per method, align.json, grid.png).
    #[arg(long, default_value = "runs/bench-align")]
    pub out: std::path::PathBuf,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// align: write into a non-empty `--out` that `bench align` did not write (the configs' `overwrite`).
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// One benchmark row.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Row {
    pub model: String,
    pub what: String,
    pub seconds: f64,
    /// dpo: training steps per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps_per_s: Option<f64>,
    /// dpo: preference pairs per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pairs_per_s: Option<f64>,
    /// CUDA only: the high-water mark of candle's device allocations during the timed steps (the stream-ordered
    /// memory pool's `USED_MEM_HIGH`), bytes. Excludes the CUDA context and cuBLAS workspaces.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_alloc_bytes: Option<u64>,
    /// CUDA only: device memory in use on the whole card (`cuMemGetInfo` total − free) right after a step's
    /// backward pass, the largest seen, bytes. Includes the context, cuBLAS and other processes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_used_bytes: Option<u64>,
    /// dpo on CPU: the process's peak resident memory so far (`VmHWM`, not reset between rows), bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_peak_rss_bytes: Option<u64>,
    /// dpo: number of trained parameters (LoRA adapters or the whole UNet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trainable_params: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latent: Option<usize>,
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
            ..Default::default()
        },
        Row {
            model: name.into(),
            what: format!("unet forward+backward b{batch} {hw}x{hw}"),
            seconds: fb,
            ..Default::default()
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
        let hw = a.latent.unwrap_or_else(|| sample_size(&unet, 32));
        for &b in &a.batch {
            rows.extend(unet_rows(&name, &unet, b, hw, a.iters)?);
        }
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
    for &b in &a.batch {
        let s = time(a.iters, || {
            pipe.generate(&vec!["a red circle"; b], &[], &opts, None)?;
            sync(&device)
        })?;
        rows.push(Row {
            model: name.clone(),
            what: format!("pipeline s/step (b{b}, cfg, ddim)"),
            seconds: s / steps as f64,
            steps_per_s: Some(steps as f64 / s),
            ..Default::default()
        });
    }
    if a.sd15 {
        let cfg: UNet2DConditionConfig = serde_json::from_str(SD15_UNET_CONFIG)?;
        let p = Params::random(0, dtype, &device).trainable();
        let unet = UNet2DConditionModel::new(&p, cfg)?;
        let hw = a.latent.unwrap_or(32);
        for &b in &a.batch {
            rows.extend(unet_rows("sd15-random", &unet, b, hw, a.iters)?);
            rows.push(cfg_step_row("sd15-random", &unet, b, hw, a.iters)?);
        }
    }
    Ok(rows)
}

/// One classifier-free-guidance sampling step's UNet work: a forward pass on `2b` latents (conditional and
/// unconditional halves), without the scheduler update or VAE decode.
pub fn cfg_step_row(
    name: &str,
    unet: &UNet2DConditionModel,
    b: usize,
    hw: usize,
    iters: usize,
) -> Result<Row> {
    let dev = unet.device().clone();
    let dt = unet.dtype();
    let c = unet.config().in_channels;
    let ctx_dim = context_dim(unet)?;
    let x = Tensor::randn(0f32, 1., (2 * b, c, hw, hw), &dev)?.to_dtype(dt)?;
    let ehs = Tensor::randn(0f32, 1., (2 * b, 77, ctx_dim), &dev)?.to_dtype(dt)?;
    let t = Tensor::full(500f32, 2 * b, &dev)?;
    let s = time(iters, || {
        let y = unet.forward(&x.detach(), &t, &ehs.detach(), None)?.detach();
        drop(y);
        sync(&dev)
    })?;
    Ok(Row {
        model: name.into(),
        what: format!("sampling s/step b{b} {hw}x{hw} (cfg: unet fwd b{})", 2 * b),
        seconds: s,
        steps_per_s: Some(1.0 / s),
        ..Default::default()
    })
}

fn context_dim(unet: &UNet2DConditionModel) -> Result<usize> {
    Ok(unet.config().per_block(
        "cross_attention_dim",
        &unet.config().cross_attention_dim,
        unet.config().block_out_channels.len(),
    )?[0])
}

/// The UNet's `sample_size` (latent side), or `default`.
fn sample_size(unet: &UNet2DConditionModel, default: usize) -> usize {
    unet.config()
        .sample_size
        .as_ref()
        .and_then(|v| v.as_u64())
        .map_or(default, |v| v as usize)
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
            ..Default::default()
        },
        Row {
            model: model.into(),
            what: format!("{name} score+grad b{b} {h}x{w}: {:.2} img/s", b as f64 / fb),
            seconds: fb,
            ..Default::default()
        },
    ])
}

/// `diffpref bench rewards`: every CLIP-family reward on the tiny fixtures (`tiny-clip-hf`,
/// `tiny-open-clip`, `tiny-aesthetic`, `clip-tokenizer`, looked up next to --model) and, with --large, on
/// real-sized random weights, scoring 512x512 images (the resize to the model's size included).
pub fn rewards(a: &BenchArgs) -> Result<Vec<Row>> {
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
    let mut rows = Vec::new();
    for &b in &a.batch {
        rows.extend(rewards_at(
            a,
            b.max(1),
            &fixtures,
            &tok_dir,
            &tokenizer,
            &device,
            dtype,
        )?);
    }
    Ok(rows)
}

fn rewards_at(
    a: &BenchArgs,
    b: usize,
    fixtures: &std::path::Path,
    tok_dir: &std::path::Path,
    tokenizer: &diffpref_pipelines::tokenizer::ClipTokenizer,
    device: &Device,
    dtype: DType,
) -> Result<Vec<Row>> {
    use diffpref_rewards::aesthetic::{Aesthetic, AestheticHead};
    use diffpref_rewards::clip::{ClipConfig, ClipLoadOptions, ClipModel};
    use diffpref_rewards::{ClipReward, ClipScoring};
    use std::sync::Arc;
    let device = device.clone();
    let tokenizer = tokenizer.clone();
    let images = Tensor::rand(0f32, 1f32, (b, 3, 512, 512), &device)?;
    let prompts = vec!["a photograph of an astronaut riding a horse"; b];
    let mut rows = Vec::new();
    // A model folder with its own tokenizer (the fixtures' tiny models carry a small one) keeps it; one
    // without (open_clip checkpoints ship none) takes the CLIP tokenizer.
    let opts = |dir: &std::path::Path| ClipLoadOptions {
        tokenizer: diffpref_rewards::clip::find_tokenizer_dir(dir)
            .is_none()
            .then(|| tok_dir.to_path_buf()),
        ..Default::default()
    };
    let hf = fixtures.join("tiny-clip-hf");
    for scoring in [ClipScoring::ClipScore, ClipScoring::PickScore] {
        let r = ClipReward::load(&hf, scoring, &opts(&hf), dtype, &device)?;
        rows.extend(reward_rows("tiny-clip-hf", &r, &images, &prompts, a.iters)?);
    }
    let oc = fixtures.join("tiny-open-clip");
    let hps = ClipReward::load(&oc, ClipScoring::Hps, &opts(&oc), dtype, &device)?;
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

/// `diffpref bench dpo`: Diffusion-DPO training steps per second, through the training engine's loop
/// ([`crate::engine::trainer`]). Each step is what `train dpo` does per optimizer step without data loading:
/// the policy forward on `[winners; losers]` (2b latents) with graph, the reference forward (LoRA: the same
/// UNet with adapters off; --full: a frozen f32 copy), the sigmoid DPO loss in f32, backward, clipping and AdamW
/// on the trainable f32 master weights. Latents, noise, timesteps and text states are random and reused (no
/// data loading, no text encoder, no VAE). One warm-up step, then `--iters` timed ones; no checkpoints.
pub fn dpo(a: &BenchArgs) -> Result<Vec<Row>> {
    use crate::engine::hooks::Hooks;
    use crate::engine::policy::Policy;
    use crate::engine::trainer::{train, TrainerSettings};
    use crate::train::lora::LoraConfig;
    use diffpref_pipelines::schedulers::SchedulerConfig;
    let device = a.compute.device()?;
    let dtype = a.compute.dtype()?;
    anyhow::ensure!(
        !a.full || dtype == DType::F32,
        "--full trains the UNet's own weights, kept in f32: use --dtype f32 (LoRA trains f32 adapters on a \
         bf16/f16 UNet)"
    );
    // The UNet's config, a way to build it (trainable or frozen, in a dtype) and its noise schedule.
    let (name, unet_cfg, sched_cfg, files) = if a.sd15 {
        let cfg: UNet2DConditionConfig = serde_json::from_str(SD15_UNET_CONFIG)?;
        (
            "sd15-random".to_string(),
            cfg,
            SchedulerConfig::sd15(),
            None,
        )
    } else {
        let dir = resolve_model(&a.model, None).with_context(|| format!("--model {}", a.model))?;
        let name = dir
            .file_name()
            .and_then(|s| s.to_str())
            .unwrap_or("model")
            .to_string();
        let cfg = UNet2DConditionConfig::load(&dir.join("unet/config.json"))?;
        let sched_path = dir.join("scheduler/scheduler_config.json");
        let sched = if sched_path.exists() {
            SchedulerConfig::from_file(&sched_path)?
        } else {
            SchedulerConfig::sd15()
        };
        let files = diffpref_pipelines::weights::find_weight_files(
            &dir.join("unet"),
            "diffusion_pytorch_model",
            None,
        )?;
        (name, cfg, sched, Some(files))
    };
    let params = |dt: DType| -> Result<Params> {
        Ok(match &files {
            Some(f) => Params::from_files(f, dt, &device)?,
            None => Params::random(0, dt, &device),
        })
    };
    let mode = if a.full {
        "full".to_string()
    } else {
        format!("lora r{}", a.rank)
    };
    let mut rows = Vec::new();
    for &b in &a.batch {
        let b = b.max(1);
        // Policy and reference (fresh per row: every row starts from the same weights).
        let (unet, policy) = if a.full {
            let p = params(DType::F32)?.trainable();
            let unet = UNet2DConditionModel::new(&p, unet_cfg.clone())?;
            let frozen = UNet2DConditionModel::new(&params(DType::F32)?, unet_cfg.clone())?;
            (unet, Policy::with_frozen_reference(p.vars(), frozen))
        } else {
            let unet = UNet2DConditionModel::new(&params(dtype)?, unet_cfg.clone())?;
            let lora = LoraConfig {
                rank: a.rank,
                ..Default::default()
            };
            let policy = Policy::lora(&unet, &lora, 0, &device)?;
            (unet, policy)
        };
        let n_trainable: usize = policy.params().iter().map(|(_, v)| v.elem_count()).sum();
        unet.set_gradient_checkpointing(a.gradient_checkpointing);
        let hw = a.latent.unwrap_or_else(|| sample_size(&unet, 64));
        let mut method = BenchDpo::new(unet, &sched_cfg, b, hw, dtype)?;
        let run_dir = tempfile::tempdir()?;
        let iters = a.iters.max(1);
        let settings = TrainerSettings {
            optim: crate::engine::config::OptimConfig {
                lr: 1e-5,
                batch_size: b,
                max_steps: iters as u64 + 1,
                ..Default::default()
            },
            log: crate::engine::config::LogConfig {
                checkpoint_every: 0,
                progress: false,
                ..Default::default()
            },
            output_dir: run_dir.path().to_path_buf(),
            resume: false,
            checkpoints: false,
            config: serde_json::json!({"bench": "dpo"}),
        };
        let outcome = train(&settings, &policy, &mut method, &mut Hooks::none(), None)?;
        let last_loss = outcome.last_metric("loss").unwrap_or(f64::NAN);
        anyhow::ensure!(
            last_loss.is_finite(),
            "dpo bench: the loss is {last_loss} (b{b}, {mode}, {dtype:?})"
        );
        // Step 1 is the warm-up (kernel loading, cuBLAS handles, AdamW state allocation).
        let records = crate::train::metrics::read_metrics(&outcome.metrics)?;
        let timed: Vec<f64> = crate::train::metrics::series(&records, "step_s")
            .into_iter()
            .filter(|(s, _)| *s > 1.0)
            .map(|(_, v)| v)
            .collect();
        let secs = timed.iter().sum::<f64>() / timed.len().max(1) as f64;
        let peak = method.peak;
        let device_used = method.device_used;
        let ckpt = if a.gradient_checkpointing {
            ", checkpointed"
        } else {
            ""
        };
        let mut what = format!(
            "dpo {mode}{ckpt} b{b} {hw}x{hw}: {:.3} steps/s, {:.2} pairs/s",
            1.0 / secs,
            b as f64 / secs
        );
        if let Some(p) = peak {
            what.push_str(&format!(", peak {:.2} GiB", gib(p)));
        }
        if let (None, Some(rss)) = (peak, host_peak_rss_bytes()) {
            if device.is_cpu() {
                what.push_str(&format!(", peak RSS {:.2} GiB", gib(rss)));
            }
        }
        rows.push(Row {
            model: name.clone(),
            what,
            seconds: secs,
            steps_per_s: Some(1.0 / secs),
            pairs_per_s: Some(b as f64 / secs),
            peak_alloc_bytes: peak,
            device_used_bytes: (device_used > 0).then_some(device_used),
            host_peak_rss_bytes: if device.is_cpu() {
                host_peak_rss_bytes()
            } else {
                None
            },
            trainable_params: Some(n_trainable as u64),
            batch: Some(b),
            latent: Some(hw),
        });
    }
    Ok(rows)
}

/// The DPO step of `bench dpo` as a [`crate::engine::Method`]: one fixed random pair batch.
struct BenchDpo {
    unet: UNet2DConditionModel,
    schedule: diffpref_pipelines::schedulers::NoiseSchedule,
    latents_w: Tensor,
    latents_l: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    ehs: Tensor,
    added: Option<diffpref_pipelines::models::unet::AddedCond>,
    /// Peak device memory after the warm-up step, and the most memory in use after a step (CUDA).
    peak: Option<u64>,
    device_used: u64,
    peak_tracked: bool,
}

impl BenchDpo {
    fn new(
        unet: UNet2DConditionModel,
        sched: &diffpref_pipelines::schedulers::SchedulerConfig,
        b: usize,
        hw: usize,
        dtype: DType,
    ) -> Result<Self> {
        use diffpref_pipelines::models::unet::AddedCond;
        let device = unet.device().clone();
        let num_t = sched.num_train_timesteps.max(1) as i64;
        let c = unet.config().in_channels;
        let ctx_dim = context_dim(&unet)?;
        let added = if unet.config().uses_text_time() {
            let time_dim = unet.config().addition_time_embed_dim.unwrap_or(0);
            let in_dim = unet
                .config()
                .projection_class_embeddings_input_dim
                .unwrap_or(0);
            let d = in_dim.saturating_sub(6 * time_dim);
            Some(AddedCond {
                text_embeds: Tensor::randn(0f32, 1., (b, d), &device)?.to_dtype(dtype)?,
                time_ids: Tensor::from_vec(
                    [1024f32, 1024., 0., 0., 1024., 1024.].repeat(b),
                    (b, 6),
                    &device,
                )?
                .to_dtype(dtype)?,
            })
        } else {
            None
        };
        let t: Vec<i64> = (0..b as i64).map(|i| (137 * i + 500) % num_t).collect();
        Ok(BenchDpo {
            schedule: diffpref_pipelines::schedulers::NoiseSchedule::new(sched)?,
            latents_w: Tensor::randn(0f32, 1., (b, c, hw, hw), &device)?,
            latents_l: Tensor::randn(0f32, 1., (b, c, hw, hw), &device)?,
            noise: Tensor::randn(0f32, 1., (b, c, hw, hw), &device)?,
            timesteps: Tensor::from_vec(t, b, &device)?,
            ehs: Tensor::randn(0f32, 1., (b, 77, ctx_dim), &device)?.to_dtype(dtype)?,
            added,
            unet,
            peak: None,
            device_used: 0,
            peak_tracked: false,
        })
    }
}

impl crate::engine::Method for BenchDpo {
    fn name(&self) -> &str {
        "bench-dpo"
    }

    fn unit(&self) -> &str {
        "pairs"
    }

    fn micro_step(
        &mut self,
        ctx: &crate::engine::StepContext<'_>,
    ) -> Result<crate::engine::MicroStep> {
        use crate::methods::dpo::{
            pair_errors, pair_loss, DpoLossConfig, PairBatch, TimestepWeighting,
        };
        let batch = PairBatch {
            latents_w: &self.latents_w,
            latents_l: &self.latents_l,
            noise: &self.noise,
            timesteps: &self.timesteps,
            encoder_hidden_states: &self.ehs,
            added: self.added.as_ref(),
            uncond: None,
        };
        let errors = pair_errors(
            &self.unet,
            ctx.policy.reference().as_ref(),
            &self.schedule,
            TimestepWeighting::None,
            &batch,
        )?;
        let (loss, _) = pair_loss(&DpoLossConfig::default(), &errors, None)?;
        Ok(crate::engine::MicroStep {
            loss,
            metrics: Vec::new(),
            units: self.latents_w.dim(0)?,
            about: "random pairs".into(),
        })
    }

    fn after_step(
        &mut self,
        ctx: &crate::engine::StepContext<'_>,
    ) -> Result<Vec<(&'static str, f64)>> {
        let device = self.unet.device().clone();
        sync(&device)?;
        if let Some(u) = gpu_mem::used_bytes(&device) {
            self.device_used = self.device_used.max(u);
        }
        if ctx.step == 0 {
            self.peak_tracked = gpu_mem::reset_peak(&device);
        } else if self.peak_tracked {
            self.peak = gpu_mem::peak_bytes(&device);
        }
        Ok(Vec::new())
    }

    fn state(&self) -> Result<serde_json::Value> {
        Ok(serde_json::Value::Null)
    }

    fn load_state(&mut self, _state: serde_json::Value) -> Result<()> {
        Ok(())
    }
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// The process's peak resident set size so far (`VmHWM`), Linux only.
pub fn host_peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Device-memory readings on CUDA. candle has no allocator statistics, but cudarc allocates with
/// `cuMemAllocAsync` from the device's default memory pool, whose `USED_MEM_HIGH` attribute is the exact
/// high-water mark of live allocations (it can be reset). `cuMemGetInfo` gives the card's total use.
/// Without the `cuda` feature, or on CPU, every reading is `None`.
pub mod gpu_mem {
    use candle_core::Device;

    #[cfg(feature = "cuda")]
    mod imp {
        use candle_core::cuda_backend::cudarc::driver::{result, sys};
        use candle_core::Device;

        fn pool(dev: &Device) -> Option<sys::CUmemoryPool> {
            let Device::Cuda(c) = dev else { return None };
            let stream = c.cuda_stream();
            let ctx = stream.context();
            if !ctx.has_async_alloc() {
                return None;
            }
            ctx.bind_to_thread().ok()?;
            unsafe { result::device::get_default_mem_pool(ctx.cu_device()).ok() }
        }

        pub fn reset_peak(dev: &Device) -> bool {
            let Some(p) = pool(dev) else { return false };
            let mut zero: sys::cuuint64_t = 0;
            unsafe {
                result::mem_pool::set_attribute(
                    p,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    &mut zero as *mut sys::cuuint64_t as *mut std::ffi::c_void,
                )
                .is_ok()
            }
        }

        pub fn peak_bytes(dev: &Device) -> Option<u64> {
            let p = pool(dev)?;
            let mut v: sys::cuuint64_t = 0;
            unsafe {
                result::mem_pool::get_attribute(
                    p,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    &mut v as *mut sys::cuuint64_t as *mut std::ffi::c_void,
                )
                .ok()?;
            }
            Some(v)
        }

        pub fn used_bytes(dev: &Device) -> Option<u64> {
            let Device::Cuda(c) = dev else { return None };
            let (free, total) = c.cuda_stream().context().mem_get_info().ok()?;
            Some(total.saturating_sub(free) as u64)
        }
    }

    #[cfg(not(feature = "cuda"))]
    mod imp {
        use candle_core::Device;
        pub fn reset_peak(_: &Device) -> bool {
            false
        }
        pub fn peak_bytes(_: &Device) -> Option<u64> {
            None
        }
        pub fn used_bytes(_: &Device) -> Option<u64> {
            None
        }
    }

    /// Resets the pool's high-water mark; `false` when there is no pool to read (CPU, no async allocation).
    pub fn reset_peak(dev: &Device) -> bool {
        imp::reset_peak(dev)
    }

    /// Peak bytes of live pool allocations since the last [`reset_peak`].
    pub fn peak_bytes(dev: &Device) -> Option<u64> {
        imp::peak_bytes(dev)
    }

    /// Bytes in use on the whole card now (total − free).
    pub fn used_bytes(dev: &Device) -> Option<u64> {
        imp::used_bytes(dev)
    }
}

pub fn print(rows: &[Row]) {
    println!("{:<16} {:<44} {:>12}", "model", "measure", "seconds");
    for r in rows {
        println!("{:<16} {:<44} {:>12.4}", r.model, r.what, r.seconds);
    }
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.suite == Suite::Align {
        return align(&a);
    }
    let rows = match a.suite {
        Suite::Foundation => foundation(&a)?,
        Suite::Rewards => rewards(&a)?,
        Suite::Dpo => dpo(&a)?,
        Suite::Align => unreachable!("handled above"),
    };
    print(&rows);
    if let Some(path) = &a.json {
        let doc = serde_json::json!({
            "suite": format!("{:?}", a.suite).to_lowercase(),
            "device": a.compute.device,
            "dtype": a.compute.dtype,
            "iters": a.iters,
            "rows": rows,
        });
        crate::io::write_json(path, &doc)?;
    }
    Ok(())
}

/// The `--set` overrides of `bench align` for each configuration, by the key's section.
#[derive(Default)]
struct Overrides {
    dpo: Vec<String>,
    grpo: Vec<String>,
    lpo: Vec<String>,
    lrm: Vec<String>,
    spo: Vec<String>,
    spm: Vec<String>,
    seppo: Vec<String>,
    adjoint: Vec<String>,
}

fn split_overrides(overrides: &[String]) -> Overrides {
    let mut s = Overrides::default();
    for o in overrides {
        let key = o.split(['.', '=']).next().unwrap_or("").trim();
        match key {
            "loss" | "data" => {
                s.dpo.push(o.clone());
                s.seppo.push(o.clone());
            }
            "grpo" => s.grpo.push(o.clone()),
            "reward" => {
                s.grpo.push(o.clone());
                s.spo.push(o.clone());
                s.seppo.push(o.clone());
                s.adjoint.push(o.clone());
            }
            "rollout" => {
                s.grpo.push(o.clone());
                s.lpo.push(o.clone());
                s.spo.push(o.clone());
                s.adjoint.push(o.clone());
            }
            "lpo" => s.lpo.push(o.clone()),
            "spo" => s.spo.push(o.clone()),
            "seppo" => s.seppo.push(o.clone()),
            "adjoint" => s.adjoint.push(o.clone()),
            "lrm" => s
                .lrm
                .push(o.trim_start().trim_start_matches("lrm.").to_string()),
            "spm" => s
                .spm
                .push(o.trim_start().trim_start_matches("spm.").to_string()),
            _ => {
                s.dpo.push(o.clone());
                s.grpo.push(o.clone());
                s.lpo.push(o.clone());
                s.spo.push(o.clone());
                s.seppo.push(o.clone());
                s.adjoint.push(o.clone());
            }
        }
    }
    s
}

/// `bench align`: see [`crate::align`].
fn align(a: &BenchArgs) -> Result<()> {
    let mut overrides = a.overrides.clone();
    if a.overwrite {
        overrides.insert(0, "overwrite=true".into());
    }
    let o = split_overrides(&overrides);
    let dpo = match &a.config {
        Some(p) => crate::methods::pairwise::DpoConfig::load(Some(p), &o.dpo)?,
        None => crate::assets::default_dpo_config(&o.dpo)?,
    };
    dpo.validate()?;
    let grpo = match &a.grpo_config {
        Some(p) => crate::methods::grpo::GrpoConfig::load(Some(p), &o.grpo)?,
        None => crate::assets::default_grpo_config(&o.grpo)?,
    };
    if a.methods.iter().any(|m| m == "grpo") {
        grpo.validate()?;
    }
    let lrm = match &a.lrm_config {
        Some(p) => crate::methods::lrm::LrmConfig::load(Some(p), &o.lrm)?,
        None => crate::assets::default_lrm_config(&o.lrm)?,
    };
    let lpo = match &a.lpo_config {
        Some(p) => crate::methods::lpo::LpoConfig::load(Some(p), &o.lpo)?,
        None => crate::assets::default_lpo_config(&o.lpo)?,
    };
    if a.methods.iter().any(|m| m == "lpo") {
        lrm.validate()?;
        // The row trains its own LRM: the configured `lpo.lrm` is replaced.
        let mut check = lpo.clone();
        check.lpo.lrm = Some("lrm".into());
        check.validate()?;
    }
    let spm = match &a.spm_config {
        Some(p) => crate::methods::spm::SpmConfig::load(Some(p), &o.spm)?,
        None => crate::assets::default_spm_config(&o.spm)?,
    };
    let spo = match &a.spo_config {
        Some(p) => crate::methods::spo::SpoConfig::load(Some(p), &o.spo)?,
        None => crate::assets::default_spo_config(&o.spo)?,
    };
    if a.methods.iter().any(|m| m == "spo") {
        let mut check = spo.clone();
        if check.spo.scorer == crate::methods::spo::SpoScorer::Spm {
            spm.validate()?;
            // The row trains its own SPM: the configured `spo.spm` is replaced.
            check.spo.spm = Some("spm".into());
        }
        check.validate()?;
    }
    let seppo = match &a.seppo_config {
        Some(p) => crate::methods::seppo::SeppoConfig::load(Some(p), &o.seppo)?,
        None => crate::assets::default_seppo_config(&o.seppo)?,
    };
    if a.methods.iter().any(|m| m.starts_with("seppo")) {
        seppo.validate()?;
    }
    let adjoint = match &a.adjoint_config {
        Some(p) => crate::methods::adjoint::AdjointConfig::load(Some(p), &o.adjoint)?,
        None => crate::assets::default_adjoint_config(&o.adjoint)?,
    };
    if a.methods.iter().any(|m| m == "adjoint") {
        adjoint.validate()?;
    }
    let progress = dpo.run.log.progress;
    let cfgs = crate::align::AlignConfigs {
        dpo,
        grpo,
        lrm,
        lpo,
        spm,
        spo,
        seppo,
        adjoint,
        robustness: crate::align::Robustness {
            lists: a.fresh_lists,
            seeds: a.fresh_seeds,
            prompts: a.fresh_prompts,
        },
        train_seeds: a.train_seeds,
    };
    let report = crate::align::run_align(&cfgs, &a.methods, &a.out, progress)?;
    print!("{}", crate::align::format_table(&report));
    println!(
        "report: {}\ngrid: {}",
        report.report.display(),
        report.grid.display()
    );
    if let Some(path) = &a.json {
        crate::io::copy_atomic(&report.report, path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn align_overrides_go_to_the_configurations_that_have_their_keys() {
        let o: Vec<String> = [
            "optim.max_steps=3",
            "loss.beta=100",
            "grpo.group_size=4",
            "seed=2",
            "rollout.steps=5",
            "lpo.k=3",
            "lrm.optim.max_steps=7",
            "spo.k=2",
            "spm.optim.max_steps=9",
            "reward.kind=shapes",
            "seppo.k=3",
            "data.resolution=32",
            "adjoint.reward_scale=10",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let s = split_overrides(&o);
        assert_eq!(
            s.dpo,
            [
                "optim.max_steps=3",
                "loss.beta=100",
                "seed=2",
                "data.resolution=32"
            ]
        );
        assert_eq!(
            s.seppo,
            [
                "optim.max_steps=3",
                "loss.beta=100",
                "seed=2",
                "reward.kind=shapes",
                "seppo.k=3",
                "data.resolution=32"
            ]
        );
        assert_eq!(
            s.grpo,
            [
                "optim.max_steps=3",
                "grpo.group_size=4",
                "seed=2",
                "rollout.steps=5",
                "reward.kind=shapes"
            ]
        );
        assert_eq!(
            s.lpo,
            ["optim.max_steps=3", "seed=2", "rollout.steps=5", "lpo.k=3"]
        );
        assert_eq!(
            s.adjoint,
            [
                "optim.max_steps=3",
                "seed=2",
                "rollout.steps=5",
                "reward.kind=shapes",
                "adjoint.reward_scale=10"
            ]
        );
        assert_eq!(s.lrm, ["optim.max_steps=7"]);
        assert_eq!(s.spm, ["optim.max_steps=9"]);
        assert_eq!(
            s.spo,
            [
                "optim.max_steps=3",
                "seed=2",
                "rollout.steps=5",
                "spo.k=2",
                "reward.kind=shapes"
            ]
        );
    }

    fn args(suite: Suite) -> BenchArgs {
        BenchArgs {
            suite,
            model: concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd").into(),
            sd15: false,
            large: false,
            iters: 1,
            batch: vec![1],
            latent: None,
            full: false,
            rank: 4,
            gradient_checkpointing: false,
            methods: vec!["dpo".into()],
            config: None,
            grpo_config: None,
            lpo_config: None,
            lrm_config: None,
            spo_config: None,
            spm_config: None,
            seppo_config: None,
            adjoint_config: None,
            fresh_lists: 0,
            fresh_seeds: 2,
            fresh_prompts: 48,
            train_seeds: 1,
            overrides: Vec::new(),
            out: "runs/bench-align".into(),
            json: None,
            overwrite: false,
            compute: ComputeArgs {
                device: "cpu".into(),
                dtype: "f32".into(),
            },
        }
    }

    #[test]
    fn dpo_suite_times_a_lora_step_and_writes_json() {
        let tmp = tempfile::tempdir().unwrap();
        let json = tmp.path().join("dpo.json");
        let mut a = args(Suite::Dpo);
        a.latent = Some(8);
        a.json = Some(json.clone());
        run(a).unwrap();
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(doc["suite"], "dpo");
        let rows = doc["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert!(r["steps_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["batch"], 1);
        assert_eq!(r["latent"], 8);
        // Rank 4 on to_q/to_k/to_v/to_out.0 of tiny-sd's attention layers: 4 (in + out) per projection, counted
        // from the weights file.
        let unet = candle_core::safetensors::load(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/tiny-sd/unet/diffusion_pytorch_model.safetensors"
            ),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let want: usize = unet
            .iter()
            .filter(|(k, _)| {
                [
                    ".to_q.weight",
                    ".to_k.weight",
                    ".to_v.weight",
                    ".to_out.0.weight",
                ]
                .iter()
                .any(|s| k.ends_with(s))
            })
            .map(|(_, t)| 4 * (t.dims()[0] + t.dims()[1]))
            .sum();
        assert!(want > 0);
        assert_eq!(r["trainable_params"].as_u64().unwrap(), want as u64);
        assert!(
            r.get("peak_alloc_bytes").is_none(),
            "no pool statistics on CPU: {r}"
        );
        assert!(
            r["what"].as_str().unwrap().contains("lora r4 b1 8x8"),
            "{r}"
        );
        // The same step with gradient checkpointing.
        let mut a = args(Suite::Dpo);
        a.latent = Some(8);
        a.gradient_checkpointing = true;
        let rows = dpo(&a).unwrap();
        assert!(
            rows[0].what.contains("lora r4, checkpointed b1 8x8"),
            "{}",
            rows[0].what
        );
        assert!(rows[0].steps_per_s.unwrap() > 0.0);
    }

    #[test]
    fn dpo_suite_full_needs_f32() {
        let mut a = args(Suite::Dpo);
        a.full = true;
        a.compute.dtype = "bf16".into();
        let e = dpo(&a).unwrap_err().to_string();
        assert!(e.contains("--dtype f32"), "{e}");
    }
}
