//! Euler (Karras et al. 2022, Algorithm 2 with `s_churn = 0`), `EulerDiscreteScheduler`.
//!
//! Works in the variance-exploding parameterisation `x = x0 + sigma eps`, `sigma_t = sqrt((1 - abar_t) /
//! abar_t)`. `set_timesteps(n)` spaces (fractional, float32) timesteps by `timestep_spacing`, and
//! `sigma_i = interp(t_i, arange(T), sigma_table)` (linear interpolation), then appends the final sigma (0, or
//! `sigma_0` with `final_sigmas_type = sigma_min`). With `use_karras_sigmas` / `use_exponential_sigmas` the
//! sigmas are re-spaced and the timesteps recovered by log-sigma interpolation.
//!
//! ```text
//! x_T         = z * init_noise_sigma,   init_noise_sigma = sigma_max (linspace / trailing),
//!                                                          sqrt(sigma_max^2 + 1) (leading)
//! model input = x / sqrt(sigma_i^2 + 1)
//! x0          = x - sigma_i eps           (epsilon; v: x0 = -sigma/sqrt(sigma^2+1) v + x / (sigma^2 + 1);
//!                                          sample: x0 = output)
//! d           = (x - x0) / sigma_i
//! x_{i+1}     = x + d (sigma_{i+1} - sigma_i)
//! ```
//!
//! With `timestep_type = continuous` and v-prediction the model is fed `0.25 ln(sigma_i)` as timestep.

use super::schedule::{
    exponential_sigmas, karras_sigmas, np_arange, np_interp_index, np_linspace, sigma_to_t,
    NoiseSchedule,
};
use super::{
    check_index, check_steps, compute_dtype, FinalSigmasType, PredictionType, Scheduler,
    SchedulerConfig, SchedulerKind, StepOutput, TimestepSpacing, TimestepType,
};
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};

/// `EulerDiscreteScheduler` (deterministic: `s_churn = 0`).
#[derive(Clone, Debug)]
pub struct EulerDiscreteScheduler {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
}

/// Float32 timesteps of Euler-type schedulers (`scheduling_euler_discrete.set_timesteps`).
pub(crate) fn euler_timesteps(
    config: &SchedulerConfig,
    kind: SchedulerKind,
    n: usize,
) -> Result<Vec<f64>> {
    let t = config.num_train_timesteps;
    check_steps(t, n)?;
    let f32r = |x: f64| x as f32 as f64;
    Ok(match config.spacing_for(kind) {
        TimestepSpacing::Linspace => np_linspace(0.0, t as f64 - 1.0, n)
            .into_iter()
            .rev()
            .map(f32r)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = t / n;
            (0..n)
                .rev()
                .map(|i| ((i * ratio) as f32 + config.steps_offset as f32) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange(t as f64, 0.0, -(t as f64 / n as f64))
            .into_iter()
            .map(|x| (x.round_ties_even() as f32 - 1.0) as f64)
            .collect(),
    })
}

/// `sqrt(sigma_max^2 + 1)` for leading spacing, `sigma_max` otherwise (float32 arithmetic).
pub(crate) fn euler_init_noise_sigma(sigmas: &[f64], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().cloned().fold(0.0f64, f64::max) as f32;
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
    }
}

/// `sample / sqrt(sigma^2 + 1)` in the sample's dtype.
pub(crate) fn scale_by_sigma(sample: &Tensor, sigma: f64) -> Result<Tensor> {
    let dt = compute_dtype(sample.dtype());
    let s = ((sigma as f32) * (sigma as f32) + 1.0).sqrt() as f64;
    Ok((sample.to_dtype(dt)? / s)?.to_dtype(sample.dtype())?)
}

/// Looks each timestep up in the schedule (diffusers' `index_for_timestep`: the second match if there are
/// two) and returns the step indices.
pub(crate) fn step_indices_for(
    schedule_timesteps: &[f64],
    timesteps: &Tensor,
) -> Result<Vec<usize>> {
    let ts = super::timesteps_to_host(timesteps)?;
    ts.iter()
        .map(|t| {
            let matches: Vec<usize> = schedule_timesteps
                .iter()
                .enumerate()
                .filter(|(_, s)| (**s as f32) == (*t as f32))
                .map(|(i, _)| i)
                .collect();
            match matches.len() {
                0 => Err(Error::msg(format!(
                    "timestep {t} is not on the scheduler's schedule"
                ))),
                1 => Ok(matches[0]),
                _ => Ok(matches[1]),
            }
        })
        .collect()
}

impl EulerDiscreteScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        config.check_supported(SchedulerKind::Euler)?;
        Ok(EulerDiscreteScheduler {
            config: config.clone(),
            schedule: NoiseSchedule::new(config)?.with_terminal_clamp(config),
            timesteps: vec![],
            sigmas: vec![],
        })
    }

    /// `EulerDiscreteScheduler.add_noise`: `x0 + sigma_i noise` where `t_b` must be on the current schedule.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let idx = step_indices_for(&self.timesteps, timesteps)?;
        let vals: Vec<f64> = idx.iter().map(|i| self.sigmas[*i] as f32 as f64).collect();
        let mut shape = vec![1usize; x0.rank()];
        shape[0] = vals.len();
        let s = Tensor::from_vec(vals, shape, x0.device())?.to_dtype(x0.dtype())?;
        Ok((x0 + noise.to_dtype(x0.dtype())?.broadcast_mul(&s)?)?)
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Euler
    }
    fn config(&self) -> &SchedulerConfig {
        &self.config
    }
    fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let c = &self.config;
        let mut timesteps = euler_timesteps(c, SchedulerKind::Euler, n)?;
        let table = self.schedule.sigma_table();
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|t| np_interp_index(*t, &table))
            .collect();
        if c.use_karras_sigmas || c.use_exponential_sigmas {
            let log_sigmas: Vec<f64> = table.iter().map(|s| (*s as f32).ln() as f64).collect();
            let smin = c.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let smax = c.sigma_max.unwrap_or(sigmas[0]);
            sigmas = if c.use_karras_sigmas {
                karras_sigmas(smin, smax, n)
            } else {
                exponential_sigmas(smin, smax, n)
            };
            timesteps = sigmas
                .iter()
                .map(|s| sigma_to_t(*s, &log_sigmas) as f32 as f64)
                .collect();
        }
        let last = match c.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => table[0],
        };
        sigmas.push(last);
        self.sigmas = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        self.timesteps = if c.timestep_type == TimestepType::Continuous
            && c.prediction_type == PredictionType::VPrediction
        {
            self.sigmas[..n]
                .iter()
                .map(|s| (0.25 * (*s as f32).ln()) as f64)
                .collect()
        } else {
            timesteps
        };
        Ok(())
    }
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn timestep_dtype(&self) -> DType {
        DType::F32
    }
    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }
    fn init_noise_sigma(&self) -> f64 {
        euler_init_noise_sigma(&self.sigmas, self.config.spacing_for(SchedulerKind::Euler))
    }
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(SchedulerKind::Euler, step_index, self.timesteps.len())?;
        scale_by_sigma(sample, self.sigmas[step_index])
    }
    fn needs_noise(&self, _step_index: usize) -> bool {
        false
    }
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        check_index(SchedulerKind::Euler, step_index, self.timesteps.len())?;
        let dt = compute_dtype(sample.dtype());
        let x = sample.to_dtype(dt)?;
        let m = model_output.to_dtype(dt)?;
        let sigma = self.sigmas[step_index];
        let x0 = euler_pred_x0(self.config.prediction_type, &m, &x, sigma)?;
        let derivative = ((&x - &x0)? / sigma)?;
        let prev = (&x + (derivative * (self.sigmas[step_index + 1] - sigma))?)?;
        let out_dt = sample.dtype();
        Ok(StepOutput {
            prev_sample: prev.to_dtype(out_dt)?,
            pred_original_sample: x0.to_dtype(out_dt)?,
            mean: None,
            std: None,
        })
    }
    fn clone_box(&self) -> Box<dyn Scheduler> {
        Box::new(self.clone())
    }
}

/// Euler-type x0 prediction at noise level `sigma` (variance-exploding sample `x`).
pub(crate) fn euler_pred_x0(
    pred: PredictionType,
    m: &Tensor,
    x: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    Ok(match pred {
        PredictionType::Epsilon => (x - (m * sigma)?)?,
        PredictionType::Sample => m.clone(),
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            ((m * (-sigma / s2.sqrt()))? + (x / s2)?)?
        }
    })
}
