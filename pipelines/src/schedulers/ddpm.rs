//! DDPM ancestral sampling (Ho et al. 2020), `DDPMScheduler`.
//!
//! From timestep `t` to `t'` = the next entry of the schedule (`-1` after the last, where `abar = 1`), with
//! `a = abar_t`, `a' = abar_{t'}`, `alpha = a / a'`, `beta = 1 - alpha`:
//!
//! ```text
//! x0   = (x_t - sqrt(1 - a) eps) / sqrt(a)            (epsilon; v: sqrt(a) x_t - sqrt(1-a) v; sample: output)
//! x0   = clamp(x0, -r, r)                             (clip_sample)
//! mean = sqrt(a') beta / (1 - a) x0 + sqrt(alpha) (1 - a') / (1 - a) x_t     (posterior mean, DDPM eq. 7)
//! var  = max((1 - a') / (1 - a) beta, 1e-20)          (fixed_small / fixed_small_log; fixed_large: beta)
//! x_t' = mean + sqrt(var) z                           (z only for t > 0)
//! ```

use super::schedule::NoiseSchedule;
use super::{
    check_index, check_steps, compute_dtype, discrete_timesteps, noise_or_randn, PredictionType,
    Scheduler, SchedulerConfig, SchedulerKind, StepOutput, VarianceType,
};
use crate::error::Result;
use candle_core::Tensor;

/// `DDPMScheduler` (variance types fixed_small, fixed_small_log, fixed_large).
#[derive(Clone, Debug)]
pub struct DdpmScheduler {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    variance_type: VarianceType,
}

impl DdpmScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        config.check_supported(SchedulerKind::Ddpm)?;
        Ok(DdpmScheduler {
            config: config.clone(),
            schedule: NoiseSchedule::new(config)?,
            timesteps: vec![],
            variance_type: config.variance_type.unwrap_or(VarianceType::FixedSmall),
        })
    }

    fn prev_timestep(&self, step_index: usize) -> i64 {
        self.timesteps
            .get(step_index + 1)
            .map(|t| *t as i64)
            .unwrap_or(-1)
    }

    /// The standard deviation of the noise added at step `step_index` (0 at t = 0).
    pub fn step_std(&self, step_index: usize) -> f64 {
        let t = self.timesteps[step_index] as i64;
        if t <= 0 {
            return 0.0;
        }
        let ac = self.schedule.alphas_cumprod();
        let a = ac[t as usize];
        let prev_t = self.prev_timestep(step_index);
        let ap = if prev_t >= 0 {
            ac[prev_t as usize]
        } else {
            1.0
        };
        let beta = 1.0 - a / ap;
        match self.variance_type {
            VarianceType::FixedLarge => beta.sqrt(),
            _ => ((1.0 - ap) / (1.0 - a) * beta).max(1e-20).sqrt(),
        }
    }
}

impl Scheduler for DdpmScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddpm
    }
    fn config(&self) -> &SchedulerConfig {
        &self.config
    }
    fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(self.config.num_train_timesteps, n)?;
        self.timesteps = discrete_timesteps(
            self.config.spacing_for(SchedulerKind::Ddpm),
            self.config.num_train_timesteps,
            n,
            self.config.steps_offset,
        )?;
        Ok(())
    }
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn needs_noise(&self, step_index: usize) -> bool {
        self.timesteps.get(step_index).is_some_and(|t| *t > 0.0)
    }
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        check_index(SchedulerKind::Ddpm, step_index, self.timesteps.len())?;
        let dt = compute_dtype(sample.dtype());
        let x = sample.to_dtype(dt)?;
        let m = model_output.to_dtype(dt)?;
        let t = self.timesteps[step_index] as i64;
        let prev_t = self.prev_timestep(step_index);
        let ac = self.schedule.alphas_cumprod();
        let a = ac[t as usize];
        let ap = if prev_t >= 0 {
            ac[prev_t as usize]
        } else {
            1.0
        };
        let (bp, bpp) = (1.0 - a, 1.0 - ap);
        let cur_alpha = a / ap;
        let cur_beta = 1.0 - cur_alpha;
        let mut x0 = match self.config.prediction_type {
            PredictionType::Epsilon => ((&x - (&m * bp.sqrt())?)? / a.sqrt())?,
            PredictionType::Sample => m.clone(),
            PredictionType::VPrediction => ((&x * a.sqrt())? - (&m * bp.sqrt())?)?,
        };
        if let Some(r) = self.schedule.clip_sample() {
            x0 = x0.clamp(-r, r)?;
        }
        let c_x0 = ap.sqrt() * cur_beta / bp;
        let c_x = cur_alpha.sqrt() * bpp / bp;
        let mean = ((&x0 * c_x0)? + (&x * c_x)?)?;
        let std = self.step_std(step_index);
        let prev = if self.needs_noise(step_index) {
            let z = noise_or_randn(noise, &x, dt)?;
            (&mean + (z * std)?)?
        } else {
            mean.clone()
        };
        let out_dt = sample.dtype();
        Ok(StepOutput {
            prev_sample: prev.to_dtype(out_dt)?,
            pred_original_sample: x0.to_dtype(out_dt)?,
            mean: Some(mean.to_dtype(out_dt)?),
            std: Some(std),
        })
    }
    fn clone_box(&self) -> Box<dyn Scheduler> {
        Box::new(self.clone())
    }
}
