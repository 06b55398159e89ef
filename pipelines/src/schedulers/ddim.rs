//! DDIM (Song et al. 2021), `DDIMScheduler`, plus the per-sample DDIM step with log-probability used by
//! DDPO / SPO.
//!
//! From timestep `t` to `t' = t - T // n` (diffusers uses this step ratio for every spacing), with
//! `a = abar_t`, `a' = abar_{t'}` (`t' < 0`: 1 if `set_alpha_to_one`, else `abar_0`):
//!
//! ```text
//! x0  = (x_t - sqrt(1 - a) eps) / sqrt(a)                 (epsilon; v: x0 = sqrt(a) x_t - sqrt(1-a) v,
//!                                                          eps = sqrt(a) v + sqrt(1-a) x_t; sample: x0 = output,
//!                                                          eps = (x_t - sqrt(a) x0) / sqrt(1-a))
//! x0  = clamp(x0, -r, r)                                  (clip_sample)
//! var = (1 - a') / (1 - a) * (1 - a / a')                 (DDIM eq. 16)
//! std = eta sqrt(var)
//! mean = sqrt(a') x0 + sqrt(1 - a' - std^2) eps           (DDIM eq. 12)
//! x_t' = mean + std z,   z ~ N(0, I)                      (z only when eta > 0)
//! ```
//!
//! eta = 0 is the deterministic DDIM sampler, eta = 1 the DDPM-like ancestral one.

use super::schedule::NoiseSchedule;
use super::{
    check_index, check_steps, compute_dtype, discrete_timesteps, noise_or_randn, PredictionType,
    Scheduler, SchedulerConfig, SchedulerKind, StepOutput,
};
use crate::error::{Error, Result};
use candle_core::Tensor;

/// `DDIMScheduler`.
#[derive(Clone, Debug)]
pub struct DdimScheduler {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    eta: f64,
}

impl DdimScheduler {
    /// A DDIM scheduler with eta = 0.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        config.check_supported(SchedulerKind::Ddim)?;
        Ok(DdimScheduler {
            config: config.clone(),
            schedule: NoiseSchedule::new(config)?,
            timesteps: vec![],
            eta: 0.0,
        })
    }

    /// Builder form of [`Scheduler::set_eta`].
    pub fn with_eta(mut self, eta: f64) -> Self {
        self.eta = eta;
        self
    }

    /// `T // n`, the distance to the previous timestep.
    pub fn step_ratio(&self) -> usize {
        self.config.num_train_timesteps / self.timesteps.len().max(1)
    }

    fn alpha_prev(&self, prev_t: i64) -> f64 {
        if prev_t >= 0 {
            self.schedule.alphas_cumprod()[prev_t as usize]
        } else {
            self.schedule.final_alpha_cumprod()
        }
    }

    /// The variance of the step from `t` to `prev_t`: `(1 - a') / (1 - a) * (1 - a / a')`.
    pub fn variance(&self, t: i64, prev_t: i64) -> f64 {
        let a = self.schedule.alphas_cumprod()[t as usize];
        let ap = self.alpha_prev(prev_t);
        (1.0 - ap) / (1.0 - a) * (1.0 - a / ap)
    }
}

/// `(x0, eps)` from a model output with scalar `a = abar_t` (in `x`'s dtype).
fn x0_eps_scalar(pred: PredictionType, m: &Tensor, x: &Tensor, a: f64) -> Result<(Tensor, Tensor)> {
    let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
    Ok(match pred {
        PredictionType::Epsilon => (((x - (m * sb)?)? / sa)?, m.clone()),
        PredictionType::Sample => (m.clone(), ((x - (m * sa)?)? / sb)?),
        PredictionType::VPrediction => (((x * sa)? - (m * sb)?)?, ((m * sa)? + (x * sb)?)?),
    })
}

impl Scheduler for DdimScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
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
            self.config.spacing_for(SchedulerKind::Ddim),
            self.config.num_train_timesteps,
            n,
            self.config.steps_offset,
        )?;
        Ok(())
    }
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn needs_noise(&self, _step_index: usize) -> bool {
        self.eta > 0.0
    }
    fn eta(&self) -> f64 {
        self.eta
    }
    fn set_eta(&mut self, eta: f64) -> Result<()> {
        if !(eta >= 0.0 && eta.is_finite()) {
            return Err(Error::msg(format!(
                "DDIM eta must be finite and >= 0, got {eta}"
            )));
        }
        self.eta = eta;
        Ok(())
    }
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        check_index(SchedulerKind::Ddim, step_index, self.timesteps.len())?;
        let dt = compute_dtype(sample.dtype());
        let x = sample.to_dtype(dt)?;
        let m = model_output.to_dtype(dt)?;
        let t = self.timesteps[step_index] as i64;
        let prev_t = t - self.step_ratio() as i64;
        let a = self.schedule.alphas_cumprod()[t as usize];
        let ap = self.alpha_prev(prev_t);
        let (mut x0, eps) = x0_eps_scalar(self.config.prediction_type, &m, &x, a)?;
        if let Some(r) = self.schedule.clip_sample() {
            x0 = x0.clamp(-r, r)?;
        }
        let std = self.eta * self.variance(t, prev_t).sqrt();
        let mean = ((&x0 * ap.sqrt())? + (eps * (1.0 - ap - std * std).sqrt())?)?;
        let prev = if self.eta > 0.0 {
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

/// How [`ddim_step_with_logprob`] gets `x_{t-1}`.
#[derive(Clone, Copy, Debug)]
pub enum DdimTransition<'a> {
    /// Sample `x_{t-1} = mean + std * noise` with this noise.
    Noise(&'a Tensor),
    /// Evaluate the log-probability of this given `x_{t-1}` (e.g. a stored trajectory, PPO-style ratios).
    PrevSample(&'a Tensor),
    /// Sample with fresh `Tensor::randn` noise.
    Random,
}

/// The output of [`ddim_step_with_logprob`]; per-sample tensors are `[B]`, the others like the sample.
#[derive(Clone, Debug)]
pub struct DdimLogProb {
    /// `x_{t-1}` (the given one for [`DdimTransition::PrevSample`]).
    pub prev_sample: Tensor,
    /// The Gaussian mean (differentiable w.r.t. the model output).
    pub mean: Tensor,
    /// The Gaussian std per sample, `[B]`.
    pub std: Tensor,
    /// `log p(x_{t-1} | x_t)` per sample, `[B]`: the MEAN over (C, H, W) of the elementwise Gaussian
    /// log-density (DDPO / trl convention).
    pub log_prob: Tensor,
    /// The (clipped, if `clip_sample`) predicted x0.
    pub pred_original_sample: Tensor,
}

/// The DDIM step with per-sample timesteps and its Gaussian log-probability, as DDPO / SPO (trl's
/// `ddim_step_with_logprob`) compute it:
///
/// ```text
/// t' = clamp(t - step_ratio, 0, T-1)        (trl convention: at the last step abar_prev = abar_0,
///                                             whatever set_alpha_to_one says)
/// x0, eps from the model output (clamped to clip_sample_range if clip_sample)
/// var = (1 - a') / (1 - a) * (1 - a / a'),   std = eta sqrt(var)
/// mean = sqrt(a') x0 + sqrt(1 - a' - std^2) eps
/// x_{t-1} = mean + std z                     (or the given prev_sample)
/// log_prob = mean_{C,H,W} [ -(x_{t-1} - mean)^2 / (2 std^2) - ln std - ln sqrt(2 pi) ]
/// ```
///
/// `timesteps` is `[B]` (integer or integer-valued float), `step_ratio` is `T // num_inference_steps`.
/// `x_{t-1}` enters the log-density DETACHED (trl does the same): gradients flow into `model_output` (and
/// `sample`) through the mean only. Everything is computed in the sample's dtype (F32 for half types).
/// With eta = 0 the std is 0 and the log-probability is not finite.
pub fn ddim_step_with_logprob(
    schedule: &NoiseSchedule,
    model_output: &Tensor,
    timesteps: &Tensor,
    sample: &Tensor,
    eta: f64,
    step_ratio: usize,
    transition: DdimTransition<'_>,
) -> Result<DdimLogProb> {
    let dt = compute_dtype(sample.dtype());
    let x = sample.to_dtype(dt)?;
    let m = model_output.to_dtype(dt)?;
    let last = schedule.num_train_timesteps() as f64 - 1.0;
    let ac = schedule.alphas_cumprod();
    let at = |t: f64| -> Result<f64> {
        if t < 0.0 || t > last || t.fract() != 0.0 {
            return Err(Error::msg(format!(
                "DDIM log-prob: timestep {t} is not an integer in [0, {last}]"
            )));
        }
        Ok(ac[t as usize])
    };
    let prev = |t: f64| (t - step_ratio as f64).clamp(0.0, last);
    let variance = |t: f64| -> Result<f64> {
        let a = at(t)?;
        let ap = at(prev(t))?;
        Ok((1.0 - ap) / (1.0 - a) * (1.0 - a / ap))
    };
    let sa = schedule.per_sample(timesteps, &x, |t| Ok(at(t)?.sqrt()))?;
    let sb = schedule.per_sample(timesteps, &x, |t| Ok((1.0 - at(t)?).sqrt()))?;
    let sap = schedule.per_sample(timesteps, &x, |t| Ok(at(prev(t))?.sqrt()))?;
    let std = schedule.per_sample(timesteps, &x, |t| Ok(eta * variance(t)?.sqrt()))?;
    let dir = schedule.per_sample(timesteps, &x, |t| {
        let ap = at(prev(t))?;
        let s = eta * variance(t)?.sqrt();
        Ok((1.0 - ap - s * s).sqrt())
    })?;
    let (mut x0, eps) = match schedule.prediction_type() {
        PredictionType::Epsilon => ((&x - m.broadcast_mul(&sb)?)?.broadcast_div(&sa)?, m.clone()),
        PredictionType::Sample => (m.clone(), (&x - m.broadcast_mul(&sa)?)?.broadcast_div(&sb)?),
        PredictionType::VPrediction => (
            (x.broadcast_mul(&sa)? - m.broadcast_mul(&sb)?)?,
            (m.broadcast_mul(&sa)? + x.broadcast_mul(&sb)?)?,
        ),
    };
    if let Some(r) = schedule.clip_sample() {
        x0 = x0.clamp(-r, r)?;
    }
    let mean = (x0.broadcast_mul(&sap)? + eps.broadcast_mul(&dir)?)?;
    let prev_sample = match transition {
        DdimTransition::PrevSample(p) => p.to_dtype(dt)?,
        DdimTransition::Noise(z) => {
            (&mean + noise_or_randn(Some(z), &x, dt)?.broadcast_mul(&std)?)?
        }
        DdimTransition::Random => (&mean + noise_or_randn(None, &x, dt)?.broadcast_mul(&std)?)?,
    };
    let diff = (prev_sample.detach() - &mean)?;
    let var2 = (std.sqr()? * 2.0)?;
    let half_ln_2pi = 0.5 * (2.0 * std::f64::consts::PI).ln();
    let elem = ((diff
        .sqr()?
        .broadcast_div(&var2)?
        .neg()?
        .broadcast_sub(&std.log()?))?
        - half_ln_2pi)?;
    let b = x.dim(0)?;
    let log_prob = elem.reshape((b, ()))?.mean(1)?;
    let out_dt = sample.dtype();
    Ok(DdimLogProb {
        prev_sample: prev_sample.to_dtype(out_dt)?,
        mean: mean.to_dtype(out_dt)?,
        std: std.flatten_all()?.to_dtype(out_dt)?,
        log_prob: log_prob.to_dtype(out_dt)?,
        pred_original_sample: x0.to_dtype(out_dt)?,
    })
}
