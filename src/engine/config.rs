//! The run section every training method shares ([`RunConfig`], flattened into each method's configuration:
//! `model`, `output_dir`, `device`, ..., `[lora]`, `[optim]`, `[log]`, `[validation]`, `[eval]` at the top of
//! the TOML file, next to the method's own sections). Typed values (device, dtype, reward, sampler) are parsed
//! when the file loads; [`RunConfig::validate`] checks the ranges before any model is loaded.

use crate::config::{DTypeSpec, DeviceSpec, SchedulerSpec};
use crate::eval::SampleOptions;
use crate::scoring::{RewardKind, RewardSpec};
use crate::train::lora::{LoraConfig, LoraFormat};
use crate::train::schedule::{LrSchedule, ScheduleKind};
use anyhow::{ensure, Context, Result};
use candle_core::Device;
use diffpref_rewards::Reward;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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

/// `[optim]`: optimizer, schedule and batch shape.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Base learning rate. Default 1e-5 (diffusers' DPO LoRA recipe).
    pub lr: f64,
    /// Multiply `lr` by the samples per optimizer step (`batch_size · grad_accum`), as the official DPO
    /// launchers (1e-8 per pair there). Default false.
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
    /// Samples (pairs for DPO, trajectories for the online methods) per micro-batch. Default 1.
    pub batch_size: usize,
    /// Micro-batches per optimizer step. Default 1.
    pub grad_accum: usize,
    /// Optimizer steps of the run. Default 100.
    pub max_steps: u64,
    /// Keep an EMA of the trained weights with this decay (diffusers' EMAModel warmup); 0 = off. The exported
    /// weights are the EMA ones. Default 0.
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

impl OptimConfig {
    /// The learning rate AdamW starts from (after `scale_lr`).
    pub fn base_lr(&self) -> f64 {
        if self.scale_lr {
            self.lr * (self.batch_size * self.grad_accum) as f64
        } else {
            self.lr
        }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.batch_size > 0 && self.grad_accum > 0,
            "[optim] batch_size and grad_accum must be positive"
        );
        ensure!(
            self.batch_size <= MAX_BATCH && self.grad_accum <= MAX_BATCH,
            "[optim] batch_size {} / grad_accum {}: at most {MAX_BATCH} each (use grad_accum for larger \
             effective batches)",
            self.batch_size,
            self.grad_accum
        );
        ensure!(
            self.lr.is_finite() && self.lr > 0.0,
            "[optim] lr must be a positive number (got {})",
            self.lr
        );
        ensure!(
            (0.0..1.0).contains(&self.beta1) && (0.0..1.0).contains(&self.beta2),
            "[optim] beta1 and beta2 must be in [0, 1) (got {}, {})",
            self.beta1,
            self.beta2
        );
        ensure!(
            self.eps.is_finite() && self.eps > 0.0,
            "[optim] eps must be positive (got {})",
            self.eps
        );
        ensure!(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "[optim] weight_decay must be >= 0 (got {})",
            self.weight_decay
        );
        ensure!(
            self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0,
            "[optim] max_grad_norm must be >= 0 (0 = off; got {})",
            self.max_grad_norm
        );
        ensure!(
            (0.0..1.0).contains(&self.ema_decay),
            "[optim] ema_decay must be in [0, 1) (0 = off; got {})",
            self.ema_decay
        );
        ensure!(self.max_steps >= 1, "[optim] max_steps must be at least 1");
        LrSchedule::new(self.schedule, self.warmup_steps, self.max_steps)
            .validate()
            .context("[optim] schedule / warmup_steps")
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
    /// Also write every logged metric and the validation/evaluation grids as TensorBoard event files
    /// (`events.out.tfevents.*`) next to `metrics.jsonl`: `tensorboard --logdir runs/`. Default true.
    pub tensorboard: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            checkpoint_every: 100,
            keep_last: 3,
            lora_format: LoraFormat::Peft,
            progress: true,
            tensorboard: true,
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

impl ValidationConfig {
    pub fn validate(&self) -> Result<()> {
        if self.every > 0 {
            ensure!(
                !self.prompts.is_empty(),
                "[validation] every = {} needs prompts",
                self.every
            );
            ensure!(self.steps >= 1, "[validation] steps must be at least 1");
            ensure!(
                self.guidance.is_finite(),
                "[validation] guidance must be finite (got {})",
                self.guidance
            );
        }
        Ok(())
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
    /// shapes | clip | pickscore | hps | aesthetic | imagereward (the judge). Default shapes.
    pub reward: RewardKind,
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
    pub scheduler: Option<SchedulerSpec>,
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
            reward: RewardKind::Shapes,
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
    pub fn sample_options(&self) -> SampleOptions {
        SampleOptions {
            samples_per_prompt: self.samples,
            steps: self.steps,
            guidance: self.guidance,
            scheduler: self.scheduler.map(|s| s.0),
            seed: self.seed,
            batch_size: self.batch_size,
        }
    }

    /// The judge as a reward spec.
    pub fn reward_spec(&self) -> RewardSpec {
        RewardSpec {
            kind: Some(self.reward),
            weights: self.reward_weights.clone(),
            clip: self.reward_clip.clone(),
            ..Default::default()
        }
    }

    /// Loads the reward (f32) on `device`.
    pub fn load_reward(&self, device: &Device) -> Result<Box<dyn Reward>> {
        self.reward_spec()
            .load("[eval]", device)
            .context("[eval] loading the reward (reward_weights)")
    }

    pub fn validate(&self) -> Result<()> {
        if self.prompts.is_some() {
            ensure!(self.samples >= 1, "[eval] samples must be at least 1");
            ensure!(self.steps >= 1, "[eval] steps must be at least 1");
            ensure!(self.batch_size >= 1, "[eval] batch_size must be at least 1");
            ensure!(
                self.guidance.is_finite(),
                "[eval] guidance must be finite (got {})",
                self.guidance
            );
            self.reward_spec().validate("[eval]")?;
        }
        Ok(())
    }
}

/// The largest micro-batch, gradient accumulation, or GRPO round a config may ask for: a bound checked at load
/// so an absurd value is an error, not an allocation abort minutes later.
pub const MAX_BATCH: usize = 4096;

/// The part of a training configuration every method shares (flattened into the method's configuration, so
/// these keys sit at the top of the TOML file). See `examples/dpo.toml` and `examples/grpo.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Model: a diffusers folder, a single-file checkpoint (`.safetensors`, original SD layout; see
    /// `diffpref_pipelines::single_file`) or a hub id. Required.
    pub model: String,
    /// Weight variant to prefer (e.g. fp16). Default: none.
    pub variant: Option<String>,
    /// Run folder: checkpoints, metrics.jsonl, the final weights, plots, validation grids. Default
    /// `runs/<method>`.
    pub output_dir: Option<PathBuf>,
    /// Seed of every random stream. Default 0.
    pub seed: u64,
    /// cpu | cuda | cuda:N. Default cpu.
    pub device: DeviceSpec,
    /// Compute dtype of the model: f32 | bf16 | f16 (LoRA weights and losses stay f32). Default f32.
    pub dtype: DTypeSpec,
    /// Continue from the latest checkpoint in `output_dir` when there is one. Default true.
    pub resume: bool,
    /// Write into an `output_dir` that is not empty and was not written by this command (see
    /// [`crate::output`]). Default false.
    pub overwrite: bool,
    /// lora | full. Default lora.
    pub mode: TrainMode,
    /// Gradient checkpointing of the UNet's resnet and transformer blocks (diffusers'
    /// `gradient_checkpointing`): training keeps only each block's input and output and recomputes the block in
    /// the backward pass — much less memory (the SD1.5 LoRA step at 32x32 latents: see docs/perf.md) for about
    /// one more forward per step. Needs `lora.dropout = 0` (a recomputed block must draw the same). Default
    /// false.
    pub gradient_checkpointing: bool,
    pub lora: LoraConfig,
    pub optim: OptimConfig,
    pub log: LogConfig,
    pub validation: ValidationConfig,
    pub eval: EvalConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            model: String::new(),
            variant: None,
            output_dir: None,
            seed: 0,
            device: DeviceSpec::Cpu,
            dtype: DTypeSpec::F32,
            resume: true,
            overwrite: false,
            mode: TrainMode::Lora,
            gradient_checkpointing: false,
            lora: LoraConfig::default(),
            optim: OptimConfig::default(),
            log: LogConfig::default(),
            validation: ValidationConfig::default(),
            eval: EvalConfig::default(),
        }
    }
}

impl RunConfig {
    /// The run folder: `output_dir`, or `runs/<method>`.
    pub fn output_dir(&self, method: &str) -> PathBuf {
        self.output_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(method))
    }

    /// The guard of `output_dir` for `diffpref train <method>` (see [`crate::output`]): a folder of its own
    /// earlier run (resumed), or new/empty, never the model's folder, another input or one of their parents.
    pub fn output_guard<'a>(
        &self,
        out: &'a std::path::Path,
        command: &'a str,
    ) -> crate::output::OutputDir<'a> {
        crate::output::OutputDir {
            path: out,
            key: "output_dir",
            command,
            legacy: &["metrics.jsonl"],
        }
    }

    /// Refuses an `output_dir` that would overwrite the model, the `[eval]` prompts or `inputs`, or a non-empty
    /// folder not written by `command` (unless `overwrite`), before anything is loaded.
    pub fn check_output(
        &self,
        out: &std::path::Path,
        command: &str,
        inputs: &[crate::output::Input],
    ) -> anyhow::Result<()> {
        use crate::output::Input;
        let model = std::path::Path::new(&self.model);
        let mut all = vec![Input::new("model", model)];
        if let Some(p) = &self.eval.prompts {
            all.push(Input::new("[eval] prompts file", p));
        }
        all.extend_from_slice(inputs);
        self.output_guard(out, command).check(&all, self.overwrite)
    }

    /// Checks every shared value (before anything is loaded).
    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.model.is_empty(),
            "`model` is required (a model folder or hub id)"
        );
        ensure!(
            self.mode == TrainMode::Lora || self.dtype == DTypeSpec::F32,
            "mode = \"full\" keeps f32 weights: set dtype = \"f32\" (got {})",
            self.dtype
        );
        if self.mode == TrainMode::Lora {
            self.lora.validate().context("[lora]")?;
            ensure!(
                !self.gradient_checkpointing || self.lora.dropout == 0.0,
                "gradient_checkpointing = true needs lora.dropout = 0 (a recomputed block would draw another \
                 dropout mask; got dropout {})",
                self.lora.dropout
            );
        }
        self.optim.validate()?;
        self.validation.validate()?;
        self.eval.validate()
    }
}
