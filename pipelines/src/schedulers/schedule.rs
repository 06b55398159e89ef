//! The training noise schedule shared by every scheduler, and the per-sample forward-process operations the
//! training losses use.
//!
//! Betas `beta_t` (t = 0..T-1) come from `beta_schedule` (or `trained_betas`), optionally rescaled to zero
//! terminal SNR; `alpha_t = 1 - beta_t`, `abar_t = prod_{s<=t} alpha_s` (`alphas_cumprod`). They are computed
//! as diffusers does — float32 linspace / square / `1 - beta`, cumulative product accumulated in double and
//! stored as float32 (what torch's CPU `cumprod` does) — and kept here as the float32 values widened to f64.
//!
//! Forward process (variance preserving), per sample b with its own timestep `t_b`:
//!
//! * `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`                         ([`NoiseSchedule::add_noise`])
//! * `v   = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`                         ([`NoiseSchedule::velocity`])
//! * `snr_t = abar_t / (1 - abar_t)`, `sigma_t = sqrt((1 - abar_t) / abar_t)` (the variance-exploding scale of
//!   Euler-type schedulers: `x_t / sqrt(abar_t) = x0 + sigma_t eps`)
//! * the training target by `prediction_type`: `eps` (epsilon), `v` (v_prediction), `x0` (sample)
//!   ([`NoiseSchedule::target`]).
//!
//! Timesteps are a `[B]` tensor, integer (I64 / U32 / U8) or float. An integer-valued t reads the table;
//! a fractional t (Euler-type schedules) uses sigma linearly interpolated between the neighbouring
//! integer timesteps (as diffusers' `np.interp` of the sigma table), `abar = 1 / (1 + sigma^2)`.
//! Per-sample coefficients are computed on the host in f64 from the float32 tables and uploaded as a
//! `[B, 1, ..., 1]` tensor in the dtype and on the device of the sample, so every result has the dtype of `x0`
//! and stays differentiable w.r.t. the tensor inputs.

use super::config::{BetaSchedule, PredictionType, SchedulerConfig};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// Betas and cumulative alphas of the training process, plus the config bits every consumer needs.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    betas: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    prediction_type: PredictionType,
    clip_sample: Option<f64>,
    final_alpha_cumprod: f64,
}

impl NoiseSchedule {
    /// The schedule of `config` (as DDPM / DDIM compute it; see [`NoiseSchedule::with_terminal_clamp`] for the
    /// sigma-based schedulers).
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let t = config.num_train_timesteps;
        let betas32: Vec<f32> = match &config.trained_betas {
            Some(b) => {
                if b.len() != t {
                    return Err(Error::Invalid {
                        file: config.source.clone(),
                        msg: format!(
                            "`trained_betas` has {} entries, `num_train_timesteps` is {t}",
                            b.len()
                        ),
                    });
                }
                b.iter().map(|x| *x as f32).collect()
            }
            None => match config.beta_schedule {
                BetaSchedule::Linear => {
                    torch_linspace_f32(config.beta_start as f32, config.beta_end as f32, t)
                }
                BetaSchedule::ScaledLinear => torch_linspace_f32(
                    config.beta_start.sqrt() as f32,
                    config.beta_end.sqrt() as f32,
                    t,
                )
                .into_iter()
                .map(|x| x * x)
                .collect(),
                BetaSchedule::SquaredCosCapV2 => {
                    let abar = |x: f64| {
                        ((x + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                            .cos()
                            .powi(2)
                    };
                    (0..t)
                        .map(|i| {
                            let t1 = i as f64 / t as f64;
                            let t2 = (i + 1) as f64 / t as f64;
                            (1.0 - abar(t2) / abar(t1)).min(0.999) as f32
                        })
                        .collect()
                }
            },
        };
        let betas32 = if config.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&betas32)
        } else {
            betas32
        };
        let alphas_cumprod = cumprod_f32(&betas32);
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(NoiseSchedule {
            betas: betas32.iter().map(|b| *b as f64).collect(),
            alphas_cumprod,
            prediction_type: config.prediction_type,
            clip_sample: config.clip_sample.then_some(config.clip_sample_range),
            final_alpha_cumprod,
        })
    }

    /// The Euler / DPM-Solver variant: with `rescale_betas_zero_snr`, `abar_{T-1}` (0 after the rescale) is set to
    /// 2^-24 so that `sigma_max` stays finite, as those diffusers schedulers do.
    pub fn with_terminal_clamp(mut self, config: &SchedulerConfig) -> Self {
        if config.rescale_betas_zero_snr {
            if let Some(last) = self.alphas_cumprod.last_mut() {
                *last = 2f64.powi(-24);
            }
        }
        self
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }
    /// `beta_t` (float32 values).
    pub fn betas(&self) -> &[f64] {
        &self.betas
    }
    /// `abar_t` (float32 values).
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }
    pub fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }
    /// `Some(range)` when the predicted x0 is clamped to `[-range, range]` (`clip_sample`).
    pub fn clip_sample(&self) -> Option<f64> {
        self.clip_sample
    }
    /// DDIM's `abar` before t = 0: 1 with `set_alpha_to_one`, else `abar_0`.
    pub fn final_alpha_cumprod(&self) -> f64 {
        self.final_alpha_cumprod
    }

    /// `betas` as an F32 `[T]` tensor.
    pub fn betas_tensor(&self, device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = self.betas.iter().map(|x| *x as f32).collect();
        Ok(Tensor::from_vec(v, self.betas.len(), device)?)
    }
    /// `alphas_cumprod` as an F32 `[T]` tensor.
    pub fn alphas_cumprod_tensor(&self, device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = self.alphas_cumprod.iter().map(|x| *x as f32).collect();
        Ok(Tensor::from_vec(v, self.alphas_cumprod.len(), device)?)
    }

    /// The float32 sigma table `sqrt((1 - abar_t) / abar_t)` as diffusers computes it (float32 arithmetic).
    pub fn sigma_table(&self) -> Vec<f64> {
        self.alphas_cumprod
            .iter()
            .map(|a| {
                let a = *a as f32;
                (((1.0f32 - a) / a).sqrt()) as f64
            })
            .collect()
    }

    /// `abar(t)` for one (possibly fractional) timestep; `t < 0` gives 1 (no noise), `t > T-1` errors.
    pub fn alpha_bar_at(&self, t: f64) -> Result<f64> {
        let last = (self.alphas_cumprod.len() - 1) as f64;
        if !t.is_finite() || t > last + 1e-6 {
            return Err(Error::msg(format!(
                "timestep {t} outside the training range [0, {last}]"
            )));
        }
        if t < 0.0 {
            return Ok(1.0);
        }
        if t.fract() == 0.0 || (t - t.round()).abs() < 1e-9 {
            return Ok(self.alphas_cumprod[t.round() as usize]);
        }
        let s = self.sigma_at(t)?;
        Ok(1.0 / (1.0 + s * s))
    }

    /// `sigma(t) = sqrt((1 - abar_t) / abar_t)`, linearly interpolated in sigma for fractional t (diffusers'
    /// `np.interp(t, arange(T), sigmas)`).
    pub fn sigma_at(&self, t: f64) -> Result<f64> {
        let last = self.alphas_cumprod.len() - 1;
        if !t.is_finite() || t < -1e-6 || t > last as f64 + 1e-6 {
            return Err(Error::msg(format!(
                "timestep {t} outside the training range [0, {last}]"
            )));
        }
        let sig = |i: usize| {
            let a = self.alphas_cumprod[i];
            ((1.0 - a) / a).sqrt()
        };
        let t = t.clamp(0.0, last as f64);
        let j = (t.floor() as usize).min(last - 1);
        let w = t - j as f64;
        if w == 0.0 {
            return Ok(sig(j));
        }
        if w == 1.0 {
            return Ok(sig(j + 1));
        }
        Ok(sig(j) + (sig(j + 1) - sig(j)) * w)
    }

    /// Per-sample `f(t_b)` as a `[B, 1, ..., 1]` tensor with the rank, dtype and device of `like`.
    pub fn per_sample(
        &self,
        timesteps: &Tensor,
        like: &Tensor,
        f: impl Fn(f64) -> Result<f64>,
    ) -> Result<Tensor> {
        let ts = timesteps_to_host(timesteps)?;
        let b = like.dim(0)?;
        if ts.len() != b {
            return Err(Error::msg(format!(
                "{} timesteps for a batch of {b} (one timestep per sample expected)",
                ts.len()
            )));
        }
        let vals = ts.into_iter().map(f).collect::<Result<Vec<f64>>>()?;
        let mut shape = vec![1usize; like.rank().max(1)];
        shape[0] = b;
        Ok(Tensor::from_vec(vals, shape, like.device())?.to_dtype(like.dtype())?)
    }

    /// Per-sample `f(t_b)` as a `[B]` F32 tensor on the device of `timesteps`.
    fn per_sample_vec(&self, timesteps: &Tensor, f: impl Fn(f64) -> Result<f64>) -> Result<Tensor> {
        let ts = timesteps_to_host(timesteps)?;
        let n = ts.len();
        let vals = ts
            .into_iter()
            .map(|t| f(t).map(|v| v as f32))
            .collect::<Result<Vec<f32>>>()?;
        Ok(Tensor::from_vec(vals, n, timesteps.device())?)
    }

    /// `abar_{t_b}` per sample, `[B, 1, ..., 1]`, dtype / device of `like`.
    pub fn alpha_bar(&self, timesteps: &Tensor, like: &Tensor) -> Result<Tensor> {
        self.per_sample(timesteps, like, |t| self.alpha_bar_at(t))
    }
    /// `sqrt(abar_{t_b})` per sample, `[B, 1, ..., 1]`, dtype / device of `like`.
    pub fn sqrt_alpha_bar(&self, timesteps: &Tensor, like: &Tensor) -> Result<Tensor> {
        self.per_sample(timesteps, like, |t| Ok(self.alpha_bar_at(t)?.sqrt()))
    }
    /// `sqrt(1 - abar_{t_b})` per sample, `[B, 1, ..., 1]`, dtype / device of `like`.
    pub fn sqrt_one_minus_alpha_bar(&self, timesteps: &Tensor, like: &Tensor) -> Result<Tensor> {
        self.per_sample(
            timesteps,
            like,
            |t| Ok((1.0 - self.alpha_bar_at(t)?).sqrt()),
        )
    }

    /// `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`, per sample (DDPMScheduler.add_noise).
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let a = self.sqrt_alpha_bar(timesteps, x0)?;
        let s = self.sqrt_one_minus_alpha_bar(timesteps, x0)?;
        let noise = noise.to_dtype(x0.dtype())?;
        Ok((x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?)
    }

    /// `v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0`, per sample (DDPMScheduler.get_velocity).
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let a = self.sqrt_alpha_bar(timesteps, x0)?;
        let s = self.sqrt_one_minus_alpha_bar(timesteps, x0)?;
        let noise = noise.to_dtype(x0.dtype())?;
        Ok((noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?)?)
    }

    /// The training target for `prediction_type`: `noise` (epsilon), [`velocity`](Self::velocity)
    /// (v_prediction) or `x0` (sample), in the dtype of `x0`.
    pub fn target(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        match self.prediction_type {
            PredictionType::Epsilon => Ok(noise.to_dtype(x0.dtype())?),
            PredictionType::VPrediction => self.velocity(x0, noise, timesteps),
            PredictionType::Sample => Ok(x0.clone()),
        }
    }

    /// `x0 + sigma(t) noise` per sample (EulerDiscreteScheduler.add_noise for t on the Euler schedule; the
    /// Euler sample is the variance-exploding `x_t / sqrt(abar_t)`).
    pub fn add_noise_sigma(
        &self,
        x0: &Tensor,
        noise: &Tensor,
        timesteps: &Tensor,
    ) -> Result<Tensor> {
        let s = self.per_sample(timesteps, x0, |t| self.sigma_at(t))?;
        Ok((x0 + noise.to_dtype(x0.dtype())?.broadcast_mul(&s)?)?)
    }

    /// `snr(t_b) = abar / (1 - abar)` as a `[B]` F32 tensor on the device of `timesteps` (min-SNR weighting).
    pub fn snr(&self, timesteps: &Tensor) -> Result<Tensor> {
        self.per_sample_vec(timesteps, |t| {
            let a = self.alpha_bar_at(t)?;
            Ok(a / (1.0 - a))
        })
    }

    /// `sigma(t_b) = sqrt((1 - abar) / abar)` as a `[B]` F32 tensor on the device of `timesteps`.
    pub fn sigma(&self, timesteps: &Tensor) -> Result<Tensor> {
        self.per_sample_vec(timesteps, |t| self.sigma_at(t))
    }

    /// The predicted clean sample from a model output at per-sample timesteps:
    /// epsilon `x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)`, v `x0 = sqrt(abar) x_t - sqrt(1-abar) v`,
    /// sample `x0 = output`. No clipping. Dtype of `sample`.
    pub fn pred_original_sample(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        timesteps: &Tensor,
    ) -> Result<Tensor> {
        let (x0, _) = self.pred_x0_eps(model_output, sample, timesteps)?;
        Ok(x0)
    }

    /// `(x0, eps)` predicted from a model output at per-sample timesteps (no clipping). Dtype of `sample`.
    pub fn pred_x0_eps(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        timesteps: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let a = self.sqrt_alpha_bar(timesteps, sample)?;
        let s = self.sqrt_one_minus_alpha_bar(timesteps, sample)?;
        let m = model_output.to_dtype(sample.dtype())?;
        Ok(match self.prediction_type {
            PredictionType::Epsilon => ((sample - m.broadcast_mul(&s)?)?.broadcast_div(&a)?, m),
            PredictionType::Sample => {
                let eps = (sample - m.broadcast_mul(&a)?)?.broadcast_div(&s)?;
                (m, eps)
            }
            PredictionType::VPrediction => {
                let x0 = (sample.broadcast_mul(&a)? - m.broadcast_mul(&s)?)?;
                let eps = (m.broadcast_mul(&a)? + sample.broadcast_mul(&s)?)?;
                (x0, eps)
            }
        })
    }
}

/// Reads a `[B]` (or scalar) timestep tensor of any dtype to the host as f64.
pub fn timesteps_to_host(timesteps: &Tensor) -> Result<Vec<f64>> {
    let t = timesteps.flatten_all()?.to_device(&Device::Cpu)?;
    let v = match t.dtype() {
        DType::F64 => t.to_vec1::<f64>()?,
        DType::I64 => t.to_vec1::<i64>()?.into_iter().map(|x| x as f64).collect(),
        DType::U32 => t.to_vec1::<u32>()?.into_iter().map(|x| x as f64).collect(),
        DType::U8 => t.to_vec1::<u8>()?.into_iter().map(|x| x as f64).collect(),
        _ => t
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|x| x as f64)
            .collect(),
    };
    Ok(v)
}

/// torch.linspace(start, end, n, dtype=float32) on the CPU: float32 step, the first half counted from `start`,
/// the second half from `end`.
pub(crate) fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - i - 1) as f32
            }
        })
        .collect()
}

/// `cumprod(1 - betas)` as torch computes it for float32 on the CPU: `1 - beta` in float32, the product
/// accumulated in double, each output rounded to float32.
fn cumprod_f32(betas: &[f32]) -> Vec<f64> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|b| {
            acc *= (1.0f32 - *b) as f64;
            acc as f32 as f64
        })
        .collect()
}

/// Zero terminal SNR (Lin et al. 2023, Algorithm 1): shift `sqrt(abar)` so the last is 0, scale so the first
/// is unchanged, and convert back to betas (in f64, rounded to float32).
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    let mut sq: Vec<f64> = betas
        .iter()
        .map(|b| {
            acc *= 1.0 - *b as f64;
            acc.sqrt()
        })
        .collect();
    let (s0, st) = (sq[0], sq[sq.len() - 1]);
    for x in sq.iter_mut() {
        *x = (*x - st) * s0 / (s0 - st);
    }
    let abar: Vec<f64> = sq.iter().map(|x| x * x).collect();
    let mut out = Vec::with_capacity(betas.len());
    out.push((1.0 - abar[0]) as f32);
    for i in 1..abar.len() {
        out.push((1.0 - abar[i] / abar[i - 1]) as f32);
    }
    out
}

/// numpy.linspace(start, stop, num) (float64): `start + i * step`, the last element exactly `stop`.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return vec![];
    }
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// numpy.arange(start, stop, step) for floats: `ceil((stop - start) / step)` elements, `start + i * delta` with
/// `delta = (start + step) - start` (numpy's fill rule).
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return vec![];
    }
    let len = len as usize;
    let next = start + step;
    let delta = next - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => next,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// numpy.interp(x, arange(len(fp)), fp) for x inside [0, len-1].
pub(crate) fn np_interp_index(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    let slope = fp[j + 1] - fp[j];
    slope * (x - j as f64) + fp[j]
}

/// Karras et al. (2022) sigmas: `(s_max^(1/rho) + ramp (s_min^(1/rho) - s_max^(1/rho)))^rho`, rho = 7,
/// ramp = linspace(0, 1, n).
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (lo, hi) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (hi + r * (lo - hi)).powf(rho))
        .collect()
}

/// Log-uniform sigmas from `sigma_max` down to `sigma_min`.
pub(crate) fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// diffusers' `_sigma_to_t`: the (fractional) timestep whose log-sigma matches, by linear interpolation of
/// the log-sigma table.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // Index of the last table entry <= log_sigma (0 when there is none), at most n - 2.
    let mut low = 0usize;
    let mut best = 0usize;
    let mut count = 0usize;
    for (i, ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls >= 0.0 {
            count += 1;
            if count > best {
                best = count;
                low = i;
            }
        }
    }
    let low = low.min(n - 2);
    let high = low + 1;
    let (l, h) = (log_sigmas[low], log_sigmas[high]);
    let w = ((l - log_sigma) / (l - h)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_helpers() {
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        let l = np_linspace(0.0, 999.0, 25);
        assert_eq!(l[4], 166.5);
        assert_eq!(l[4].round_ties_even(), 166.0);
        assert_eq!(
            np_arange(1000.0, 0.0, -250.0),
            vec![1000.0, 750.0, 500.0, 250.0]
        );
        assert_eq!(np_arange(1000.0, 0.0, -1000.0), vec![1000.0]);
        assert_eq!(np_interp_index(2.5, &[0.0, 1.0, 2.0, 4.0]), 3.0);
    }
}
