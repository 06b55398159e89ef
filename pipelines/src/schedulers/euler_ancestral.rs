//! Euler ancestral (k-diffusion `sample_euler_ancestral`, eta = 1), `EulerAncestralDiscreteScheduler`.
//!
//! Same timesteps, sigmas (linear interpolation, final sigma 0), `init_noise_sigma` and model-input scaling as
//! [Euler](super::euler). Each step splits the move from `sigma_i` to `sigma_{i+1}` into a deterministic Euler
//! step down to `sigma_down` and fresh noise of std `sigma_up`:
//!
//! ```text
//! x0         = x - sigma_i eps            (epsilon; v: -sigma/sqrt(sigma^2+1) v + x/(sigma^2+1); sample: output)
//! sigma_up   = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2)
//! sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2)
//! mean       = x + (x - x0) / sigma_i * (sigma_down - sigma_i)
//! x_{i+1}    = mean + sigma_up z
//! ```
//!
//! Noise is drawn at every step (diffusers does so even at the last, where `sigma_up = 0`).

use super::euler::{
    euler_init_noise_sigma, euler_pred_x0, euler_timesteps, scale_by_sigma, step_indices_for,
};
use super::schedule::{np_interp_index, NoiseSchedule};
use super::{
    check_index, compute_dtype, noise_or_randn, Scheduler, SchedulerConfig, SchedulerKind,
    StepOutput,
};
use crate::error::Result;
use candle_core::{DType, Tensor};

/// `EulerAncestralDiscreteScheduler`.
#[derive(Clone, Debug)]
pub struct EulerAncestralDiscreteScheduler {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
}

impl EulerAncestralDiscreteScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        config.check_supported(SchedulerKind::EulerAncestral)?;
        Ok(EulerAncestralDiscreteScheduler {
            config: config.clone(),
            schedule: NoiseSchedule::new(config)?.with_terminal_clamp(config),
            timesteps: vec![],
            sigmas: vec![],
        })
    }

    /// `(sigma_up, sigma_down)` of step `step_index`.
    pub fn sigma_up_down(&self, step_index: usize) -> (f64, f64) {
        let (from, to) = (self.sigmas[step_index], self.sigmas[step_index + 1]);
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).max(0.0).sqrt();
        (up, down)
    }

    /// `x0 + sigma_i noise` where `t_b` must be on the current schedule (diffusers' `add_noise`).
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let idx = step_indices_for(&self.timesteps, timesteps)?;
        let vals: Vec<f64> = idx.iter().map(|i| self.sigmas[*i]).collect();
        let mut shape = vec![1usize; x0.rank()];
        shape[0] = vals.len();
        let s = Tensor::from_vec(vals, shape, x0.device())?.to_dtype(x0.dtype())?;
        Ok((x0 + noise.to_dtype(x0.dtype())?.broadcast_mul(&s)?)?)
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
    }
    fn config(&self) -> &SchedulerConfig {
        &self.config
    }
    fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let timesteps = euler_timesteps(&self.config, SchedulerKind::EulerAncestral, n)?;
        let table = self.schedule.sigma_table();
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|t| np_interp_index(*t, &table) as f32 as f64)
            .collect();
        sigmas.push(0.0);
        self.sigmas = sigmas;
        self.timesteps = timesteps;
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
        euler_init_noise_sigma(
            &self.sigmas,
            self.config.spacing_for(SchedulerKind::EulerAncestral),
        )
    }
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(
            SchedulerKind::EulerAncestral,
            step_index,
            self.timesteps.len(),
        )?;
        scale_by_sigma(sample, self.sigmas[step_index])
    }
    fn needs_noise(&self, _step_index: usize) -> bool {
        true
    }
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        check_index(
            SchedulerKind::EulerAncestral,
            step_index,
            self.timesteps.len(),
        )?;
        let dt = compute_dtype(sample.dtype());
        let x = sample.to_dtype(dt)?;
        let m = model_output.to_dtype(dt)?;
        let sigma = self.sigmas[step_index];
        let x0 = euler_pred_x0(self.config.prediction_type, &m, &x, sigma)?;
        let (up, down) = self.sigma_up_down(step_index);
        let derivative = ((&x - &x0)? / sigma)?;
        let mean = (&x + (derivative * (down - sigma))?)?;
        let z = noise_or_randn(noise, &x, dt)?;
        let prev = (&mean + (z * up)?)?;
        let out_dt = sample.dtype();
        Ok(StepOutput {
            prev_sample: prev.to_dtype(out_dt)?,
            pred_original_sample: x0.to_dtype(out_dt)?,
            mean: Some(mean.to_dtype(out_dt)?),
            std: Some(up),
        })
    }
    fn clone_box(&self) -> Box<dyn Scheduler> {
        Box::new(self.clone())
    }
}
