//! Noise schedulers, numerically matching diffusers 0.42 (checked against golden tensors).
//!
//! * [`SchedulerConfig`] — `scheduler_config.json`, every diffusers key of these classes with diffusers'
//!   defaults ([`config`]).
//! * [`NoiseSchedule`] — betas / `alphas_cumprod` and the per-sample forward process used by training
//!   (`add_noise`, `velocity`, `target`, `snr`, `sigma`) ([`schedule`]).
//! * The [`Scheduler`] trait (object safe) run by the text-to-image pipeline, implemented by
//!   [`DdimScheduler`], [`DdpmScheduler`], [`EulerDiscreteScheduler`], [`EulerAncestralDiscreteScheduler`] and
//!   [`DpmSolverMultistepScheduler`] (DPM-Solver++ 2M by default).
//! * [`ddim_step_with_logprob`] — the per-sample, differentiable DDIM step with its Gaussian log-probability
//!   (DDPO / SPO).
//!
//! # The sampling loop
//!
//! ```text
//! sched.set_timesteps(n)?;
//! let mut x = x_T * sched.init_noise_sigma();
//! for (i, t) in sched.timesteps().to_vec().into_iter().enumerate() {
//!     let input = sched.scale_model_input(&x, i)?;          // Euler: x / sqrt(sigma_i^2 + 1)
//!     let out = unet(input, t)?;                             // t may be fractional (Euler)
//!     let noise = sched.needs_noise(i).then(|| my_seeded_noise());
//!     x = sched.step(&out, i, &x, noise.as_ref())?.prev_sample;
//! }
//! ```
//!
//! Steps are addressed by their index in [`Scheduler::timesteps`] (diffusers looks the timestep value up;
//! same thing for these schedules). Multistep schedulers (DPM-Solver) keep a history and must be stepped in
//! order from index 0 (index 0 resets it).
//!
//! Dtypes: the step arithmetic runs in the sample's dtype, upcast to F32 for F16 / BF16 (diffusers upcasts
//! Euler / DPM samples to float32 too); `prev_sample` and `pred_original_sample` come back in the sample's
//! dtype, on its device.
//!
//! # Building from a config
//!
//! [`build`] makes any [`SchedulerKind`] from any config, keeping the config's values — as diffusers'
//! `Scheduler.from_config(other.config)` does: Euler built from the saved SD1.5 DDIM config runs `leading`
//! spacing with `steps_offset` 1 (its own default would be `linspace`). [`build_from_config`] picks the kind from
//! `_class_name`. `PNDMScheduler` and `LMSDiscreteScheduler` (the SD1.x hub default is PNDM, with
//! `skip_prk_steps`) are NOT implemented: [`SchedulerKind::from_class_name`] maps them to DDIM, which runs the
//! same timesteps with a different (first-order, deterministic) update, so images differ from a diffusers
//! PNDM / LMS run.

pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod dpmpp_2m;
pub mod euler;
pub mod euler_ancestral;
pub mod schedule;

pub use config::{
    AlgorithmType, BetaSchedule, FinalSigmasType, InterpolationType, PredictionType,
    SchedulerConfig, SolverType, TimestepSpacing, TimestepType, VarianceType,
};
pub use ddim::{ddim_step_with_logprob, DdimLogProb, DdimScheduler, DdimTransition};
pub use ddpm::DdpmScheduler;
pub use dpmpp_2m::DpmSolverMultistepScheduler;
pub use euler::EulerDiscreteScheduler;
pub use euler_ancestral::EulerAncestralDiscreteScheduler;
pub use schedule::{timesteps_to_host, NoiseSchedule};

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// The result of one scheduler step.
#[derive(Clone, Debug)]
pub struct StepOutput {
    /// `x_{t-1}`, the sample to feed the next step (dtype / device of the input sample).
    pub prev_sample: Tensor,
    /// The model's estimate of the clean sample `x0` at this step (DPM-Solver: the converted model output).
    pub pred_original_sample: Tensor,
    /// For stochastic steps, the mean of the Gaussian transition: `prev_sample = mean + std * noise`
    /// (DDIM, DDPM, Euler ancestral, SDE-DPM-Solver++). `None` for deterministic schedulers.
    pub mean: Option<Tensor>,
    /// The transition's standard deviation (the same for every element and sample; 0 for a deterministic
    /// DDIM step). `None` for deterministic schedulers.
    pub std: Option<f64>,
}

/// A sampling scheduler, as the text-to-image pipeline drives it. Object safe: use `Box<dyn Scheduler>`.
pub trait Scheduler: Send + Sync + std::fmt::Debug {
    /// Which scheduler this is.
    fn kind(&self) -> SchedulerKind;
    /// The config it was built from.
    fn config(&self) -> &SchedulerConfig;
    /// The training noise schedule.
    fn schedule(&self) -> &NoiseSchedule;
    /// What the model predicts.
    fn prediction_type(&self) -> PredictionType {
        self.config().prediction_type
    }
    /// Lays out `num_inference_steps` steps (and resets any multistep history).
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;
    /// The timesteps to feed the model, one per step (integers, except Euler-type: fractional float32 values).
    /// Empty before [`set_timesteps`](Self::set_timesteps).
    fn timesteps(&self) -> &[f64];
    /// The dtype diffusers gives `scheduler.timesteps`: I64, or F32 for Euler-type schedulers.
    fn timestep_dtype(&self) -> DType {
        DType::I64
    }
    /// [`timesteps`](Self::timesteps) as a `[n]` tensor of [`timestep_dtype`](Self::timestep_dtype).
    fn timesteps_tensor(&self, device: &Device) -> Result<Tensor> {
        let t = self.timesteps();
        Ok(match self.timestep_dtype() {
            DType::I64 => Tensor::from_vec(
                t.iter().map(|x| *x as i64).collect::<Vec<_>>(),
                t.len(),
                device,
            )?,
            dt => Tensor::from_vec(t.to_vec(), t.len(), device)?.to_dtype(dt)?,
        })
    }
    /// The sigma schedule (`n + 1` values, the last the final sigma) of sigma-based schedulers.
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }
    /// Number of inference steps set.
    fn num_inference_steps(&self) -> usize {
        self.timesteps().len()
    }
    /// The standard deviation of the initial noise: `x_T = noise * init_noise_sigma`.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// The model input for step `step_index` (identity except for Euler-type: `x / sqrt(sigma^2 + 1)`).
    fn scale_model_input(&self, sample: &Tensor, _step_index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// Whether [`step`](Self::step) at `step_index` consumes a noise tensor (with the sample's shape). True
    /// exactly where diffusers draws one, so that passing the same noise reproduces a diffusers run.
    fn needs_noise(&self, step_index: usize) -> bool;
    /// One denoising step from `timesteps()[step_index]` to the next. `noise`: the step's Gaussian noise where
    /// [`needs_noise`](Self::needs_noise) (drawn with `Tensor::randn` on the sample's device when `None`);
    /// ignored otherwise.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<StepOutput>;
    /// Forgets multistep history (no-op for single-step schedulers).
    fn reset(&mut self) {}
    /// DDIM's eta (0 for the others).
    fn eta(&self) -> f64 {
        0.0
    }
    /// Sets DDIM's eta; other schedulers accept only 0.
    fn set_eta(&mut self, eta: f64) -> Result<()> {
        if eta == 0.0 {
            Ok(())
        } else {
            Err(Error::msg(format!(
                "{} has no eta (only DDIM does); got {eta}",
                self.kind().class_name()
            )))
        }
    }
    /// A boxed copy (same config, timesteps and state).
    fn clone_box(&self) -> Box<dyn Scheduler>;
}

impl Clone for Box<dyn Scheduler> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// The scheduler classes implemented here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `DDIMScheduler` (`ddim`).
    Ddim,
    /// `DDPMScheduler` (`ddpm`).
    Ddpm,
    /// `EulerDiscreteScheduler` (`euler`).
    Euler,
    /// `EulerAncestralDiscreteScheduler` (`euler-a`).
    EulerAncestral,
    /// `DPMSolverMultistepScheduler` (`dpmpp-2m`; DPM-Solver++ 2M with the default config).
    DpmPp2m,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 5] = [
        SchedulerKind::Ddim,
        SchedulerKind::Ddpm,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2m,
    ];

    /// Parses a command-line name: `ddim`, `ddpm`, `euler`, `euler-a` (also `euler_a`, `euler_ancestral`),
    /// `dpmpp-2m` (also `dpmpp_2m`, `dpm++2m`, `dpm-solver++`), case-insensitive; a diffusers class name works too.
    pub fn parse(name: &str) -> Result<Self> {
        let n = name.trim().to_ascii_lowercase();
        Ok(match n.as_str() {
            "ddim" => SchedulerKind::Ddim,
            "ddpm" => SchedulerKind::Ddpm,
            "euler" => SchedulerKind::Euler,
            "euler-a" | "euler_a" | "euler_ancestral" | "euler-ancestral" => {
                SchedulerKind::EulerAncestral
            }
            "dpmpp-2m" | "dpmpp_2m" | "dpm++2m" | "dpm++-2m" | "dpm-solver++" | "dpmsolver++" => {
                SchedulerKind::DpmPp2m
            }
            _ => {
                return Self::from_class_name(name.trim()).map_err(|_| {
                    Error::msg(format!(
                    "unknown scheduler `{name}` (expected ddim, ddpm, euler, euler-a or dpmpp-2m)"
                ))
                })
            }
        })
    }

    /// Maps a diffusers `_class_name`. `PNDMScheduler` / `LMSDiscreteScheduler` (not implemented) map to DDIM:
    /// same timesteps, different update rule (see the [module docs](self)).
    pub fn from_class_name(class: &str) -> Result<Self> {
        Ok(match class {
            "DDIMScheduler" | "PNDMScheduler" | "LMSDiscreteScheduler" => SchedulerKind::Ddim,
            "DDPMScheduler" => SchedulerKind::Ddpm,
            "EulerDiscreteScheduler" => SchedulerKind::Euler,
            "EulerAncestralDiscreteScheduler" => SchedulerKind::EulerAncestral,
            "DPMSolverMultistepScheduler" => SchedulerKind::DpmPp2m,
            other => {
                return Err(Error::unsupported(
                    "scheduler_config",
                    "_class_name",
                    other,
                    "expected DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, \
                     EulerAncestralDiscreteScheduler or DPMSolverMultistepScheduler",
                ))
            }
        })
    }

    /// The diffusers class name.
    pub fn class_name(&self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Ddpm => "DDPMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmPp2m => "DPMSolverMultistepScheduler",
        }
    }

    /// The short name [`parse`](Self::parse) accepts.
    pub fn name(&self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Ddpm => "ddpm",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmPp2m => "dpmpp-2m",
        }
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

/// Builds `kind` from `config` (diffusers `from_config` semantics: the config's values are kept, keys it lacks
/// take `kind`'s defaults). Unsupported values for `kind` error ([`SchedulerConfig::check_supported`]).
pub fn build(kind: SchedulerKind, config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(DdimScheduler::new(config)?),
        SchedulerKind::Ddpm => Box::new(DdpmScheduler::new(config)?),
        SchedulerKind::Euler => Box::new(EulerDiscreteScheduler::new(config)?),
        SchedulerKind::EulerAncestral => Box::new(EulerAncestralDiscreteScheduler::new(config)?),
        SchedulerKind::DpmPp2m => Box::new(DpmSolverMultistepScheduler::new(config)?),
    })
}

/// Builds the scheduler named by the config's `_class_name` (DDIM when it has none).
pub fn build_from_config(config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    let kind = match &config.class_name {
        Some(c) => SchedulerKind::from_class_name(c).map_err(|_| {
            Error::unsupported(
                config.source.clone(),
                "_class_name",
                c,
                "expected DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler or \
                 DPMSolverMultistepScheduler (PNDM / LMS map to DDIM)",
            )
        })?,
        None => SchedulerKind::Ddim,
    };
    build(kind, config)
}

/// Integer timesteps of DDIM / DDPM for `n` steps (`scheduling_ddim.set_timesteps`):
/// linspace `round(linspace(0, T-1, n))` reversed; leading `arange(n) * (T // n)` reversed `+ steps_offset`;
/// trailing `round(arange(T, 0, -T/n)) - 1`. Rounding is numpy's (half to even).
pub(crate) fn discrete_timesteps(
    spacing: TimestepSpacing,
    num_train: usize,
    n: usize,
    steps_offset: usize,
) -> Result<Vec<f64>> {
    check_steps(num_train, n)?;
    let t = num_train as f64;
    Ok(match spacing {
        TimestepSpacing::Linspace => schedule::np_linspace(0.0, t - 1.0, n)
            .into_iter()
            .rev()
            .map(|x| x.round_ties_even())
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = num_train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => schedule::np_arange(t, 0.0, -(t / n as f64))
            .into_iter()
            .map(|x| x.round_ties_even() - 1.0)
            .collect(),
    })
}

pub(crate) fn check_steps(num_train: usize, n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::msg("num_inference_steps must be at least 1"));
    }
    if n > num_train {
        return Err(Error::msg(format!(
            "num_inference_steps {n} cannot be larger than num_train_timesteps {num_train}"
        )));
    }
    Ok(())
}

pub(crate) fn check_index(kind: SchedulerKind, step_index: usize, n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::msg(format!(
            "{}: call set_timesteps before step",
            kind.class_name()
        )));
    }
    if step_index >= n {
        return Err(Error::msg(format!(
            "{}: step index {step_index} out of range ({n} steps)",
            kind.class_name()
        )));
    }
    Ok(())
}

/// The dtype step arithmetic runs in: F32 for half types, else the sample's.
pub(crate) fn compute_dtype(dt: DType) -> DType {
    match dt {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// `noise` converted to `dtype` on `like`'s device, or fresh N(0, 1) noise with `like`'s shape.
pub(crate) fn noise_or_randn(
    noise: Option<&Tensor>,
    like: &Tensor,
    dtype: DType,
) -> Result<Tensor> {
    match noise {
        Some(n) => {
            if n.dims() != like.dims() {
                return Err(Error::msg(format!(
                    "step noise has shape {:?}, the sample {:?}",
                    n.dims(),
                    like.dims()
                )));
            }
            Ok(n.to_device(like.device())?.to_dtype(dtype)?)
        }
        None => Ok(Tensor::randn(0f32, 1f32, like.shape(), like.device())?.to_dtype(dtype)?),
    }
}
