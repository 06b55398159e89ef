//! DPM-Solver++ multistep (Lu et al. 2022), `DPMSolverMultistepScheduler`; with the default config
//! (`algorithm_type = dpmsolver++`, `solver_order = 2`, `solver_type = midpoint`) this is "DPM++ 2M".
//!
//! Integer timesteps (`linspace`: `round(linspace(0, T_last - 1, n + 1))` reversed without the final 0;
//! `leading`: `arange(n + 1) * (T_last // (n + 1))` reversed without 0, `+ steps_offset`; `trailing`:
//! `round(arange(T_last, 0, -T/n)) - 1`; `T_last = T` unless `lambda_min_clipped` cuts the noisy end),
//! `sigma_i = sigma_table[t_i]` (or Karras / exponential sigmas with rounded recovered timesteps), then
//! the final sigma (0 for `final_sigmas_type = zero`, else `sigma_0`). `init_noise_sigma = 1`, no input scaling.
//!
//! With `alpha(s) = 1 / sqrt(s^2 + 1)`, `sigma(s) = s alpha(s)`, `lambda = ln alpha - ln sigma` (half log-SNR),
//! `h = lambda_{i+1} - lambda_i`, and `D0 = x0_i` (the model output converted to a data prediction:
//! epsilon `x0 = (x - sigma eps) / alpha`, v `x0 = alpha x - sigma v`, sample `x0 = output`):
//!
//! ```text
//! 1st order:            x_{i+1} = sigma_{i+1}/sigma_i x - alpha_{i+1} (e^{-h} - 1) D0
//! 2nd order (midpoint): x_{i+1} = sigma_{i+1}/sigma_i x - alpha_{i+1} (e^{-h} - 1) (D0 + D1 / 2),
//!                       D1 = (x0_i - x0_{i-1}) h / h_{i-1}
//! 2nd order (heun):     ... - alpha (e^{-h} - 1) D0 + alpha ((e^{-h} - 1) / h + 1) D1
//! 3rd order:            DPM-Solver++(3M), diffusers' formula
//! ```
//!
//! The first step has no history (1st order). The last step is 1st order when `final_sigmas_type = zero`,
//! `euler_at_final`, or `lower_order_final` with fewer than 15 steps (with sigma = 0 it returns D0 exactly);
//! the second-to-last is at most 2nd order under `lower_order_final` with < 15 steps.
//!
//! `sde-dpmsolver++` (SDE variant) adds noise each step:
//! `x_{i+1} = sigma_{i+1}/sigma_i e^{-h} x + alpha_{i+1} (1 - e^{-2h}) (D0 [+ D1/2]) + sigma_{i+1} sqrt(1 - e^{-2h}) z`.

use super::schedule::{
    exponential_sigmas, karras_sigmas, np_arange, np_linspace, sigma_to_t, NoiseSchedule,
};
use super::{
    check_index, check_steps, compute_dtype, noise_or_randn, AlgorithmType, BetaSchedule,
    FinalSigmasType, PredictionType, Scheduler, SchedulerConfig, SchedulerKind, SolverType,
    StepOutput, TimestepSpacing,
};
use crate::error::{Error, Result};
use candle_core::Tensor;

/// `DPMSolverMultistepScheduler` (dpmsolver++ / sde-dpmsolver++, order 1..3).
#[derive(Clone, Debug)]
pub struct DpmSolverMultistepScheduler {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    /// Data predictions of the previous steps, oldest first (at most `solver_order`).
    history: Vec<Tensor>,
    lower_order_nums: usize,
    next_index: usize,
}

fn alpha_sigma(s: f64) -> (f64, f64) {
    let a = 1.0 / (s * s + 1.0).sqrt();
    (a, s * a)
}

fn lambda(s: f64) -> f64 {
    let (a, sg) = alpha_sigma(s);
    a.ln() - sg.ln()
}

impl DpmSolverMultistepScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        config.check_supported(SchedulerKind::DpmPp2m)?;
        Ok(DpmSolverMultistepScheduler {
            config: config.clone(),
            schedule: NoiseSchedule::new(config)?.with_terminal_clamp(config),
            timesteps: vec![],
            sigmas: vec![],
            history: vec![],
            lower_order_nums: 0,
            next_index: 0,
        })
    }

    fn is_sde(&self) -> bool {
        self.config.algorithm_type == AlgorithmType::SdeDpmSolverPlusPlus
    }

    /// The order the step at `step_index` uses (given the history accumulated so far).
    fn order_for(&self, step_index: usize) -> usize {
        let c = &self.config;
        let n = self.timesteps.len();
        let lower_order_final = step_index == n - 1
            && (c.euler_at_final
                || (c.lower_order_final && n < 15)
                || c.final_sigmas_type == FinalSigmasType::Zero);
        let lower_order_second = step_index + 2 == n && c.lower_order_final && n < 15;
        if c.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            1
        } else if c.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            2
        } else {
            3
        }
    }

    fn convert_model_output(&self, m: &Tensor, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let (a, s) = alpha_sigma(sigma);
        Ok(match self.config.prediction_type {
            PredictionType::Epsilon => ((x - (m * s)?)? / a)?,
            PredictionType::Sample => m.clone(),
            PredictionType::VPrediction => ((x * a)? - (m * s)?)?,
        })
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::DpmPp2m
    }
    fn config(&self) -> &SchedulerConfig {
        &self.config
    }
    fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let c = &self.config;
        let t_train = c.num_train_timesteps;
        check_steps(t_train, n)?;
        let ac = self.schedule.alphas_cumprod();
        // searchsorted(flip(lambda_t), lambda_min_clipped): how many lambdas (over the flipped, increasing
        // table) are below the clip.
        let clipped = ac
            .iter()
            .filter(|a| {
                let a = **a as f32;
                let l = (a.sqrt().ln() - (1.0 - a).sqrt().ln()) as f64;
                l < c.lambda_min_clipped
            })
            .count();
        let last_t = t_train - clipped;
        if last_t == 0 {
            return Err(Error::msg(
                "DPM-Solver: lambda_min_clipped removes every timestep",
            ));
        }
        let mut timesteps: Vec<f64> = match c.spacing_for(SchedulerKind::DpmPp2m) {
            TimestepSpacing::Linspace => {
                let mut v: Vec<f64> = np_linspace(0.0, last_t as f64 - 1.0, n + 1)
                    .into_iter()
                    .map(|x| x.round_ties_even())
                    .collect();
                v.reverse();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = last_t / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + c.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                np_arange(last_t as f64, 0.0, -(t_train as f64 / n as f64))
                    .into_iter()
                    .map(|x| x.round_ties_even() - 1.0)
                    .collect()
            }
        };
        let table = self.schedule.sigma_table();
        let mut sigmas: Vec<f64> = if c.use_karras_sigmas || c.use_exponential_sigmas {
            let log_sigmas: Vec<f64> = table.iter().map(|s| (*s as f32).ln() as f64).collect();
            let (smin, smax) = (table[0], table[table.len() - 1]);
            let s = if c.use_karras_sigmas {
                karras_sigmas(smin, smax, n)
            } else {
                exponential_sigmas(smin, smax, n)
            };
            let round = c.use_karras_sigmas && c.beta_schedule != BetaSchedule::SquaredCosCapV2;
            timesteps = s
                .iter()
                .map(|x| {
                    let t = sigma_to_t(*x, &log_sigmas);
                    if round {
                        t.round_ties_even()
                    } else {
                        t.trunc()
                    }
                })
                .collect();
            s
        } else {
            timesteps
                .iter()
                .map(|t| {
                    let i = *t as usize;
                    table
                        .get(i)
                        .copied()
                        .ok_or_else(|| Error::msg(format!("DPM-Solver: timestep {t} out of range")))
                })
                .collect::<Result<Vec<f64>>>()?
        };
        sigmas.push(match c.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => table[0],
        });
        self.sigmas = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        self.timesteps = timesteps;
        self.reset();
        Ok(())
    }
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }
    fn needs_noise(&self, _step_index: usize) -> bool {
        self.is_sde()
    }
    fn reset(&mut self) {
        self.history.clear();
        self.lower_order_nums = 0;
        self.next_index = 0;
    }
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        check_index(SchedulerKind::DpmPp2m, step_index, self.timesteps.len())?;
        if step_index == 0 {
            self.reset();
        } else if step_index != self.next_index {
            return Err(Error::msg(format!(
                "DPMSolverMultistepScheduler is multistep: steps must be taken in order (expected index {}, got {step_index})",
                self.next_index
            )));
        }
        let dt = compute_dtype(sample.dtype());
        let x = sample.to_dtype(dt)?;
        let m = model_output.to_dtype(dt)?;
        let order = self.order_for(step_index);
        let s0 = self.sigmas[step_index];
        let x0 = self.convert_model_output(&m, &x, s0)?;
        self.history.push(x0.clone());
        if self.history.len() > self.config.solver_order {
            self.history.remove(0);
        }
        let st = self.sigmas[step_index + 1];
        let (alpha_t, sigma_t) = alpha_sigma(st);
        let (_, sigma_s0) = alpha_sigma(s0);
        let lambda_t = lambda(st);
        let lambda_s0 = lambda(s0);
        let h = lambda_t - lambda_s0;
        let em1 = (-h).exp() - 1.0; // e^{-h} - 1
        let sde = self.is_sde();
        let k = self.history.len();
        // Returns (deterministic part, noise std).
        let (mean, std) = match order {
            1 => {
                if sde {
                    let e2 = 1.0 - (-2.0 * h).exp();
                    let mean =
                        ((&x * (sigma_t / sigma_s0 * (-h).exp()))? + (&x0 * (alpha_t * e2))?)?;
                    (mean, sigma_t * e2.sqrt())
                } else {
                    (
                        ((&x * (sigma_t / sigma_s0))? - (&x0 * (alpha_t * em1))?)?,
                        0.0,
                    )
                }
            }
            2 => {
                let m0 = &self.history[k - 1];
                let m1 = &self.history[k - 2];
                let s1 = self.sigmas[step_index - 1];
                let h0 = lambda_s0 - lambda(s1);
                let r0 = h0 / h;
                let d1 = ((m0 - m1)? * (1.0 / r0))?;
                if sde {
                    let e2 = 1.0 - (-2.0 * h).exp();
                    let c1 = match self.config.solver_type {
                        SolverType::Midpoint => 0.5 * alpha_t * e2,
                        SolverType::Heun => alpha_t * (e2 / (-2.0 * h) + 1.0),
                    };
                    let mean = (((&x * (sigma_t / sigma_s0 * (-h).exp()))?
                        + (m0 * (alpha_t * e2))?)?
                        + (d1 * c1)?)?;
                    (mean, sigma_t * e2.sqrt())
                } else {
                    let base = ((&x * (sigma_t / sigma_s0))? - (m0 * (alpha_t * em1))?)?;
                    let mean = match self.config.solver_type {
                        SolverType::Midpoint => (base - (d1 * (0.5 * alpha_t * em1))?)?,
                        SolverType::Heun => (base + (d1 * (alpha_t * (em1 / h + 1.0)))?)?,
                    };
                    (mean, 0.0)
                }
            }
            _ => {
                let m0 = &self.history[k - 1];
                let m1 = &self.history[k - 2];
                let m2 = &self.history[k - 3];
                let l1 = lambda(self.sigmas[step_index - 1]);
                let l2 = lambda(self.sigmas[step_index - 2]);
                let (h0, h1) = (lambda_s0 - l1, l1 - l2);
                let (r0, r1) = (h0 / h, h1 / h);
                let d1_0 = ((m0 - m1)? * (1.0 / r0))?;
                let d1_1 = ((m1 - m2)? * (1.0 / r1))?;
                let diff = (&d1_0 - &d1_1)?;
                let d1 = (&d1_0 + (&diff * (r0 / (r0 + r1)))?)?;
                let d2 = (&diff * (1.0 / (r0 + r1)))?;
                if sde {
                    let e2 = 1.0 - (-2.0 * h).exp();
                    let mean = ((((&x * (sigma_t / sigma_s0 * (-h).exp()))?
                        + (m0 * (alpha_t * e2))?)?
                        + (d1 * (alpha_t * (e2 / (-2.0 * h) + 1.0)))?)?
                        + (d2 * (alpha_t * ((e2 - 2.0 * h) / (2.0 * h).powi(2) - 0.5)))?)?;
                    (mean, sigma_t * e2.sqrt())
                } else {
                    let mean = ((((&x * (sigma_t / sigma_s0))? - (m0 * (alpha_t * em1))?)?
                        + (d1 * (alpha_t * (em1 / h + 1.0)))?)?
                        - (d2 * (alpha_t * ((em1 + h) / (h * h) - 0.5)))?)?;
                    (mean, 0.0)
                }
            }
        };
        let prev = if sde {
            let z = noise_or_randn(noise, &x, dt)?;
            (&mean + (z * std)?)?
        } else {
            mean.clone()
        };
        if self.lower_order_nums < self.config.solver_order {
            self.lower_order_nums += 1;
        }
        self.next_index = step_index + 1;
        let out_dt = sample.dtype();
        Ok(StepOutput {
            prev_sample: prev.to_dtype(out_dt)?,
            pred_original_sample: x0.to_dtype(out_dt)?,
            mean: if sde {
                Some(mean.to_dtype(out_dt)?)
            } else {
                None
            },
            std: if sde { Some(std) } else { None },
        })
    }
    fn clone_box(&self) -> Box<dyn Scheduler> {
        Box::new(self.clone())
    }
}
