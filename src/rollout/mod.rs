//! Trajectories of the stochastic sampler, with what the online methods need at every step, and the
//! log-probability of a stored transition recomputed with the autograd graph.
//!
//! # The transition
//!
//! Every step `k` (timestep `t`, previous timestep `t' = t − T/S`) is the Gaussian of DDIM with η > 0
//! ([`ddim_step_with_logprob`], the DDPO / trl convention; η = 1 is the memoryless, DDPM-like sampler):
//!
//! ```text
//! ε̂   = ε_u + w (ε_c − ε_u)                                 classifier-free guidance (w = 1: ε_c alone)
//! x̂₀  = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t                          (v- and sample-prediction converted alike)
//! σ_t = η √((1−ᾱ_t')/(1−ᾱ_t) · (1 − ᾱ_t/ᾱ_t'))
//! μ_t = √ᾱ_t' x̂₀ + √(1 − ᾱ_t' − σ_t²) ε̂
//! x_t' = μ_t + σ_t z,   z ~ N(0, I)
//! log π(x_t' | x_t) = mean over C, H, W of log N(x_t'; μ_t, σ_t² I)      (the mean, not the sum)
//! ```
//!
//! At the last step `ᾱ_t'` is `ᾱ_0` (trl's clamp), so the last transition is stochastic too. `sampler = "ddpm"`
//! is η = 1 except at the last step, which is deterministic (`ᾱ_t' = 1`, x₀ = x̂₀, as diffusers'
//! `DDPMScheduler`); that step has no log-probability and is never trained.
//! `stochastic_range = [lo, hi]` keeps the Gaussian only at the steps whose timestep lies in `[lo, hi)`; the
//! others are the deterministic DDIM step (η = 0, `x_t' = μ_t`, no log-probability), as in MixGRPO's SDE window:
//! the sampled images stay close to what the deterministic sampler makes, and a trajectory's randomness — hence
//! the reward differences a group sees — comes from the steps that can be trained.
//!
//! # On-policy exactness
//!
//! Sampling and recomputation run the same function ([`transition`]) on the same dtype (latents, means and
//! log-probabilities in f32; the UNet in the model dtype) with the conditioning the sampler used (kept with the
//! trajectory), so recomputing a step of a sampled batch — all its rows, in order — gives the log-probabilities
//! recorded while sampling bit for bit: the ratio of a PPO-style loss is exactly 1 on-policy. Other batch
//! layouts (a subset of rows, rows of several steps at once) agree to float rounding only (~1e-7 relative):
//! the CPU matmul kernels round differently for different batch sizes.
//!
//! # Determinism
//!
//! The initial noise and every step's noise are drawn on the CPU from a serialisable [`Rng`] stream and moved
//! to the device, so a seed gives the same trajectory on any device (up to the device's arithmetic).

pub mod branch;

use crate::train::rng::Rng;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, IndexOp, Tensor};
use diffpref_pipelines::loading::{PromptEmbeds, StableDiffusion};
use diffpref_pipelines::models::unet::{AddedCond, UNet2DConditionModel};
use diffpref_pipelines::schedulers::{
    ddim_step_with_logprob, DdimScheduler, DdimTransition, NoiseSchedule, Scheduler,
    SchedulerConfig,
};
use serde::{Deserialize, Serialize};

/// The stochastic sampler of a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    /// DDIM with `eta` > 0 (η = 1: the memoryless sampler).
    #[default]
    Ddim,
    /// DDPM: η = 1 with a deterministic last step.
    Ddpm,
}

/// `[rollout]`: how trajectories are sampled.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutConfig {
    /// Denoising steps S. Default 10.
    pub steps: usize,
    /// Classifier-free guidance scale w (≤ 1: no guidance). Default 7.5.
    pub guidance: f64,
    /// ddim | ddpm. Default ddim.
    pub sampler: Sampler,
    /// DDIM η (> 0; `ddpm` uses 1). Default 1.
    pub eta: f64,
    /// Image side in pixels (a multiple of the model's downscale factor). Default: the UNet's sample size.
    pub resolution: Option<usize>,
    /// Only steps whose timestep lies in `[lo, hi)` are stochastic; the others are the deterministic DDIM step
    /// (η = 0), the sampler users run (MixGRPO's SDE window, Li et al. 2025). Default: every step.
    pub stochastic_range: Option<[u64; 2]>,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            steps: 10,
            guidance: 7.5,
            sampler: Sampler::Ddim,
            eta: 1.0,
            resolution: None,
            stochastic_range: None,
        }
    }
}

impl RolloutConfig {
    pub fn validate(&self, section: &str) -> Result<()> {
        ensure!(self.steps >= 1, "{section} steps must be at least 1");
        ensure!(
            self.guidance.is_finite(),
            "{section} guidance must be finite (got {})",
            self.guidance
        );
        ensure!(
            self.eta.is_finite() && self.eta > 0.0,
            "{section} eta must be > 0: the rollouts need a stochastic step (got {})",
            self.eta
        );
        ensure!(
            self.sampler == Sampler::Ddim || self.eta == 1.0,
            "{section} sampler = \"ddpm\" is eta = 1 (got eta = {})",
            self.eta
        );
        if let Some(r) = self.resolution {
            diffpref_pipelines::limits::check_image_size(
                &format!("{section} resolution"),
                r as u64,
                r as u64,
            )?;
        }
        if let Some([lo, hi]) = self.stochastic_range {
            ensure!(
                lo < hi,
                "{section} stochastic_range = [{lo}, {hi}] must have lo < hi"
            );
        }
        Ok(())
    }
}

/// What a step needs besides the model: the schedule, the step layout and the sampler.
#[derive(Clone, Debug)]
pub struct StepRule {
    pub schedule: NoiseSchedule,
    /// The timesteps of the S steps (integers, descending).
    pub timesteps: Vec<f64>,
    /// `T // S`.
    pub step_ratio: usize,
    pub sampler: Sampler,
    pub eta: f64,
    pub guidance: f64,
    /// `[rollout] stochastic_range`.
    pub stochastic_range: Option<[u64; 2]>,
}

impl StepRule {
    /// The rule of `cfg` for `model`'s scheduler config (timestep spacing, prediction type, clipping).
    pub fn new(model: &StableDiffusion, cfg: &RolloutConfig) -> Result<StepRule> {
        cfg.validate("[rollout]")?;
        let sc = SchedulerConfig::from_file(&model.scheduler_config_path)?;
        let mut ddim = DdimScheduler::new(&sc)?;
        ddim.set_timesteps(cfg.steps)?;
        Ok(StepRule {
            schedule: NoiseSchedule::new(&sc)?,
            timesteps: ddim.timesteps().to_vec(),
            step_ratio: ddim.step_ratio(),
            sampler: cfg.sampler,
            eta: if cfg.sampler == Sampler::Ddpm {
                1.0
            } else {
                cfg.eta
            },
            guidance: cfg.guidance,
            stochastic_range: cfg.stochastic_range,
        })
    }

    /// Whether step `k` is stochastic (has a log-probability).
    pub fn is_stochastic(&self, k: usize) -> bool {
        self.in_window(k) && !self.is_ddpm_last(k)
    }

    /// Whether step `k`'s timestep lies in the stochastic range (outside it the step is DDIM with η = 0).
    pub fn in_window(&self, k: usize) -> bool {
        let t = self.timesteps[k];
        self.stochastic_range
            .is_none_or(|[lo, hi]| t >= lo as f64 && t < hi as f64)
    }

    /// Whether step `k` is DDPM's deterministic last step (x₀ = x̂₀).
    fn is_ddpm_last(&self, k: usize) -> bool {
        self.sampler == Sampler::Ddpm && k + 1 == self.timesteps.len()
    }

    /// The steps that have a log-probability.
    pub fn stochastic_steps(&self) -> Vec<usize> {
        (0..self.timesteps.len())
            .filter(|&k| self.is_stochastic(k))
            .collect()
    }
}

/// One transition of a batch: `x_{t'}`, the Gaussian's mean and std, and `log π(x_{t'} | x_t)` (f32).
#[derive(Clone, Debug)]
pub struct Transition {
    /// `[N, C, h, w]` f32.
    pub prev_sample: Tensor,
    pub mean: Tensor,
    /// `[N]` (0 for a deterministic step).
    pub std: Tensor,
    /// `[N]` (0 for a deterministic step).
    pub log_prob: Tensor,
    /// The predicted x̂₀, `[N, C, h, w]`.
    pub pred_x0: Tensor,
}

/// The conditioning of a batch of rows: prompt embeddings (and the unconditional ones under guidance) and the
/// SDXL micro-conditioning, one row per sample.
#[derive(Clone, Debug)]
pub struct Conditioning {
    pub cond: PromptEmbeds,
    pub uncond: Option<PromptEmbeds>,
    /// `[uncond; cond]` under guidance (2N rows), else `cond`.
    embeds: PromptEmbeds,
    added: Option<AddedCond>,
    /// Pixel side (SDXL's micro-conditioning).
    side: usize,
}

impl Conditioning {
    /// The conditioning of `prompts` (the empty prompt's embedding — zeros where the model forces them — as
    /// the unconditional branch when `guidance` > 1), at `side`×`side` pixels.
    pub fn new(
        model: &StableDiffusion,
        prompts: &[&str],
        guidance: f64,
        side: usize,
    ) -> Result<Self> {
        let cond = model.encode_prompts(prompts)?;
        let uncond = if guidance > 1.0 {
            let e = model.encode_prompts(&vec![""; prompts.len()])?;
            Some(if model.force_zeros_for_empty_prompt {
                e.zeros_like()?
            } else {
                e
            })
        } else {
            None
        };
        Self::from_embeds(model, cond, uncond, side)
    }

    fn from_embeds(
        model: &StableDiffusion,
        cond: PromptEmbeds,
        uncond: Option<PromptEmbeds>,
        side: usize,
    ) -> Result<Self> {
        let embeds = match &uncond {
            Some(u) => PromptEmbeds::cat(&[u, &cond])?,
            None => cond.clone(),
        };
        let added = model.added_cond(&embeds, side, side)?;
        Ok(Conditioning {
            cond,
            uncond,
            embeds,
            added,
            side,
        })
    }

    /// The rows `idx` (in that order; copies, so the values are the same bits).
    pub fn select(&self, model: &StableDiffusion, idx: &[usize]) -> Result<Self> {
        let dev = self.cond.hidden_states.device();
        let ix = Tensor::from_vec(
            idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            idx.len(),
            dev,
        )?;
        let pick = |e: &PromptEmbeds| -> Result<PromptEmbeds> {
            Ok(PromptEmbeds {
                hidden_states: e.hidden_states.index_select(&ix, 0)?,
                pooled: e
                    .pooled
                    .as_ref()
                    .map(|p| p.index_select(&ix, 0))
                    .transpose()?,
            })
        };
        let cond = pick(&self.cond)?;
        let uncond = self.uncond.as_ref().map(pick).transpose()?;
        Self::from_embeds(model, cond, uncond, self.side)
    }

    pub fn len(&self) -> Result<usize> {
        Ok(self.cond.hidden_states.dim(0)?)
    }

    /// The conditional rows alone (no unconditional branch: [`guided_output`] then runs them unguided).
    pub fn cond_only(&self, model: &StableDiffusion) -> Result<Self> {
        Self::from_embeds(model, self.cond.clone(), None, self.side)
    }

    /// The pixel side the conditioning was made for.
    pub fn side(&self) -> usize {
        self.side
    }

    /// The rows of several conditionings, in order.
    pub fn concat(parts: &[&Conditioning]) -> Result<Self> {
        let first = parts.first().context("concat: no conditioning")?;
        let cat = |f: &dyn Fn(&Conditioning) -> &PromptEmbeds| -> Result<PromptEmbeds> {
            PromptEmbeds::cat(&parts.iter().map(|p| f(p)).collect::<Vec<_>>()).map_err(Into::into)
        };
        let cond = cat(&|c| &c.cond)?;
        let uncond = match first.uncond {
            Some(_) => Some(cat(&|c| c.uncond.as_ref().expect("same guidance"))?),
            None => None,
        };
        let embeds = match &uncond {
            Some(u) => PromptEmbeds::cat(&[u, &cond])?,
            None => cond.clone(),
        };
        let added = match &first.added {
            Some(a) => {
                let n = embeds.hidden_states.dim(0)?;
                Some(AddedCond {
                    text_embeds: embeds.pooled.clone().context("SDXL: pooled embeddings")?,
                    time_ids: a.time_ids.narrow(0, 0, 1)?.repeat((n, 1))?,
                })
            }
            None => None,
        };
        Ok(Conditioning {
            cond,
            uncond,
            embeds,
            added,
            side: first.side,
        })
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// The guided model output `ε̂` for `x` (`[N, C, h, w]`, f32) at per-sample timesteps `t` (`[N]`), in f32. The
/// UNet runs in its own dtype; with graph unless the weights are detached.
pub fn guided_output(
    unet: &UNet2DConditionModel,
    x: &Tensor,
    t: &Tensor,
    c: &Conditioning,
    guidance: f64,
) -> Result<Tensor> {
    let n = x.dim(0)?;
    let dt = unet.dtype();
    let (input, tt) = if c.uncond.is_some() {
        (Tensor::cat(&[x, x], 0)?, Tensor::cat(&[t, t], 0)?)
    } else {
        (x.clone(), t.clone())
    };
    let pred = unet
        .forward(
            &input.to_dtype(dt)?,
            &tt,
            &c.embeds.hidden_states,
            c.added.as_ref(),
        )?
        .to_dtype(DType::F32)?;
    Ok(if c.uncond.is_some() {
        let u = pred.narrow(0, 0, n)?;
        let ct = pred.narrow(0, n, n)?;
        (&u + ((ct - &u)? * guidance)?)?
    } else {
        pred
    })
}

/// One transition of the rule's sampler from `x` (`[N]` rows, f32) at the rows' steps `ks` (indices into
/// `rule.timesteps`): sampled with `noise` (`[N, C, h, w]`) or evaluated at a given `prev` (see
/// [`DdimTransition`]). `model_output` is the guided `ε̂` (f32). Deterministic rows (DDPM's last step) return
/// `x̂₀` with std and log-probability 0.
pub fn transition(
    rule: &StepRule,
    model_output: &Tensor,
    x: &Tensor,
    ks: &[usize],
    how: DdimTransition<'_>,
) -> Result<Transition> {
    let n = x.dim(0)?;
    ensure!(ks.len() == n, "transition: {} steps for {n} rows", ks.len());
    let dev = x.device();
    let t = Tensor::from_vec(
        ks.iter()
            .map(|&k| rule.timesteps[k] as f32)
            .collect::<Vec<_>>(),
        n,
        dev,
    )?;
    let out = ddim_step_with_logprob(
        &rule.schedule,
        model_output,
        &t,
        x,
        rule.eta,
        rule.step_ratio,
        how,
    )?;
    let det: Vec<bool> = ks.iter().map(|&k| rule.is_ddpm_last(k)).collect();
    if !det.iter().any(|&d| d) {
        return Ok(Transition {
            prev_sample: out.prev_sample,
            mean: out.mean,
            std: out.std,
            log_prob: out.log_prob,
            pred_x0: out.pred_original_sample,
        });
    }
    // DDPM's last step: x₀ = x̂₀ exactly, no log-probability.
    let mask = Tensor::from_vec(det.iter().map(|&d| d as u8).collect::<Vec<_>>(), n, dev)?;
    let m4 = mask.reshape((n, 1, 1, 1))?.broadcast_as(x.shape())?;
    let x0 = &out.pred_original_sample;
    let zeros = Tensor::zeros(n, DType::F32, dev)?;
    Ok(Transition {
        prev_sample: match how {
            DdimTransition::PrevSample(p) => p.to_dtype(DType::F32)?,
            _ => m4.where_cond(x0, &out.prev_sample)?,
        },
        mean: m4.where_cond(x0, &out.mean)?,
        std: mask.where_cond(&zeros, &out.std)?,
        log_prob: mask.where_cond(&zeros, &out.log_prob)?,
        pred_x0: out.pred_original_sample,
    })
}

/// A batch of sampled trajectories (row `i` is sample `i`), everything f32 on the model's device.
#[derive(Clone, Debug)]
pub struct Trajectory {
    pub prompts: Vec<String>,
    /// Pixel side of the images.
    pub side: usize,
    /// The step timesteps (S).
    pub timesteps: Vec<f64>,
    /// `x_T, …, x_0`: S + 1 tensors `[B, C, h, w]`.
    pub latents: Vec<Tensor>,
    /// Per step: the transition's mean `[B, C, h, w]`, std `[B]` and log-probability `[B]` (the means and
    /// predicted x̂₀ may be left out — empty — where only training needs the trajectory, e.g. restored from a
    /// checkpoint).
    pub means: Vec<Tensor>,
    pub stds: Vec<Tensor>,
    pub log_probs: Vec<Tensor>,
    /// Per step: the predicted x̂₀ `[B, C, h, w]`.
    pub pred_x0: Vec<Tensor>,
    /// The decoded final images `[B, 3, H, W]` in [0, 1].
    pub images: Tensor,
    /// The conditioning the sampler used.
    pub cond: Conditioning,
}

impl Trajectory {
    /// An empty trajectory of `prompts` starting at `x_T` (room for the rule's steps; images not yet decoded).
    fn begin(
        prompts: &[&str],
        side: usize,
        rule: &StepRule,
        x_t: Tensor,
        cond: Conditioning,
    ) -> Result<Trajectory> {
        let s = rule.timesteps.len();
        Ok(Trajectory {
            prompts: prompts.iter().map(|p| p.to_string()).collect(),
            side,
            timesteps: rule.timesteps.clone(),
            images: Tensor::zeros(1, DType::F32, x_t.device())?,
            latents: vec![x_t],
            means: Vec::with_capacity(s),
            stds: Vec::with_capacity(s),
            log_probs: Vec::with_capacity(s),
            pred_x0: Vec::with_capacity(s),
            cond,
        })
    }

    /// Decode the final latents `x_0` into [`Trajectory::images`] (f32, [0, 1]).
    fn decode(&mut self, model: &StableDiffusion, x0: &Tensor) -> Result<()> {
        self.images = model
            .vae
            .decode_to_image01(&x0.to_dtype(model.dtype())?)?
            .to_dtype(DType::F32)?
            .detach();
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// `[S, B]` log-probabilities.
    pub fn log_prob_matrix(&self) -> Result<Tensor> {
        Ok(Tensor::stack(&self.log_probs, 0)?)
    }

    /// The rows of several batches (same steps and image size) as one batch.
    pub fn concat(parts: &[Trajectory]) -> Result<Trajectory> {
        let first = parts.first().context("concat: no trajectories")?;
        ensure!(
            parts
                .iter()
                .all(|p| p.timesteps == first.timesteps && p.side == first.side),
            "concat: trajectories of different steps or sizes"
        );
        if parts.len() == 1 {
            return Ok(first.clone());
        }
        let cat = |f: fn(&Trajectory) -> &Vec<Tensor>| -> Result<Vec<Tensor>> {
            (0..f(first).len())
                .map(|k| {
                    Ok(Tensor::cat(
                        &parts.iter().map(|p| &f(p)[k]).collect::<Vec<_>>(),
                        0,
                    )?)
                })
                .collect()
        };
        Ok(Trajectory {
            prompts: parts.iter().flat_map(|p| p.prompts.clone()).collect(),
            side: first.side,
            timesteps: first.timesteps.clone(),
            latents: cat(|t| &t.latents)?,
            means: cat(|t| &t.means)?,
            stds: cat(|t| &t.stds)?,
            log_probs: cat(|t| &t.log_probs)?,
            pred_x0: cat(|t| &t.pred_x0)?,
            images: Tensor::cat(&parts.iter().map(|p| &p.images).collect::<Vec<_>>(), 0)?,
            cond: Conditioning::concat(&parts.iter().map(|p| &p.cond).collect::<Vec<_>>())?,
        })
    }
}

/// The latent side of images of `resolution` pixels (default: the UNet's sample size).
pub fn latent_side(model: &StableDiffusion, resolution: Option<usize>) -> Result<usize> {
    let f = model.vae_scale_factor();
    let side = match resolution {
        Some(r) => r,
        None => {
            model
                .unet
                .config()
                .sample_size
                .as_ref()
                .and_then(|v| v.as_u64())
                .unwrap_or(64) as usize
                * f
        }
    };
    let m = f * model.unet.config().downscale_factor();
    if side == 0 || side % m != 0 {
        bail!(
            "[rollout] resolution must be a positive multiple of {m} for this model (got {side})"
        );
    }
    Ok(side / f)
}

/// Samples one trajectory per prompt with `model`'s UNet as it is (call it inside
/// [`crate::engine::Policy::with_weights`] to sample the policy or the reference without graph). The initial
/// noise and the step noises come from `rng` (in that order: `x_T` of every row, then each stochastic step's
/// noise).
pub fn sample(
    model: &StableDiffusion,
    rule: &StepRule,
    prompts: &[&str],
    resolution: Option<usize>,
    rng: &mut Rng,
) -> Result<Trajectory> {
    ensure!(!prompts.is_empty(), "rollout: no prompts");
    let x_t = rng.normal_tensor(
        &initial_noise_shape(model, prompts.len(), resolution)?,
        model.device(),
    )?;
    sample_from(model, rule, prompts, x_t, rng)
}

/// The shape `[n, C, h, w]` of the initial noise of `n` rollouts at `resolution` (see [`latent_side`]).
pub fn initial_noise_shape(
    model: &StableDiffusion,
    n: usize,
    resolution: Option<usize>,
) -> Result<[usize; 4]> {
    let side = latent_side(model, resolution)?;
    Ok([n, model.unet.config().in_channels, side, side])
}

/// [`sample`] from the given initial noise `x_t` `[B, C, h, w]` (f32; e.g. one noise shared by a group, as
/// DanceGRPO does): each stochastic step draws its noise from `rng`; steps outside the rule's stochastic range
/// are deterministic DDIM steps (std and log-probability 0).
pub fn sample_from(
    model: &StableDiffusion,
    rule: &StepRule,
    prompts: &[&str],
    x_t: Tensor,
    rng: &mut Rng,
) -> Result<Trajectory> {
    let b = prompts.len();
    ensure!(b > 0, "rollout: no prompts");
    let (n, c, side, side_w) = x_t.dims4()?;
    ensure!(
        n == b && c == model.unet.config().in_channels && side == side_w,
        "rollout: initial noise {:?} for {b} prompts",
        x_t.dims()
    );
    let pixels = side * model.vae_scale_factor();
    let cond = Conditioning::new(model, prompts, rule.guidance, pixels)?;
    let dev = model.device();
    let shape = [b, c, side, side];
    let mut x = x_t.to_dtype(DType::F32)?;
    let s = rule.timesteps.len();
    let mut traj = Trajectory::begin(prompts, pixels, rule, x.clone(), cond)?;
    for k in 0..s {
        let t = Tensor::full(rule.timesteps[k] as f32, b, dev)?;
        let eps = guided_output(&model.unet, &x, &t, &traj.cond, rule.guidance)?.detach();
        let tr = if rule.in_window(k) {
            let z = rng.normal_tensor(&shape, dev)?;
            transition(rule, &eps, &x, &vec![k; b], DdimTransition::Noise(&z))?
        } else {
            deterministic_step(rule, &eps, &x, k)?
        };
        x = tr.prev_sample.detach();
        traj.latents.push(x.clone());
        traj.means.push(tr.mean.detach());
        traj.stds.push(tr.std.detach());
        traj.log_probs.push(tr.log_prob.detach());
        traj.pred_x0.push(tr.pred_x0.detach());
    }
    traj.decode(model, &x)?;
    Ok(traj)
}

/// The deterministic DDIM step (η = 0) of rows `x` at step `k`: `x_t' = √ᾱ_t' x̂₀ + √(1 − ᾱ_t') ε̂` (the same
/// trl-convention timesteps as [`transition`]; std and log-probability 0).
pub fn deterministic_step(
    rule: &StepRule,
    model_output: &Tensor,
    x: &Tensor,
    k: usize,
) -> Result<Transition> {
    let n = x.dim(0)?;
    let dev = x.device();
    let t = Tensor::full(rule.timesteps[k] as f32, n, dev)?;
    let zero = x.zeros_like()?;
    let out = ddim_step_with_logprob(
        &rule.schedule,
        model_output,
        &t,
        x,
        0.0,
        rule.step_ratio,
        DdimTransition::Noise(&zero),
    )?;
    let zeros = Tensor::zeros(n, DType::F32, dev)?;
    Ok(Transition {
        prev_sample: out.mean.clone(),
        mean: out.mean,
        std: zeros.clone(),
        log_prob: zeros,
        pred_x0: out.pred_original_sample,
    })
}

/// Branched group rollouts (TempFlow-GRPO-style credit assignment): `prompts` come in groups of `group` equal
/// consecutive prompts; each group shares one initial noise and follows the deterministic DDIM path (η = 0)
/// except at step `branch`, where every member draws its own noise from the rule's Gaussian (η = `rule.eta`),
/// so the members' differences come from that one transition alone. Returns the trajectories (row `i` is
/// member `i % group` of group `i / group`); only step `branch` has a std and a log-probability. The branch
/// step runs on the members' rows (the parent repeated), the layout [`recompute`] uses, so its recomputed
/// log-probability equals the sampled one exactly. Draws, in order: the groups' initial noise, then the
/// members' branch noise.
pub fn sample_branched(
    model: &StableDiffusion,
    rule: &StepRule,
    prompts: &[&str],
    group: usize,
    branch: usize,
    resolution: Option<usize>,
    rng: &mut Rng,
) -> Result<Trajectory> {
    let b = prompts.len();
    ensure!(
        group >= 1 && b > 0 && b.is_multiple_of(group),
        "branched rollout: {b} prompts do not split into groups of {group}"
    );
    ensure!(
        branch < rule.timesteps.len() && rule.is_stochastic(branch),
        "branched rollout: step {branch} cannot branch"
    );
    let groups = b / group;
    let side = latent_side(model, resolution)?;
    let pixels = side * model.vae_scale_factor();
    let cond = Conditioning::new(model, prompts, rule.guidance, pixels)?;
    let firsts: Vec<usize> = (0..groups).map(|g| g * group).collect();
    let trunk_cond = cond.select(model, &firsts)?;
    let c = model.unet.config().in_channels;
    let dev = model.device();
    let mut x = rng.normal_tensor(&[groups, c, side, side], dev)?;
    let repeat = |t: &Tensor| -> Result<Tensor> {
        let idx: Vec<u32> = (0..b).map(|i| (i / group) as u32).collect();
        Ok(t.index_select(&Tensor::from_vec(idx, b, t.device())?, 0)?)
    };
    let s = rule.timesteps.len();
    let zeros = Tensor::zeros(b, DType::F32, dev)?;
    let mut traj = Trajectory::begin(prompts, pixels, rule, repeat(&x)?, cond)?;
    for k in 0..s {
        let trunk = k < branch;
        let (rows, cond) = if trunk {
            (groups, &trunk_cond)
        } else {
            (b, &traj.cond)
        };
        if k == branch {
            x = repeat(&x)?;
        }
        let t = Tensor::full(rule.timesteps[k] as f32, rows, dev)?;
        let eps = guided_output(&model.unet, &x, &t, cond, rule.guidance)?.detach();
        let tr = if k == branch {
            let z = rng.normal_tensor(&[b, c, side, side], dev)?;
            transition(rule, &eps, &x, &vec![k; b], DdimTransition::Noise(&z))?
        } else {
            deterministic_step(rule, &eps, &x, k)?
        };
        x = tr.prev_sample.detach();
        let widen = |t: Tensor| if trunk { repeat(&t) } else { Ok(t) };
        traj.latents.push(widen(x.clone())?);
        traj.means.push(widen(tr.mean.detach())?);
        traj.pred_x0.push(widen(tr.pred_x0.detach())?);
        if k == branch {
            traj.stds.push(tr.std.detach());
            traj.log_probs.push(tr.log_prob.detach());
        } else {
            traj.stds.push(zeros.clone());
            traj.log_probs.push(zeros.clone());
        }
    }
    traj.decode(model, &x)?;
    Ok(traj)
}

/// A set of stored transitions to recompute: `(row, step)` pairs of a trajectory batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    pub rows: Vec<usize>,
    pub steps: Vec<usize>,
}

impl Selection {
    /// Every row of a batch of `n` at step `k` (the layout that reproduces sampling exactly).
    pub fn step(n: usize, k: usize) -> Self {
        Selection {
            rows: (0..n).collect(),
            steps: vec![k; n],
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Stacks `per_step[k][row]` for each selected `(row, k)`: `[N, …]`.
fn gather(per_step: &[Tensor], sel: &Selection) -> Result<Tensor> {
    let rows = sel
        .rows
        .iter()
        .zip(&sel.steps)
        .map(|(&i, &k)| per_step[k].i(i))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0)?)
}

/// The stored transitions `sel` of `traj` recomputed under `unet` (the policy with graph, or a reference
/// scope's UNet): the log-probability of the stored `x_{t'}` given the stored `x_t`, and the new mean, with the
/// sampler's conditioning. One batched forward; bit-identical to sampling for a whole step of the batch (see
/// [`Selection::step`] and the module docs).
pub fn recompute(
    unet: &UNet2DConditionModel,
    model: &StableDiffusion,
    rule: &StepRule,
    traj: &Trajectory,
    sel: &Selection,
) -> Result<Transition> {
    ensure!(!sel.is_empty(), "recompute: nothing selected");
    ensure!(
        sel.steps
            .iter()
            .all(|&k| rule.is_stochastic(k) && k < traj.timesteps.len()),
        "recompute: a selected step is deterministic or out of range"
    );
    let x = gather(&traj.latents[..traj.timesteps.len()], sel)?;
    let prev = {
        let rows = sel
            .rows
            .iter()
            .zip(&sel.steps)
            .map(|(&i, &k)| traj.latents[k + 1].i(i))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::stack(&rows, 0)?
    };
    let whole = sel.rows.len() == traj.len() && sel.rows.iter().enumerate().all(|(i, &r)| i == r);
    let selected;
    let c = if whole {
        &traj.cond
    } else {
        selected = traj
            .cond
            .select(model, &sel.rows)
            .context("recompute: conditioning")?;
        &selected
    };
    let dev = x.device();
    let t = Tensor::from_vec(
        sel.steps
            .iter()
            .map(|&k| rule.timesteps[k] as f32)
            .collect::<Vec<_>>(),
        sel.len(),
        dev,
    )?;
    let eps = guided_output(unet, &x, &t, c, rule.guidance)?;
    transition(
        rule,
        &eps,
        &x,
        &sel.steps,
        DdimTransition::PrevSample(&prev),
    )
}

/// The stored log-probabilities of `sel`, `[N]`.
pub fn stored_log_probs(traj: &Trajectory, sel: &Selection) -> Result<Tensor> {
    let v = sel
        .rows
        .iter()
        .zip(&sel.steps)
        .map(|(&i, &k)| traj.log_probs[k].i(i))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&v, 0)?)
}

/// The stored stds of `sel`, `[N]`.
pub fn stored_stds(traj: &Trajectory, sel: &Selection) -> Result<Tensor> {
    let v = sel
        .rows
        .iter()
        .zip(&sel.steps)
        .map(|(&i, &k)| traj.stds[k].i(i))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&v, 0)?)
}
