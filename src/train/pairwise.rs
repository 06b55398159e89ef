//! The offline pairwise trainer behind `diffpref train dpo`: Diffusion-DPO and the rest of its loss family
//! ([`crate::methods::dpo`]) on preference pairs (JSONL manifests or Pick-a-Pic parquet shards), with LoRA or
//! full fine-tuning, AdamW, LR schedules, clipping, accumulation, EMA, resumable checkpoints, metrics and
//! validation grids.
//!
//! One optimizer step: for each of `grad_accum` micro-batches of `batch_size` pairs, the pair images get one
//! shared crop/flip, are encoded by the VAE (a fresh posterior sample each time, as the official code), each
//! pair draws one timestep `t ~ U{0..T-1}` and one noise `ε` shared by winner and loser, the policy (with graph)
//! and the reference (adapters off, or the frozen copy) predict on `[winners; losers]`, and the loss of
//! [`crate::methods::dpo::pair_loss`] is backpropagated into the trainable parameters only. Gradients are
//! averaged over micro-batches, clipped by global norm, and AdamW updates the f32 master weights.
//!
//! Every random draw comes from two serialisable streams (`noise`: timesteps and noise; `data`: crops, flips,
//! caption dropout, VAE posterior samples) and the dataset position is saved with each checkpoint, so a resumed
//! CPU run ends with weights identical to an uninterrupted one.

use crate::cli::score::{load_reward_opt, RewardKind};
use crate::data::cache::{encode_posteriors, ImageId};
use crate::data::preprocess::preprocess_image;
use crate::data::{
    load_manifest, load_unpaired_manifest, maybe_drop_caption, preprocess_pair, CachedLatent,
    DatasetPosition, LatentCache, ManifestOptions, PairDataset, PairSource, PickapicIndex,
    PickapicOptions, PreprocessConfig, TextEmbedCache, Transform, UnpairedSample,
};
use crate::eval::{
    compare, comparison_grid, per_prompt, read_prompts, sample_and_score, Comparison,
    SampleOptions, Samples,
};
use crate::methods::dpo::{
    kto_unpaired_loss, pair_errors, pair_loss, single_errors, DpoLossConfig, DpoStats, LossKind,
    PairBatch, Reference,
};
use crate::train::checkpoint::{self, load_vars, save_vars, Checkpointer, StopFlag};
use crate::train::ema::{Ema, EmaConfig};
use crate::train::lora::{LoadMode, LoraConfig, LoraFormat, LoraSet};
use crate::train::metrics::{plot_curves, read_metrics, series, MetricsWriter, TrainProgress};
use crate::train::optim::{clip_grad_norm, AdamW, AdamWConfig, GradAccumulator};
use crate::train::rng::Rng;
use crate::train::schedule::{LrSchedule, ScheduleKind};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use diffpref_pipelines::loading::{resolve_model, LoadOptions, PromptEmbeds, StableDiffusion};
use diffpref_pipelines::models::unet::{AddedCond, UNet2DConditionModel};
use diffpref_pipelines::pipeline::{seeded_noise, GenerateOptions, Pipeline};
use diffpref_pipelines::schedulers::{NoiseSchedule, SchedulerConfig};
use diffpref_pipelines::weights::{find_weight_files, Params};
use diffpref_rewards::Reward;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What is trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TrainMode {
    /// LoRA adapters on the UNet (the reference is the base model with adapters off). Default.
    #[default]
    Lora,
    /// Every UNet weight (the reference is a frozen copy; f32 only).
    Full,
}

/// `[data]`: where the pairs come from and how images are prepared.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// JSONL manifest `{"prompt", "chosen", "rejected"[, "label"]}` (paths relative to it). Default: none.
    pub manifest: Option<PathBuf>,
    /// Pick-a-Pic v2 parquet shards (used when no manifest is given). Default: none.
    pub parquet: Vec<PathBuf>,
    /// Unpaired JSONL manifest `{"prompt", "image", "desirable"}` (paths relative to it) for
    /// `loss.kind = "kto"`: each image gets its own noise and timestep, as the Diffusion-KTO code. Default: none.
    pub unpaired_manifest: Option<PathBuf>,
    /// Training resolution in pixels (shorter side resized, then cropped square). Default 512.
    pub resolution: u32,
    /// Centre crop (else a random crop). Default true.
    pub center_crop: bool,
    /// Random horizontal flip, the same for both images of a pair. Default false.
    pub random_flip: bool,
    /// Probability of training a pair on the empty prompt (the official code uses 0.2). Default 0.
    pub caption_dropout: f64,
    /// Drop tie pairs (label 0.5), as the original. Default true; keep them for cDPO-style training.
    pub drop_ties: bool,
    /// Skip bad rows or images (counted in the log) instead of stopping. Default false.
    pub skip_bad: bool,
    /// Folder for cached VAE posteriors and text embeddings. Default: none (no caching).
    pub cache_dir: Option<PathBuf>,
    /// Shuffle the pairs every epoch. Default true.
    pub shuffle: bool,
    /// Which latent of the VAE posterior the images are trained as: `sample` (a fresh draw every step, as
    /// the official code and diffusers' scripts) or `mode` (the posterior mean, no draw). SD's VAE has a
    /// posterior std of ~1e-3 of the latent scale, so the two agree there; a VAE trained with a larger KL
    /// weight (such as the shapes world's, std ~0.5 of the latent spread) adds an independent draw to the
    /// winner and the loser that swamps their difference, and `mode` removes it. Default `sample`.
    pub vae_posterior: VaePosterior,
    /// Train on the stored sampler latents a manifest names (`chosen_latent`/`rejected_latent`, written by
    /// `data make-prefs`) instead of VAE encodings of the PNGs, when every pair of a batch has them. They are
    /// exactly what the model sampled; re-encoding an 8-bit decode does not give them back (see
    /// [`crate::data::latents`]). Needs `random_flip = false` and images at `resolution`. Default true.
    pub stored_latents: bool,
}

/// `[data] vae_posterior`: a posterior sample or its mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum VaePosterior {
    #[default]
    Sample,
    Mode,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            manifest: None,
            parquet: Vec::new(),
            unpaired_manifest: None,
            resolution: 512,
            center_crop: true,
            random_flip: false,
            caption_dropout: 0.0,
            drop_ties: true,
            skip_bad: false,
            cache_dir: None,
            shuffle: true,
            vae_posterior: VaePosterior::Sample,
            stored_latents: true,
        }
    }
}

/// `[optim]`: optimizer, schedule and batch shape.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Base learning rate. Default 1e-5 (diffusers' DPO LoRA recipe).
    pub lr: f64,
    /// Multiply `lr` by the pairs per optimizer step (`batch_size · grad_accum`), as the official launchers
    /// (1e-8 per pair there). Default false.
    pub scale_lr: bool,
    /// AdamW betas, eps and decoupled weight decay. Defaults 0.9, 0.999, 1e-8, 1e-2.
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clipping (0 = off). Default 1.0.
    pub max_grad_norm: f64,
    /// constant | constant_with_warmup | cosine | linear. Default constant_with_warmup.
    pub schedule: ScheduleKind,
    /// Warmup steps (optimizer steps). Default 0.
    pub warmup_steps: u64,
    /// Pairs per micro-batch. Default 1.
    pub batch_size: usize,
    /// Micro-batches per optimizer step. Default 1.
    pub grad_accum: usize,
    /// Optimizer steps of the run. Default 100.
    pub max_steps: u64,
    /// Keep an EMA of the trained weights with this decay (diffusers' EMAModel warmup); 0 = off. Default 0.
    pub ema_decay: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1e-5,
            scale_lr: false,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            max_grad_norm: 1.0,
            schedule: ScheduleKind::ConstantWithWarmup,
            warmup_steps: 0,
            batch_size: 1,
            grad_accum: 1,
            max_steps: 100,
            ema_decay: 0.0,
        }
    }
}

/// `[log]`: metrics, checkpoints.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Save a checkpoint every N optimizer steps (and at the end). Default 100.
    pub checkpoint_every: u64,
    /// Checkpoints kept (older ones are deleted once a newer one is complete). Default 3.
    pub keep_last: usize,
    /// Layout of the saved LoRA: peft (diffusers `load_lora_weights`) | kohya. Default peft.
    pub lora_format: LoraFormat,
    /// Show a progress bar. Default true.
    pub progress: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            checkpoint_every: 100,
            keep_last: 3,
            lora_format: LoraFormat::Peft,
            progress: true,
        }
    }
}

/// `[validation]`: a grid of fixed prompts with fixed noise, base vs current, every N steps.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationConfig {
    /// Every N optimizer steps (0 = never). Default 0.
    pub every: u64,
    /// Prompts (rows of the grid). Default: none.
    pub prompts: Vec<String>,
    /// Sampling steps. Default 20.
    pub steps: usize,
    /// Guidance scale. Default 7.5.
    pub guidance: f64,
    /// Seed of the shared initial noise. Default 0.
    pub seed: u64,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        ValidationConfig {
            every: 0,
            prompts: Vec::new(),
            steps: 20,
            guidance: 7.5,
            seed: 0,
        }
    }
}

/// `[eval]`: held-out reward of samples before training, every `every` steps and after (see [`crate::eval`]):
/// the same prompts and initial noise each time, so the change is paired. Writes `eval.json` and
/// `before_after.png`, logs `eval_reward` to the metrics and plots it with the loss.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Held-out prompts, one per line. Default: none (no evaluation).
    pub prompts: Option<PathBuf>,
    /// shapes | clip | pickscore | hps | aesthetic | imagereward. Default shapes.
    pub reward: String,
    /// Reward weights (folder, file or hub id; not used by shapes). Default: none.
    pub reward_weights: Option<String>,
    /// `aesthetic` only: the CLIP backbone. Default: none.
    pub reward_clip: Option<String>,
    /// Samples per prompt. Default 4.
    pub samples: usize,
    /// Sampling steps. Default 20.
    pub steps: usize,
    /// Guidance scale. Default 7.5.
    pub guidance: f64,
    /// Sampler (ddim, ddpm, euler, euler-a, dpmpp-2m). Default: the model's scheduler.
    pub scheduler: Option<String>,
    /// Seed of the initial noise. Default 0.
    pub seed: u64,
    /// Also evaluate every N optimizer steps (0 = before and after only). Default 0.
    pub every: u64,
    /// Images per pipeline call. Default 16.
    pub batch_size: usize,
    /// Prompts shown in before_after.png. Default 8.
    pub grid_prompts: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            prompts: None,
            reward: "shapes".into(),
            reward_weights: None,
            reward_clip: None,
            samples: 4,
            steps: 20,
            guidance: 7.5,
            scheduler: None,
            seed: 0,
            every: 0,
            batch_size: 16,
            grid_prompts: 8,
        }
    }
}

impl EvalConfig {
    /// The sampling options of the evaluation.
    pub fn sample_options(&self) -> Result<SampleOptions> {
        Ok(SampleOptions {
            samples_per_prompt: self.samples,
            steps: self.steps,
            guidance: self.guidance,
            scheduler: crate::cli::generate::parse_scheduler(&self.scheduler)
                .context("[eval] scheduler")?,
            seed: self.seed,
            batch_size: self.batch_size,
        })
    }

    /// The reward named by `reward`.
    pub fn reward_kind(&self) -> Result<RewardKind> {
        <RewardKind as clap::ValueEnum>::from_str(&self.reward, true).map_err(|_| {
            anyhow::anyhow!(
                "[eval] reward = {:?}: expected shapes, clip, pickscore, hps, aesthetic or imagereward",
                self.reward
            )
        })
    }

    /// Loads the reward (f32) on `device`.
    pub fn load_reward(&self, device: &Device) -> Result<Box<dyn Reward>> {
        load_reward_opt(
            self.reward_kind()?,
            self.reward_weights.as_deref(),
            self.reward_clip.as_deref(),
            None,
            DType::F32,
            device,
        )
        .context("[eval] loading the reward (reward_weights)")
    }
}

/// A whole training run (`diffpref train dpo --config FILE.toml`). See `examples/dpo.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Model folder (diffusers layout) or hub id. Required.
    pub model: String,
    /// Weight variant to prefer (e.g. fp16). Default: none.
    pub variant: Option<String>,
    /// Run folder: checkpoints, metrics.jsonl, the final weights, plots, validation grids. Default runs/dpo.
    pub output_dir: PathBuf,
    /// Seed of every random stream. Default 0.
    pub seed: u64,
    /// cpu | cuda | cuda:N. Default cpu.
    pub device: String,
    /// Compute dtype of the model: f32 | bf16 | f16 (LoRA weights and losses stay f32). Default f32.
    pub dtype: String,
    /// Continue from the latest checkpoint in `output_dir` when there is one. Default true.
    pub resume: bool,
    /// lora | full. Default lora.
    pub mode: TrainMode,
    pub lora: LoraConfig,
    pub loss: DpoLossConfig,
    pub data: DataConfig,
    pub optim: OptimConfig,
    pub log: LogConfig,
    pub validation: ValidationConfig,
    pub eval: EvalConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: String::new(),
            variant: None,
            output_dir: PathBuf::from("runs/dpo"),
            seed: 0,
            device: "cpu".into(),
            dtype: "f32".into(),
            resume: true,
            mode: TrainMode::Lora,
            lora: LoraConfig::default(),
            loss: DpoLossConfig::default(),
            data: DataConfig::default(),
            optim: OptimConfig::default(),
            log: LogConfig::default(),
            validation: ValidationConfig::default(),
            eval: EvalConfig::default(),
        }
    }
}

/// Sets `key.path = value` in a TOML document; `value` is parsed as a TOML value, else taken as a string.
pub fn apply_override(doc: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, value) = assignment
        .split_once('=')
        .with_context(|| format!("--set {assignment}: expected key=value"))?;
    let (key, value) = (key.trim(), value.trim());
    let parsed: toml::Value = match format!("v = {value}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap(),
        Err(_) => toml::Value::String(value.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    let mut table = doc;
    for p in &parts[..parts.len() - 1] {
        table = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .with_context(|| format!("--set {assignment}: `{p}` is not a table"))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), parsed);
    Ok(())
}

impl TrainConfig {
    /// Reads a TOML config (or starts from the defaults) and applies `--set key=value` overrides. Unknown keys
    /// are errors naming the key.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<TrainConfig> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read config {}", p.display()))?;
                Self::from_toml(&text, &p.display().to_string(), overrides)
            }
            None => Self::from_toml("", "the configuration", overrides),
        }
    }

    /// Parses a TOML configuration (`what` names it in errors) and applies `--set` overrides.
    pub fn from_toml(text: &str, what: &str, overrides: &[String]) -> Result<TrainConfig> {
        let mut doc: toml::Table = text
            .parse()
            .with_context(|| format!("{what}: invalid TOML"))?;
        for o in overrides {
            apply_override(&mut doc, o)?;
        }
        let cfg: TrainConfig = toml::Value::Table(doc)
            .try_into()
            .with_context(|| format!("{what}: invalid training configuration"))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.model.is_empty(),
            "`model` is required (a model folder or hub id)"
        );
        let sources = self.data.manifest.is_some() as usize
            + !self.data.parquet.is_empty() as usize
            + self.data.unpaired_manifest.is_some() as usize;
        ensure!(
            sources > 0,
            "[data] needs `manifest` (JSONL), `parquet` (Pick-a-Pic shards) or `unpaired_manifest` (KTO)"
        );
        if self.data.unpaired_manifest.is_some() {
            ensure!(
                sources == 1,
                "[data] `unpaired_manifest` cannot be combined with `manifest` or `parquet`"
            );
            ensure!(
                self.loss.kind == LossKind::Kto,
                "[data] `unpaired_manifest` needs loss.kind = \"kto\" (got {:?})",
                self.loss.kind
            );
        }
        ensure!(
            self.optim.batch_size > 0 && self.optim.grad_accum > 0,
            "[optim] batch_size and grad_accum must be positive"
        );
        ensure!(self.optim.lr > 0.0, "[optim] lr must be positive");
        ensure!(
            self.data.resolution >= 8,
            "[data] resolution must be at least 8"
        );
        ensure!(
            (0.0..=1.0).contains(&self.data.caption_dropout),
            "[data] caption_dropout must be in [0, 1]"
        );
        self.loss.validate()?;
        if self.eval.prompts.is_some() {
            ensure!(self.eval.samples >= 1, "[eval] samples must be at least 1");
            self.eval.reward_kind()?;
        }
        Ok(())
    }

    /// The learning rate AdamW starts from (after `scale_lr`).
    pub fn base_lr(&self) -> f64 {
        if self.optim.scale_lr {
            self.optim.lr * (self.optim.batch_size * self.optim.grad_accum) as f64
        } else {
            self.optim.lr
        }
    }
}

/// What a run produced.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    pub steps: u64,
    pub output_dir: PathBuf,
    /// The trained LoRA (`pytorch_lora_weights.safetensors`) or the fine-tuned model folder.
    pub weights: PathBuf,
    pub metrics: PathBuf,
    /// Mean statistics of the last optimizer step.
    pub last: Option<DpoStats>,
    /// True when stopped early by Ctrl-C (a checkpoint was saved).
    pub interrupted: bool,
    /// Held-out reward after vs before training (when `[eval] prompts` is set and the run finished).
    pub eval: Option<EvalOutcome>,
}

/// The held-out evaluation of a finished run.
#[derive(Clone, Debug)]
pub struct EvalOutcome {
    pub comparison: Comparison,
    pub reward: String,
    pub prompts: usize,
    pub samples_per_prompt: usize,
    /// `eval.json` and `before_after.png`.
    pub report: PathBuf,
    pub grid: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct RunState {
    step: u64,
    noise_rng: Rng,
    data_rng: Rng,
    position: DatasetPosition,
    config: serde_json::Value,
}

/// A resumable cursor over unpaired (KTO) samples: epoch `e`'s order is a shuffle drawn from
/// `Rng::derive(seed, "kto-order/e")`.
struct UnpairedCursor {
    samples: Vec<UnpairedSample>,
    seed: u64,
    shuffle: bool,
    pos: DatasetPosition,
    order: Vec<usize>,
}

impl UnpairedCursor {
    fn order_for(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.samples.len()).collect();
        if self.shuffle {
            Rng::derive(self.seed, &format!("kto-order/{epoch}")).shuffle(&mut order);
        }
        order
    }

    fn seek(&mut self, pos: DatasetPosition) -> Result<()> {
        ensure!(
            pos.index <= self.samples.len(),
            "dataset position {}:{} is beyond the {} samples of an epoch (was the data changed since the \
             checkpoint?)",
            pos.epoch,
            pos.index,
            self.samples.len()
        );
        self.pos = pos;
        self.order = self.order_for(pos.epoch);
        Ok(())
    }

    fn next_batch(&mut self, n: usize) -> Vec<&UnpairedSample> {
        let mut idx = Vec::with_capacity(n);
        for _ in 0..n {
            if self.pos.index >= self.samples.len() {
                self.pos = DatasetPosition {
                    epoch: self.pos.epoch + 1,
                    index: 0,
                };
                self.order = self.order_for(self.pos.epoch);
            }
            idx.push(self.order[self.pos.index]);
            self.pos.index += 1;
        }
        idx.into_iter().map(|i| &self.samples[i]).collect()
    }
}

/// Where the training samples come from.
enum TrainData {
    Pairs(PairDataset),
    Unpaired(UnpairedCursor),
}

impl TrainData {
    fn position(&self) -> DatasetPosition {
        match self {
            TrainData::Pairs(d) => d.position(),
            TrainData::Unpaired(u) => u.pos,
        }
    }

    fn seek(&mut self, pos: DatasetPosition) -> Result<()> {
        match self {
            TrainData::Pairs(d) => d.seek(pos),
            TrainData::Unpaired(u) => u.seek(pos),
        }
    }
}

struct Trainable {
    params: Vec<(String, Var)>,
    lora: Option<LoraSet>,
    reference: Option<UNet2DConditionModel>,
}

/// Runs (or resumes) a training run. `stop` (e.g. from Ctrl-C) makes it save a checkpoint and return early.
pub fn train(cfg: &TrainConfig, stop: Option<StopFlag>) -> Result<TrainSummary> {
    cfg.validate()?;
    let device = crate::cli::common::parse_device(&cfg.device)?;
    let dtype = crate::cli::common::parse_dtype(&cfg.dtype)?;
    let out = &cfg.output_dir;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let model_dir = resolve_model(&cfg.model, cfg.variant.as_deref())
        .with_context(|| format!("model {}", cfg.model))?;
    let mut model = StableDiffusion::load(
        &model_dir,
        &LoadOptions {
            dtype,
            device: device.clone(),
            variant: cfg.variant.clone(),
        },
    )
    .with_context(|| format!("loading {}", model_dir.display()))?;
    let sched_cfg = SchedulerConfig::from_file(&model.scheduler_config_path)?;
    let schedule = NoiseSchedule::new(&sched_cfg)?;
    // The latent size of a training image (square, `data.resolution` pixels) and the UNet's input channels,
    // which stored latents must match.
    let latent_side = cfg.data.resolution as usize / model.vae_scale_factor();
    let latent_channels = model.unet.config().in_channels;
    let t_band = cfg
        .loss
        .timestep_band(sched_cfg.num_train_timesteps as u64)?;

    // Trainable parameters.
    let trainable = match cfg.mode {
        TrainMode::Lora => {
            let mut lcfg = cfg.lora.clone();
            if lcfg.init_seed == 0 {
                lcfg.init_seed = cfg.seed;
            }
            let set = LoraSet::attach(&model.unet, &lcfg, &device)?;
            Trainable {
                params: set.vars(),
                lora: Some(set),
                reference: None,
            }
        }
        TrainMode::Full => {
            ensure!(
                dtype == DType::F32,
                "mode = \"full\" keeps f32 weights: set dtype = \"f32\" (got {})",
                cfg.dtype
            );
            let unet_dir = model_dir.join("unet");
            let files =
                find_weight_files(&unet_dir, "diffusion_pytorch_model", cfg.variant.as_deref())?;
            let p = Params::from_files(&files, DType::F32, &device)?.trainable();
            let policy = UNet2DConditionModel::new(&p, model.unet.config().clone())?;
            let reference = std::mem::replace(&mut model.unet, policy);
            Trainable {
                params: p.vars(),
                lora: None,
                reference: Some(reference),
            }
        }
    };
    let params = &trainable.params;
    ensure!(!params.is_empty(), "nothing to train");

    // Data.
    let (mut data, report) = if let Some(m) = &cfg.data.unpaired_manifest {
        ensure!(
            cfg.loss.uncond_anchor == 0.0,
            "loss.uncond_anchor works on pairs; data.unpaired_manifest trains single images (set it to 0)"
        );
        let opts = ManifestOptions {
            drop_ties: false,
            check_images: true,
            skip_bad: cfg.data.skip_bad,
        };
        let (samples, report) = load_unpaired_manifest(m, &opts)?;
        ensure!(
            !samples.is_empty(),
            "no training samples in {}",
            m.display()
        );
        let mut cursor = UnpairedCursor {
            samples,
            seed: cfg.seed,
            shuffle: cfg.data.shuffle,
            pos: DatasetPosition::default(),
            order: Vec::new(),
        };
        cursor.seek(DatasetPosition::default())?;
        (TrainData::Unpaired(cursor), report)
    } else if let Some(m) = &cfg.data.manifest {
        let opts = ManifestOptions {
            drop_ties: cfg.data.drop_ties,
            check_images: true,
            skip_bad: cfg.data.skip_bad,
        };
        let (pairs, report) = load_manifest(m, &opts)?;
        (
            TrainData::Pairs(PairDataset::new(
                PairSource::Manifest(pairs),
                cfg.seed,
                cfg.data.shuffle,
            )),
            report,
        )
    } else {
        let opts = PickapicOptions {
            drop_ties: cfg.data.drop_ties,
            skip_bad: cfg.data.skip_bad,
            ..Default::default()
        };
        let (index, report) = PickapicIndex::open(&cfg.data.parquet, &opts)?;
        (
            TrainData::Pairs(PairDataset::new(
                PairSource::Pickapic(index),
                cfg.seed,
                cfg.data.shuffle,
            )),
            report,
        )
    };
    if let TrainData::Pairs(dataset) = &data {
        ensure!(
            !dataset.is_empty(),
            "no training pairs (after dropping ties and bad rows)"
        );
    }
    let pcfg = PreprocessConfig {
        center_crop: cfg.data.center_crop,
        random_flip: cfg.data.random_flip,
        ..PreprocessConfig::new(cfg.data.resolution)
    };
    let model_id = model_dir.display().to_string();
    let latent_cache = match &cfg.data.cache_dir {
        Some(d) => Some(LatentCache::new(d.join("latents"), &model_id)?),
        None => None,
    };
    let text_cache = match &cfg.data.cache_dir {
        Some(d) => Some(TextEmbedCache::new(d.join("text"), &model_id)?),
        None => None,
    };

    // Optimizer and friends.
    let base_lr = cfg.base_lr();
    let mut opt = AdamW::new(AdamWConfig {
        lr: base_lr,
        beta1: cfg.optim.beta1,
        beta2: cfg.optim.beta2,
        eps: cfg.optim.eps,
        weight_decay: cfg.optim.weight_decay,
    });
    let lr_schedule = LrSchedule::new(
        cfg.optim.schedule,
        cfg.optim.warmup_steps,
        cfg.optim.max_steps,
    );
    lr_schedule.validate()?;
    let mut ema = if cfg.optim.ema_decay > 0.0 {
        Some(Ema::new(
            params,
            EmaConfig {
                decay: cfg.optim.ema_decay,
                ..Default::default()
            },
        )?)
    } else {
        None
    };
    let mut noise_rng = Rng::derive(cfg.seed, "noise");
    let mut data_rng = Rng::derive(cfg.seed, "data");
    let checkpointer = Checkpointer::new(out.clone(), cfg.log.keep_last.max(1));
    let config_json = serde_json::to_value(cfg)?;

    // Resume.
    let mut start = 0u64;
    if cfg.resume {
        if let Some(dir) = checkpoint::latest(out)? {
            let state: RunState = serde_json::from_value(checkpoint::load_state(&dir)?)
                .with_context(|| format!("{}: unreadable state.json", dir.display()))?;
            load_vars(&dir.join("trainable.safetensors"), params)?;
            opt.load_state(dir.join("optimizer.safetensors"), params)?;
            if let Some(e) = ema.as_mut() {
                e.load(dir.join("ema.safetensors"), params)?;
            }
            noise_rng = state.noise_rng;
            data_rng = state.data_rng;
            data.seek(state.position)?;
            start = state.step;
            eprintln!("resuming from {} (step {start})", dir.display());
        }
    }
    let metrics_path = out.join("metrics.jsonl");
    let mut metrics =
        MetricsWriter::open(&metrics_path, if start > 0 { Some(start) } else { None })?;
    if report.count > 0 {
        eprintln!("skipped {} bad rows", report.count);
        metrics.write(&serde_json::json!({"step": start, "skipped_rows": report.count}))?;
    }
    // Held-out evaluation: the base model's samples first (the same noise is reused after training).
    let evaluation = match &cfg.eval.prompts {
        Some(p) => {
            let kind = cfg.eval.reward_kind()?;
            Some(Evaluation {
                prompts: read_prompts(p, kind == RewardKind::Shapes).context("[eval] prompts")?,
                opts: cfg.eval.sample_options()?,
                reward: cfg.eval.load_reward(&device)?,
                progress: cfg.log.progress,
            })
        }
        None => None,
    };
    let base_samples = match &evaluation {
        Some(e) => {
            let s = with_weights(&mut model, &trainable, true, |m| e.sample(m, "eval base"))?;
            if start == 0 {
                let r = crate::eval::summarize(&s).reward;
                metrics.log(0, &[("eval_reward", r.mean), ("eval_ci95", r.ci95)])?;
            }
            Some(s)
        }
        None => None,
    };
    let progress = if cfg.log.progress {
        TrainProgress::new(cfg.optim.max_steps, start)
    } else {
        TrainProgress::hidden(cfg.optim.max_steps, start)
    };
    let stop = stop.unwrap_or_default();

    let set_enabled = |e: bool| {
        if let Some(l) = &trainable.lora {
            l.set_enabled(e)
        }
    };
    let reference = match (&trainable.lora, &trainable.reference) {
        _ if !cfg.loss.kind.needs_reference() => Reference::None,
        (Some(_), _) => Reference::Adapters {
            set_enabled: &set_enabled,
        },
        (None, Some(r)) => Reference::Frozen(r),
        (None, None) => unreachable!("full fine-tuning keeps a reference"),
    };
    let uncond_embeds = if cfg.loss.uncond_anchor > 0.0 {
        Some(unconditional_embeds(&model)?)
    } else {
        None
    };

    let save_checkpoint = |step: u64,
                           opt: &AdamW,
                           ema: &Option<Ema>,
                           noise_rng: &Rng,
                           data_rng: &Rng,
                           pos: DatasetPosition|
     -> Result<PathBuf> {
        let state = RunState {
            step,
            noise_rng: noise_rng.clone(),
            data_rng: data_rng.clone(),
            position: pos,
            config: config_json.clone(),
        };
        checkpointer.save(step, &serde_json::to_value(&state)?, |dir| {
            save_vars(&dir.join("trainable.safetensors"), params)?;
            opt.save_state(dir.join("optimizer.safetensors"))?;
            if let Some(e) = ema {
                e.save(dir.join("ema.safetensors"))?;
            }
            if let Some(l) = &trainable.lora {
                l.save(
                    &dir.join("pytorch_lora_weights.safetensors"),
                    cfg.log.lora_format,
                )?;
            }
            Ok(())
        })
    };

    let mut last = None;
    let mut interrupted = false;
    let bs = cfg.optim.batch_size;
    for step in start..cfg.optim.max_steps {
        if stop.is_set() {
            let dir = save_checkpoint(step, &opt, &ema, &noise_rng, &data_rng, data.position())?;
            progress.println(format!(
                "interrupted: checkpoint saved to {}",
                dir.display()
            ));
            interrupted = true;
            break;
        }
        let step_start = std::time::Instant::now();
        let lr = lr_schedule.lr_at(step, base_lr);
        opt.set_lr(lr);
        let mut acc = GradAccumulator::new();
        let mut step_stats: Vec<DpoStats> = Vec::new();
        for _ in 0..cfg.optim.grad_accum {
            let dataset = match &mut data {
                TrainData::Pairs(d) => d,
                TrainData::Unpaired(u) => {
                    let samples = u.next_batch(bs);
                    let n = samples.len();
                    let mut raws = Vec::with_capacity(n);
                    let mut pre = Vec::with_capacity(n);
                    for x in &samples {
                        let img = crate::imaging::load_image(&x.image)
                            .with_context(|| format!("sample {}", x.source))?;
                        pre.push(
                            preprocess_image(&img, &pcfg, &mut data_rng)
                                .with_context(|| format!("sample {}", x.source))?,
                        );
                        raws.push(img);
                    }
                    let images: Vec<&Tensor> = pre.iter().map(|p| &p.0).collect();
                    let images = Tensor::stack(&images, 0)?
                        .to_device(&device)?
                        .to_dtype(dtype)?;
                    let ids: Vec<(ImageId, &Transform)> = raws
                        .iter()
                        .zip(&pre)
                        .map(|(img, pp)| (ImageId::Bytes(img.as_raw()), &pp.1))
                        .collect();
                    let latents = training_latents(
                        &model,
                        latent_cache.as_ref(),
                        &images,
                        &ids,
                        cfg.data.vae_posterior,
                        &mut data_rng,
                    )?;
                    let prompts: Vec<&str> = samples
                        .iter()
                        .map(|x| {
                            maybe_drop_caption(&x.prompt, cfg.data.caption_dropout, &mut data_rng)
                        })
                        .collect();
                    let embeds: PromptEmbeds = match &text_cache {
                        Some(c) => c.get_or_compute_many(&prompts, &device, |missing| {
                            Ok(model.encode_prompts(missing)?)
                        })?,
                        None => model.encode_prompts(&prompts)?,
                    };
                    let transforms: Vec<&Transform> = pre.iter().map(|x| &x.1).collect();
                    let added = sdxl_added_cond(&model, &embeds, &transforms, dtype)?;
                    let (t, noise) =
                        draw_timesteps_and_noise(&mut noise_rng, t_band, latents.dims(), &device)?;
                    let (m, r) = single_errors(
                        &model.unet,
                        &reference,
                        &schedule,
                        &latents,
                        &noise,
                        &t,
                        &embeds.hidden_states.detach(),
                        added.as_ref(),
                    )?;
                    let r = r.context("loss `kto` needs reference predictions")?;
                    let desirable: Vec<bool> = samples.iter().map(|x| x.desirable).collect();
                    let (loss, stats) = kto_unpaired_loss(&cfg.loss, &m, &r, &desirable)?;
                    if !stats.loss.is_finite() {
                        let good = checkpoint::latest(out)?
                            .map(|d| d.display().to_string())
                            .unwrap_or_else(|| "none yet".into());
                        bail!("the loss became {} at step {} (samples {}); stopping. Last good checkpoint: {good}", stats.loss, step + 1,
                            samples.iter().map(|x| x.source.as_str()).collect::<Vec<_>>().join(", "));
                    }
                    let grads = (loss / cfg.optim.grad_accum as f64)?.backward()?;
                    acc.add_store(params, grads)?;
                    step_stats.push(stats);
                    continue;
                }
            };
            let pairs = dataset.next_batch(bs)?;
            let mut pre = Vec::with_capacity(pairs.len());
            for p in &pairs {
                pre.push(
                    preprocess_pair(&p.chosen, &p.rejected, &pcfg, &mut data_rng)
                        .with_context(|| format!("pair {}", p.source))?,
                );
            }
            let stored = stored_pair_latents(
                cfg.data.stored_latents,
                &pairs,
                latent_channels,
                latent_side,
                cfg.data.random_flip,
            )?;
            let latents = match stored {
                Some(z) => z.to_device(&device)?.to_dtype(dtype)?,
                None => {
                    let images: Vec<&Tensor> = pre
                        .iter()
                        .map(|p| &p.chosen)
                        .chain(pre.iter().map(|p| &p.rejected))
                        .collect();
                    let images = Tensor::stack(&images, 0)?
                        .to_device(&device)?
                        .to_dtype(dtype)?;
                    let ids: Vec<(ImageId, &Transform)> =
                        pairs
                            .iter()
                            .zip(&pre)
                            .map(|(x, pp)| (ImageId::Bytes(x.chosen.as_raw()), &pp.transform))
                            .chain(pairs.iter().zip(&pre).map(|(x, pp)| {
                                (ImageId::Bytes(x.rejected.as_raw()), &pp.transform)
                            }))
                            .collect();
                    training_latents(
                        &model,
                        latent_cache.as_ref(),
                        &images,
                        &ids,
                        cfg.data.vae_posterior,
                        &mut data_rng,
                    )?
                }
            };
            let p = pairs.len();
            let (lw, ll) = (latents.narrow(0, 0, p)?, latents.narrow(0, p, p)?);
            let prompts: Vec<&str> = pairs
                .iter()
                .map(|x| maybe_drop_caption(&x.prompt, cfg.data.caption_dropout, &mut data_rng))
                .collect();
            let embeds: PromptEmbeds = match &text_cache {
                Some(c) => c.get_or_compute_many(&prompts, &device, |missing| {
                    Ok(model.encode_prompts(missing)?)
                })?,
                None => model.encode_prompts(&prompts)?,
            };
            let transforms: Vec<&Transform> = pre.iter().map(|x| &x.transform).collect();
            let added = sdxl_added_cond(&model, &embeds, &transforms, dtype)?;
            let (t, noise) = draw_timesteps_and_noise(&mut noise_rng, t_band, lw.dims(), &device)?;
            let labels = Tensor::from_vec(
                pairs.iter().map(|x| x.label).collect::<Vec<f32>>(),
                p,
                &device,
            )?;
            let batch = PairBatch {
                latents_w: &lw,
                latents_l: &ll,
                noise: &noise,
                timesteps: &t,
                encoder_hidden_states: &embeds.hidden_states.detach(),
                added: added.as_ref(),
                uncond: uncond_embeds.as_ref(),
            };
            let errors = pair_errors(
                &model.unet,
                &reference,
                &schedule,
                cfg.loss.timestep_weighting,
                &batch,
            )?;
            let (loss, stats) = pair_loss(&cfg.loss, &errors, Some(&labels))?;
            if !stats.loss.is_finite() {
                let good = checkpoint::latest(out)?
                    .map(|d| d.display().to_string())
                    .unwrap_or_else(|| "none yet".into());
                bail!("the loss became {} at step {} (pairs {}); stopping. Last good checkpoint: {good}", stats.loss, step + 1,
                    pairs.iter().map(|x| x.source.as_str()).collect::<Vec<_>>().join(", "));
            }
            let grads = (loss / cfg.optim.grad_accum as f64)?.backward()?;
            acc.add_store(params, grads)?;
            step_stats.push(stats);
        }
        let mut grads = acc.into_grads()?;
        if let Some(bad) = grads.first_non_finite()? {
            let good = checkpoint::latest(out)?
                .map(|d| d.display().to_string())
                .unwrap_or_else(|| "none yet".into());
            bail!("non-finite gradient for `{bad}` at step {}; stopping. Last good checkpoint: {good}", step + 1);
        }
        let grad_norm = if cfg.optim.max_grad_norm > 0.0 {
            clip_grad_norm(&mut grads, cfg.optim.max_grad_norm)?
        } else {
            grads.global_norm()?
        };
        opt.step(params, &grads)?;
        if let Some(e) = ema.as_mut() {
            e.update(params)?;
        }
        let s = mean_stats(&step_stats);
        let pairs_per_s =
            (bs * cfg.optim.grad_accum) as f64 / step_start.elapsed().as_secs_f64().max(1e-9);
        metrics.log(
            step + 1,
            &[
                ("loss", s.loss),
                ("implicit_acc", s.implicit_acc),
                ("reward_margin", s.margin),
                ("reward_chosen", s.reward_chosen),
                ("reward_rejected", s.reward_rejected),
                ("model_mse_w", s.model_mse_w),
                ("model_mse_l", s.model_mse_l),
                ("ref_mse_w", s.ref_mse_w),
                ("ref_mse_l", s.ref_mse_l),
                ("uncond_drift", s.uncond_drift),
                ("grad_norm", grad_norm),
                ("lr", lr),
                ("pairs_per_s", pairs_per_s),
            ],
        )?;
        progress.update(step + 1, s.loss, Some(s.implicit_acc), lr);
        last = Some(s);
        let done = step + 1 == cfg.optim.max_steps;
        if (cfg.log.checkpoint_every > 0 && (step + 1) % cfg.log.checkpoint_every == 0) || done {
            save_checkpoint(step + 1, &opt, &ema, &noise_rng, &data_rng, data.position())?;
        }
        if cfg.validation.every > 0
            && !cfg.validation.prompts.is_empty()
            && ((step + 1) % cfg.validation.every == 0 || done)
        {
            let path = out
                .join("validation")
                .join(format!("step-{:06}.png", step + 1));
            validation_grid(&mut model, &trainable, &cfg.validation, step + 1, &path)?;
        }
        if let (Some(e), Some(b)) = (&evaluation, &base_samples) {
            if cfg.eval.every > 0 && (step + 1) % cfg.eval.every == 0 && !done {
                let s = with_weights(&mut model, &trainable, false, |m| e.sample(m, "eval"))?;
                let c = compare(b, &s)?;
                metrics.log(step + 1, &c.metrics())?;
                progress.println(format!(
                    "step {}: held-out {} {} (base {})",
                    step + 1,
                    e.reward.name(),
                    crate::eval::fmt_ci(&c.model.reward),
                    crate::eval::fmt_ci(&c.base.reward)
                ));
            }
        }
    }
    progress.finish();

    // Final weights (EMA weights when kept) and plots.
    if let Some(e) = ema.as_mut() {
        e.copy_to(params)?;
    }
    let weights = match (&trainable.lora, cfg.mode) {
        (Some(l), _) => {
            let p = out.join("pytorch_lora_weights.safetensors");
            l.save(&p, cfg.log.lora_format)?;
            p
        }
        _ => {
            let dir = out.join("unet");
            std::fs::create_dir_all(&dir)?;
            save_vars(&dir.join("diffusion_pytorch_model.safetensors"), params)?;
            std::fs::copy(model_dir.join("unet/config.json"), dir.join("config.json"))?;
            dir
        }
    };
    let eval = match (&evaluation, &base_samples) {
        (Some(e), Some(b)) if !interrupted => {
            let after = with_weights(&mut model, &trainable, false, |m| e.sample(m, "eval tuned"))?;
            let c = compare(b, &after)?;
            metrics.log(cfg.optim.max_steps, &c.metrics())?;
            let report = c.report(
                serde_json::json!({
                    "steps": cfg.optim.max_steps,
                    "reward": e.reward.name(),
                    "prompts_file": cfg.eval.prompts,
                    "prompts": e.prompts.len(),
                    "samples_per_prompt": e.opts.samples_per_prompt,
                    "seed": cfg.eval.seed,
                    "sampling_steps": cfg.eval.steps,
                    "guidance": cfg.eval.guidance,
                }),
                per_prompt(&[("base", b), ("tuned", &after)]),
            )?;
            let report_path = out.join("eval.json");
            crate::cli::common::write_atomic(
                &report_path,
                serde_json::to_string_pretty(&report)?.as_bytes(),
            )?;
            let grid_path = out.join("before_after.png");
            let grid = comparison_grid(
                &[("before", b), ("after", &after)],
                cfg.eval.grid_prompts,
                4,
            )?;
            crate::imaging::save_png(&grid, &grid_path)?;
            Some(EvalOutcome {
                comparison: c,
                reward: e.reward.name().to_string(),
                prompts: e.prompts.len(),
                samples_per_prompt: e.opts.samples_per_prompt,
                report: report_path,
                grid: grid_path,
            })
        }
        _ => None,
    };
    let records = read_metrics(&metrics_path)?;
    let mut curves = vec![
        ("loss", series(&records, "loss")),
        ("implicit_acc", series(&records, "implicit_acc")),
    ];
    let eval_curve = series(&records, "eval_reward");
    if !eval_curve.is_empty() {
        curves.push(("eval_reward", eval_curve));
    }
    if curves[0].1.len() > 1 {
        plot_curves(out.join("curves.png"), &curves)?;
    }
    Ok(TrainSummary {
        steps: cfg.optim.max_steps,
        output_dir: out.clone(),
        weights,
        metrics: metrics_path,
        last,
        interrupted,
        eval,
    })
}

/// The held-out prompts, sampling options and reward of `[eval]`.
struct Evaluation {
    prompts: Vec<String>,
    opts: SampleOptions,
    reward: Box<dyn Reward>,
    progress: bool,
}

impl Evaluation {
    fn sample(&self, model: &StableDiffusion, what: &str) -> Result<Samples> {
        let n = self.prompts.len() * self.opts.samples_per_prompt;
        let pb = if self.progress {
            crate::cli::generate::progress(n, what)
        } else {
            indicatif::ProgressBar::hidden()
        };
        let s = sample_and_score(
            model,
            &self.prompts,
            &self.opts,
            self.reward.as_ref(),
            Some(&pb),
        );
        pb.finish_and_clear();
        s
    }
}

/// Runs `f` on the base weights (`base`: adapters off, or the frozen reference UNet swapped in) or on the
/// trained ones, outside the autograd graph (LoRA in evaluation mode: no dropout, no gradient tracking).
fn with_weights<T>(
    model: &mut StableDiffusion,
    t: &Trainable,
    base: bool,
    f: impl FnOnce(&StableDiffusion) -> Result<T>,
) -> Result<T> {
    match (&t.lora, &t.reference) {
        (Some(l), _) => {
            let training = l.is_training();
            l.set_training(false);
            l.set_enabled(!base);
            let out = f(model);
            l.set_enabled(true);
            l.set_training(training);
            out
        }
        (None, Some(r)) => {
            // The reference, or a graph-free copy of the trained weights (sampling with the vars would keep
            // every step's graph alive).
            let swap = if base {
                r.clone()
            } else {
                let map = t
                    .params
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
                    .collect();
                let device = model.device().clone();
                UNet2DConditionModel::new(
                    &Params::from_map(map, DType::F32, &device),
                    model.unet.config().clone(),
                )?
            };
            let policy = std::mem::replace(&mut model.unet, swap);
            let out = f(model);
            model.unet = policy;
            out
        }
        _ => f(model),
    }
}

/// SDXL micro-conditioning for a training batch: the pooled text embeddings and, per sample, the time ids of
/// the crop actually applied. `None` for UNets without `text_time`.
fn sdxl_added_cond(
    model: &StableDiffusion,
    embeds: &PromptEmbeds,
    transforms: &[&Transform],
    dtype: DType,
) -> Result<Option<AddedCond>> {
    if !model.unet.config().uses_text_time() {
        return Ok(None);
    }
    let ids: Vec<f32> = transforms
        .iter()
        .flat_map(|t| t.sdxl_time_ids().map(|v| v as f32))
        .collect();
    Ok(Some(AddedCond {
        text_embeds: embeds
            .pooled
            .clone()
            .context("SDXL training needs pooled text embeddings")?,
        time_ids: Tensor::from_vec(ids, (transforms.len(), 6), model.device())?.to_dtype(dtype)?,
    }))
}

/// The empty prompt's conditioning `[1, T, D]` as the sampler's unconditional branch sees it (zeros where the
/// model forces them), for the unconditional anchor.
fn unconditional_embeds(model: &StableDiffusion) -> Result<PromptEmbeds> {
    let e = model.encode_prompts(&[""])?;
    Ok(if model.force_zeros_for_empty_prompt {
        e.zeros_like()?
    } else {
        e
    })
}

/// The stored sampler latents of a batch, `[chosen…; rejected…]` (`[2P, C, side, side]`, f32 on the CPU), when
/// `use_stored` (`data.stored_latents`) is on and every pair has them; `None` when it is off or no pair has them
/// (then the images are encoded). Each must be `[channels, side, side]`, the latent of a training image at
/// `data.resolution`.
fn stored_pair_latents(
    use_stored: bool,
    pairs: &[crate::data::PairImages],
    channels: usize,
    side: usize,
    random_flip: bool,
) -> Result<Option<Tensor>> {
    let with = pairs.iter().filter(|p| p.latents.is_some()).count();
    if !use_stored || with == 0 {
        return Ok(None);
    }
    if random_flip {
        bail!(
            "the pairs name stored latents (e.g. {}), which cannot be flipped: set data.random_flip = false, \
             or data.stored_latents = false to encode the PNGs instead",
            pairs[0].source
        );
    }
    if with != pairs.len() {
        let missing: Vec<&str> = pairs
            .iter()
            .filter(|p| p.latents.is_none())
            .map(|p| p.source.as_str())
            .collect();
        bail!(
            "some pairs name stored latents and some do not (without: {}); give every pair \
             chosen_latent/rejected_latent, or set data.stored_latents = false",
            missing.join(", ")
        );
    }
    let mut all = Vec::with_capacity(2 * pairs.len());
    for (which, rejected) in [("chosen", false), ("rejected", true)] {
        for p in pairs {
            let (c, r) = p.latents.as_ref().expect("checked above");
            let z = if rejected { r } else { c };
            let (zc, zh, zw) = z.dims3()?;
            if zc != channels {
                bail!(
                    "{}: the stored {which} latent has {zc} channels, the UNet takes {channels}",
                    p.source
                );
            }
            if (zh, zw) != (side, side) {
                bail!(
                    "{}: the stored {which} latent is {zh}x{zw} but images at data.resolution have \
                     {side}x{side} latents (set data.resolution to the size the pairs were sampled at, or \
                     data.stored_latents = false)",
                    p.source
                );
            }
            all.push(z.clone());
        }
    }
    Ok(Some(Tensor::stack(&all, 0)?))
}

/// Scaled VAE latents of `images` (`[B, 3, H, W]`, image `i` identified by `ids[i]` for the cache): the
/// posteriors come from `cache` (computing the misses in one VAE call) or straight from the VAE, then a
/// posterior sample (noise from `rng`) or the mode, per `[data] vae_posterior`. Detached.
fn training_latents(
    model: &StableDiffusion,
    cache: Option<&LatentCache>,
    images: &Tensor,
    ids: &[(ImageId, &Transform)],
    posterior: VaePosterior,
    rng: &mut Rng,
) -> Result<Tensor> {
    let device = images.device();
    let posteriors = match cache {
        Some(cache) => {
            let keys = ids
                .iter()
                .map(|(id, tr)| cache.key(*id, tr))
                .collect::<Result<Vec<_>>>()?;
            let got = cache.get_or_compute_many(&keys, device, |missing| {
                let idx: Vec<u32> = missing.iter().map(|&i| i as u32).collect();
                let idx = Tensor::new(idx.as_slice(), device)?;
                encode_posteriors(&model.vae, &images.index_select(&idx, 0)?)
            })?;
            CachedLatent::stack(&got, device)?
        }
        None => model.vae.encode(images)?,
    };
    let z = match posterior {
        VaePosterior::Sample => {
            let noise = rng.normal_tensor(posteriors.mean.dims(), device)?;
            posteriors.sample(Some(&noise.to_dtype(posteriors.mean.dtype())?))?
        }
        VaePosterior::Mode => posteriors.mean,
    };
    Ok(model.vae.scale_latents(&z)?.detach())
}

/// One uniform integer timestep from the band `[lo, hi)` ([`DpoLossConfig::timestep_band`]).
fn draw_timestep(rng: &mut Rng, (lo, hi): (u64, u64)) -> i64 {
    (lo + rng.below(hi - lo)) as i64
}

/// One timestep per sample from `band`, then the noise of `shape` (in that order from the stream, so resumed
/// runs draw the same numbers).
fn draw_timesteps_and_noise(
    rng: &mut Rng,
    band: (u64, u64),
    shape: &[usize],
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let n = shape[0];
    let t: Vec<i64> = (0..n).map(|_| draw_timestep(rng, band)).collect();
    let t = Tensor::from_vec(t, n, device)?;
    let noise = rng.normal_tensor(shape, device)?;
    Ok((t, noise))
}

fn mean_stats(v: &[DpoStats]) -> DpoStats {
    let n = v.len().max(1) as f64;
    let m = |f: fn(&DpoStats) -> f64| v.iter().map(f).sum::<f64>() / n;
    DpoStats {
        loss: m(|s| s.loss),
        implicit_acc: m(|s| s.implicit_acc),
        reward_chosen: m(|s| s.reward_chosen),
        reward_rejected: m(|s| s.reward_rejected),
        margin: m(|s| s.margin),
        model_mse_w: m(|s| s.model_mse_w),
        model_mse_l: m(|s| s.model_mse_l),
        ref_mse_w: m(|s| s.ref_mse_w),
        ref_mse_l: m(|s| s.ref_mse_l),
        uncond_drift: m(|s| s.uncond_drift),
        pairs: v.iter().map(|s| s.pairs).sum(),
    }
}

/// Base vs current on fixed prompts and fixed noise.
fn validation_grid(
    model: &mut StableDiffusion,
    t: &Trainable,
    v: &ValidationConfig,
    step: u64,
    path: &Path,
) -> Result<()> {
    let prompts: Vec<&str> = v.prompts.iter().map(|s| s.as_str()).collect();
    let run = |model: &StableDiffusion| -> Result<Vec<image::RgbImage>> {
        let pipe = Pipeline::new(model)?;
        let opts0 = GenerateOptions {
            steps: v.steps,
            guidance_scale: v.guidance,
            seed: v.seed,
            ..Default::default()
        };
        let (lh, lw) = pipe.latent_size(&opts0)?;
        let c = model.unet.config().in_channels;
        let noise = seeded_noise(v.seed, &[1, c, lh, lw], &Device::Cpu)?.repeat((
            prompts.len(),
            1,
            1,
            1,
        ))?;
        let out = pipe.generate(
            &prompts,
            &[],
            &GenerateOptions {
                init_latents: Some(noise),
                ..opts0
            },
            None,
        )?;
        crate::imaging::tensor_to_images(&out.images)
    };
    let base = with_weights(model, t, true, run)?;
    let current = with_weights(model, t, false, run)?;
    let rows: Vec<Vec<image::RgbImage>> = base
        .into_iter()
        .zip(current)
        .map(|(a, b)| vec![a, b])
        .collect();
    let labels = vec!["base".to_string(), format!("step {step}")];
    let scale = (256 / rows[0][0].width().max(1)).clamp(1, 8);
    let img = crate::imaging::grid(
        &rows,
        &v.prompts,
        &labels,
        &crate::imaging::GridOptions {
            scale,
            ..Default::default()
        },
    )?;
    crate::imaging::save_png(&img, path)
}

/// Loads a trained LoRA back onto a model for evaluation (frozen, with `scale`).
pub fn load_trained_lora(model: &StableDiffusion, path: &Path, scale: f64) -> Result<LoraSet> {
    LoraSet::load(&model.unet, path, LoadMode::Frozen { scale })
}

/// Mean DPO statistics of a model (optionally with a trained LoRA, at scale 1) on every pair of `cfg`'s data
/// (its stored latents when the manifest names them and `data.stored_latents` is on, else the VAE posterior
/// modes of its images), `draws` times each, with fixed noise and timesteps drawn from `seed` — the same draws
/// for any weights, so a trained LoRA and the base model are compared on equal terms. The reference is the base
/// model; `uncond_drift` is how far the weights moved the unconditional prediction on the winners.
pub fn evaluate_pairs(
    cfg: &TrainConfig,
    lora: Option<&Path>,
    seed: u64,
    draws: usize,
) -> Result<DpoStats> {
    let device = crate::cli::common::parse_device(&cfg.device)?;
    let dtype = crate::cli::common::parse_dtype(&cfg.dtype)?;
    let model_dir = resolve_model(&cfg.model, cfg.variant.as_deref())?;
    let model = StableDiffusion::load(
        &model_dir,
        &LoadOptions {
            dtype,
            device: device.clone(),
            variant: cfg.variant.clone(),
        },
    )?;
    let schedule = NoiseSchedule::new(&SchedulerConfig::from_file(&model.scheduler_config_path)?)?;
    let t_band = cfg
        .loss
        .timestep_band(schedule.alphas_cumprod().len() as u64)?;
    let set = match lora {
        Some(p) => Some(LoraSet::load(
            &model.unet,
            p,
            LoadMode::Frozen { scale: 1.0 },
        )?),
        None => None,
    };
    let set_enabled = |e: bool| {
        if let Some(l) = &set {
            l.set_enabled(e)
        }
    };
    let manifest = cfg
        .data
        .manifest
        .as_ref()
        .context("evaluate_pairs needs a manifest")?;
    let opts = ManifestOptions {
        drop_ties: cfg.data.drop_ties,
        check_images: true,
        skip_bad: cfg.data.skip_bad,
    };
    let (pairs, _) = load_manifest(manifest, &opts)?;
    let mut dataset = PairDataset::new(PairSource::Manifest(pairs), seed, false);
    let pcfg = PreprocessConfig {
        center_crop: true,
        random_flip: false,
        ..PreprocessConfig::new(cfg.data.resolution)
    };
    let mut rng = Rng::derive(seed, "evaluate");
    let latent_side = cfg.data.resolution as usize / model.vae_scale_factor();
    let latent_channels = model.unet.config().in_channels;
    let uncond = unconditional_embeds(&model)?;
    let mut all = Vec::new();
    for _ in 0..dataset.len() * draws.max(1) {
        let pair = dataset.next_batch(1)?.remove(0);
        let stored = stored_pair_latents(
            cfg.data.stored_latents,
            std::slice::from_ref(&pair),
            latent_channels,
            latent_side,
            false,
        )?;
        let latents = match stored {
            Some(z) => z.to_device(&device)?.to_dtype(dtype)?,
            None => {
                let pre = preprocess_pair(&pair.chosen, &pair.rejected, &pcfg, &mut rng)?;
                let images = Tensor::stack(&[&pre.chosen, &pre.rejected], 0)?
                    .to_device(&device)?
                    .to_dtype(dtype)?;
                model
                    .vae
                    .scale_latents(&model.vae.encode(&images)?.mode())?
            }
        };
        let embeds = model.encode_prompts(&[pair.prompt.as_str()])?;
        let added = model.added_cond(
            &embeds,
            cfg.data.resolution as usize,
            cfg.data.resolution as usize,
        )?;
        let t = Tensor::new(&[draw_timestep(&mut rng, t_band)], &device)?;
        let noise = rng.normal_tensor(
            &latents.dims()[1..].iter().fold(vec![1], |mut v, d| {
                v.push(*d);
                v
            }),
            &device,
        )?;
        let batch = PairBatch {
            latents_w: &latents.narrow(0, 0, 1)?,
            latents_l: &latents.narrow(0, 1, 1)?,
            noise: &noise,
            timesteps: &t,
            encoder_hidden_states: &embeds.hidden_states,
            added: added.as_ref(),
            uncond: Some(&uncond),
        };
        let reference = if set.is_some() {
            Reference::Adapters {
                set_enabled: &set_enabled,
            }
        } else {
            Reference::Frozen(&model.unet)
        };
        let errors = pair_errors(
            &model.unet,
            &reference,
            &schedule,
            cfg.loss.timestep_weighting,
            &batch,
        )?;
        all.push(pair_loss(&cfg.loss, &errors, None)?.1);
    }
    Ok(mean_stats(&all))
}
