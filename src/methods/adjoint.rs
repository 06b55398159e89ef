//! `diffpref train adjoint`: **Adjoint Matching** (Domingo-Enrich, Drozdzal, Karrer, Chen, "Adjoint Matching:
//! Fine-tuning Flow and Diffusion Generative Models with Memoryless Stochastic Optimal Control", ICLR 2025;
//! the ε-prediction recipe of `microsoft/soc-fine-tuning-sd`). Reward fine-tuning as stochastic optimal
//! control: the fine-tuned model's *control* (how far its sampler's mean departs from the base model's) is
//! regressed onto the *lean adjoint*, the reward's gradient carried back along the sampled trajectory by the
//! base model's Jacobians. Its optimum samples the base distribution tilted by `exp(λ r)`: reward without
//! collapse, with λ the knob between the two.
//!
//! **Memoryless sampler.** Trajectories come from DDIM with η = 1 (the DDPM posterior step, Theorem 1's only
//! memoryless schedule for ε-models; [`crate::rollout`], `[rollout]`), steps k = 0 … K−1 from `x_T` (here
//! `X_0`) to the image latent `X_K`, with ᾱ_k = ᾱ(τ_k) and ᾱ_{k+1} = ᾱ(τ_{k+1}) (ᾱ(0) after the last step):
//!
//! ```text
//! μ_k(x; ε) = √(ᾱ_{k+1}/ᾱ_k) · (x − (1 − ᾱ_k/ᾱ_{k+1}) / √(1 − ᾱ_k) · ε(x, τ_k))
//! s_k       = √((1 − ᾱ_{k+1})/(1 − ᾱ_k) · (1 − ᾱ_k/ᾱ_{k+1}))
//! X_{k+1}   = μ_k(X_k; ε^θ) + s_k ξ_k                         (the current model, classifier-free guided, no graph)
//! ```
//!
//! **Lean adjoint** (the paper's Alg. 2), in f32, one input vector-Jacobian product of the *base* model per step
//! and no graph kept across steps (memory is one network graph whatever K):
//!
//! ```text
//! ã_K = −λ ∇_x R(Decode(x)) at x = X_K                         (through the VAE decoder and the reward)
//! ã_k = (∂μ_k(x; ε^b) / ∂x)ᵀ ã_{k+1} at x = X_k                (noise held fixed)
//! ```
//!
//! **Loss** (the paper's Alg. 2 and eq. 37, discrete DDPM form): on a random subset S of the steps (shared by
//! the micro-batch; `early_steps` drawn from the noisy part, `late_steps` from the last `late_fraction` of the
//! steps, 0 = all of them — the paper always trains its last 25%, the official SD1.5 code draws 2 + 2),
//!
//! ```text
//! w_k = (μ_k(X_k; ε^θ) − μ_k(X_k; ε^b)) / s_k  =  −c_k (ε^θ − ε^b)        the control (with graph into θ)
//! ℓ_k = ‖w_k + s_k ã_k‖²                                                 summed over C, H, W
//! L   = mean over (sample, k ∈ S) of m_k ℓ_k                             (masked terms count as zero)
//! ```
//!
//! with `c_k = √(ᾱ_{k+1}(1 − ᾱ_k/ᾱ_{k+1}) / (ᾱ_k(1 − ᾱ_{k+1})))`. The adjoint grows fast toward the noise end,
//! so large terms are masked (`clip`): `quantile` keeps a term when √ℓ is at most an EMA (decay `clip_ema`) of
//! the batches' `clip_quantile` quantile of √ℓ (the official code's rule), `fixed` keeps ℓ ≤ `clip_value`·λ² (the
//! paper's LCT, in these units), `none` keeps all. `pairing = "next"` pairs the control at `X_k` with
//! `ã_{k+1}` (the exact discrete optimum's adjoint; the paper pairs with `ã_k`).
//!
//! **Guidance** (the spec's §4.3): rollouts use `[rollout] guidance` through the fine-tuned model (both
//! branches); the adjoint and the control use the conditional branch only (the official code's default, the
//! best in practice). `guided_adjoint = true` uses the guided output in both too (grounded, but the adjoint's
//! norm explodes); guidance 1 is the fully grounded unguided variant.
//!
//! **Replay** (`buffer_passes` > 1, the official code's buffer trainer): a batch of trajectories and their
//! adjoints trains that many optimizer steps (a new step subset each time), off-policy after the first.
//! **Smoothed gradient** (`grad_copies` > 0, the official code's option): `∇R` is averaged over the clean final
//! latent and noisy copies `X_K + σ z` ([`smoothed_terminal_adjoint`]).
//!
//! **Diagnostics.** Besides the rewards and the adjoint's norms, `explained = 1 − Σℓ / Σ‖s ã‖²` over a fresh
//! micro-batch, before it is trained on: the share of the targets the control predicts (0 without control,
//! negative when the control is noise with respect to them).
//!
//! The training reward is `[reward]` (any differentiable reward or weighted mix: the shapes surrogate, CLIP
//! score, PickScore, HPSv2, ImageReward, aesthetic, an LRM); the held-out judge is `[eval]` (on the shapes
//! world: the exact reward on held-out prompts). Both are reported; a training reward that rises while the
//! judge does not is reward hacking.

use crate::data::prompt_cycle::PromptCycle;
use crate::engine::config::RunConfig;
use crate::engine::method::{Method, MicroStep, StartContext, StepContext};
use crate::engine::policy::{Policy, Weights};
use crate::engine::run::{train_method, TrainSummary};
use crate::eval::read_prompts;
use crate::rollout::{
    self, guided_output, transition, Conditioning, RolloutConfig, Sampler, StepRule,
};
use crate::scoring::RewardSpec;
use crate::train::checkpoint::StopFlag;
use crate::train::rng::Rng;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor, Var};
use diffpref_pipelines::loading::StableDiffusion;
use diffpref_pipelines::models::unet::UNet2DConditionModel;
use diffpref_pipelines::schedulers::DdimTransition;
use diffpref_rewards::Reward;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Which terms of the matching loss are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossClip {
    /// √ℓ at most an EMA of the batches' `clip_quantile` quantile of √ℓ (microsoft/soc-fine-tuning-sd). Default.
    #[default]
    Quantile,
    /// ℓ at most `clip_value` · λ² (the paper's loss clipping threshold).
    Fixed,
    /// Every term.
    None,
}

/// Which adjoint the control at `X_k` is matched to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Pairing {
    /// `ã_k`, the adjoint at the control's own state (the paper, the official code). Default.
    #[default]
    Current,
    /// `ã_{k+1}`, the adjoint after the step (the exact discrete optimum; agrees to first order).
    Next,
}

/// `[adjoint]`: the method's settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdjointSection {
    /// Training prompts, one per line. Required.
    pub prompts: Option<PathBuf>,
    /// The reward multiplier λ: the optimum is the base distribution tilted by `exp(λ r)`. Default 100.
    pub reward_scale: f64,
    /// Steps trained per micro-batch drawn from the noisy part of the trajectory. Default 2.
    pub early_steps: usize,
    /// Steps drawn from the last `late_fraction` of the trajectory (0 = all of them). Default 0.
    pub late_steps: usize,
    /// The fraction of the steps (the least noisy ones) that make the late part. Default 0.4.
    pub late_fraction: f64,
    /// quantile | fixed | none (see the module docs). Default quantile.
    pub clip: LossClip,
    /// `clip = "quantile"`: the quantile of √ℓ. Default 0.9.
    pub clip_quantile: f64,
    /// `clip = "quantile"`: the EMA decay of the threshold. Default 0.9.
    pub clip_ema: f64,
    /// `clip = "fixed"`: terms above `clip_value` · λ² are masked. Default 1.6 (the paper's LCT factor).
    pub clip_value: f64,
    /// current | next (see [`Pairing`]). Default current.
    pub pairing: Pairing,
    /// The adjoint and the control use the guided output (both branches) instead of the conditional one.
    /// Default false.
    pub guided_adjoint: bool,
    /// Optimizer steps each batch of trajectories trains (1 = on-policy). Default 1.
    pub buffer_passes: usize,
    /// Noisy copies the reward's gradient is averaged over (the official code's smoothed gradient; 0 = the plain
    /// gradient). Default 0.
    pub grad_copies: usize,
    /// The std of the copies' latent noise. Default 0.02.
    pub grad_noise: f64,
}

impl Default for AdjointSection {
    fn default() -> Self {
        AdjointSection {
            prompts: None,
            reward_scale: 100.0,
            early_steps: 2,
            late_steps: 0,
            late_fraction: 0.4,
            clip: LossClip::Quantile,
            clip_quantile: 0.9,
            clip_ema: 0.9,
            clip_value: 1.6,
            pairing: Pairing::Current,
            guided_adjoint: false,
            buffer_passes: 1,
            grad_copies: 0,
            grad_noise: 0.02,
        }
    }
}

/// A whole `diffpref train adjoint` run: the shared run settings ([`RunConfig`]), `[adjoint]`, `[rollout]` (the
/// memoryless sampler: DDIM with η = 1) and `[reward]` (the differentiable training reward). See
/// `examples/adjoint.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct AdjointConfig {
    #[serde(flatten)]
    pub run: RunConfig,
    pub adjoint: AdjointSection,
    pub rollout: RolloutConfig,
    pub reward: RewardSpec,
}

impl Default for AdjointConfig {
    fn default() -> Self {
        AdjointConfig {
            run: RunConfig::default(),
            adjoint: AdjointSection::default(),
            rollout: RolloutConfig::default(),
            reward: RewardSpec::single(crate::scoring::RewardKind::ShapesSurrogate),
        }
    }
}

impl AdjointConfig {
    /// Reads a TOML config (or the defaults) and applies `--set key=value` overrides; unknown keys are errors
    /// naming the key.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<AdjointConfig> {
        crate::config::load_toml(path, overrides)
    }

    /// Parses a TOML configuration (`what` names it in errors) and applies `--set` overrides.
    pub fn from_toml(text: &str, what: &str, overrides: &[String]) -> Result<AdjointConfig> {
        crate::config::from_toml(text, what, overrides)
    }

    /// The run folder (`output_dir`, default `runs/adjoint`).
    pub fn output_dir(&self) -> PathBuf {
        self.run.output_dir("adjoint")
    }

    pub fn validate(&self) -> Result<()> {
        self.run.validate()?;
        let a = &self.adjoint;
        ensure!(
            a.prompts.is_some(),
            "[adjoint] prompts (the training prompts, one per line) is required"
        );
        ensure!(
            a.reward_scale.is_finite() && a.reward_scale > 0.0,
            "[adjoint] reward_scale must be positive (got {})",
            a.reward_scale
        );
        ensure!(
            a.late_fraction.is_finite() && (0.0..=1.0).contains(&a.late_fraction),
            "[adjoint] late_fraction must lie in [0, 1] (got {})",
            a.late_fraction
        );
        ensure!(
            a.clip_quantile > 0.0 && a.clip_quantile <= 1.0,
            "[adjoint] clip_quantile must lie in (0, 1] (got {})",
            a.clip_quantile
        );
        ensure!(
            (0.0..1.0).contains(&a.clip_ema),
            "[adjoint] clip_ema must lie in [0, 1) (got {})",
            a.clip_ema
        );
        ensure!(
            a.clip_value.is_finite() && a.clip_value > 0.0,
            "[adjoint] clip_value must be positive (got {})",
            a.clip_value
        );
        ensure!(
            a.buffer_passes >= 1,
            "[adjoint] buffer_passes must be at least 1"
        );
        ensure!(
            a.grad_noise.is_finite() && a.grad_noise > 0.0,
            "[adjoint] grad_noise must be positive (got {})",
            a.grad_noise
        );
        let per_step = self.run.optim.batch_size * self.run.optim.grad_accum;
        ensure!(
            per_step <= crate::engine::config::MAX_BATCH,
            "[optim] batch_size x grad_accum = {per_step}: at most {} trajectories a step",
            crate::engine::config::MAX_BATCH
        );
        self.rollout.validate("[rollout]")?;
        ensure!(
            self.rollout.sampler == Sampler::Ddim,
            "[rollout] sampler must be \"ddim\" for Adjoint Matching (η = 1 is the memoryless sampler; `ddpm`'s \
             deterministic last step has no control)"
        );
        ensure!(
            self.rollout.eta >= 1.0,
            "[rollout] eta must be >= 1: only η >= 1 is memoryless (η = 1 is Theorem 1's schedule; got {})",
            self.rollout.eta
        );
        ensure!(
            self.rollout.stochastic_range.is_none(),
            "[rollout] stochastic_range: Adjoint Matching needs every step stochastic (remove the key)"
        );
        let s = self.rollout.steps;
        let (early, late) = split_steps(s, a.late_fraction);
        ensure!(
            a.early_steps <= early.len(),
            "[adjoint] early_steps {} exceeds the {} noisy steps of [rollout] steps = {s} (late_fraction {})",
            a.early_steps,
            early.len(),
            a.late_fraction
        );
        ensure!(
            a.late_steps <= late.len(),
            "[adjoint] late_steps {} exceeds the {} late steps of [rollout] steps = {s} (late_fraction {})",
            a.late_steps,
            late.len(),
            a.late_fraction
        );
        ensure!(
            a.early_steps > 0 || !late.is_empty(),
            "[adjoint] no step is trained: early_steps = 0 and late_fraction {} leaves no late step",
            a.late_fraction
        );
        self.reward.validate("[reward]")
    }
}

/// The noisy and the late steps of a trajectory of `steps` steps: the late part is the last
/// `round(late_fraction · steps)`.
pub fn split_steps(steps: usize, late_fraction: f64) -> (Vec<usize>, Vec<usize>) {
    let late = ((late_fraction * steps as f64).round() as usize).min(steps);
    ((0..steps - late).collect(), (steps - late..steps).collect())
}

/// The lean adjoint of a batch of trajectories and what its sweep computed on the way.
pub struct LeanAdjoint {
    /// `ã_0 … ã_K` (`[B, C, h, w]` f32 each; `ã_K` the terminal one).
    pub adjoints: Vec<Tensor>,
    /// `μ_k(X_k; ε^b)` for k = 0 … K−1: the base model's sampler mean, cached for the control.
    pub base_means: Vec<Tensor>,
}

/// The terminal adjoint `ã_K = −λ ∇_x R(Decode(x))` at `x = x_final` (`[B, C, h, w]`), through `model`'s VAE
/// decoder and `reward` (in f32 for the gradient; the decoder in the model's dtype), and the rewards
/// `R(Decode(x_final))`.
pub fn terminal_adjoint(
    model: &StableDiffusion,
    reward: &dyn Reward,
    x_final: &Tensor,
    prompts: &[&str],
    reward_scale: f64,
) -> Result<(Tensor, Vec<f64>)> {
    let mut scores = None;
    let g = diffpref_rewards::input_gradient(x_final, |x| {
        let img = model
            .vae
            .decode_to_image01(&x.to_dtype(model.dtype())?)
            .map_err(|e| diffpref_rewards::Error::msg(format!("decoding the latents: {e}")))?
            .to_dtype(DType::F32)?;
        let s = reward.score(&img, prompts)?;
        scores = Some(s.detach());
        Ok(s)
    })
    .context("the reward's gradient with respect to the final latents")?;
    let s = scores.context("the reward ran")?;
    let r: Vec<f64> = s
        .to_dtype(DType::F64)?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1()?;
    Ok(((g * (-reward_scale))?.detach(), r))
}

/// [`terminal_adjoint`] smoothed (the official code's option): the mean of the gradient at `x_final` and at
/// `copies` noisy copies `x_final + σ z`, each copy's gradient scaled down to at most the 85% quantile of the
/// copies' norms (per sample), so a few sharp gradients do not dominate. The rewards are the clean latent's.
pub fn smoothed_terminal_adjoint(
    model: &StableDiffusion,
    reward: &dyn Reward,
    x_final: &Tensor,
    prompts: &[&str],
    reward_scale: f64,
    (copies, sigma): (usize, f64),
    rng: &mut Rng,
) -> Result<(Tensor, Vec<f64>)> {
    let (clean, rewards) = terminal_adjoint(model, reward, x_final, prompts, reward_scale)?;
    if copies == 0 {
        return Ok((clean, rewards));
    }
    let b = x_final.dim(0)?;
    let mut grads = vec![clean];
    for _ in 0..copies {
        let z = rng.normal_tensor(x_final.dims(), x_final.device())?;
        let x = (x_final + (z * sigma)?)?;
        grads.push(terminal_adjoint(model, reward, &x, prompts, reward_scale)?.0);
    }
    // Per-sample norms [copies + 1, B], the cap per sample, and the capped mean.
    let g = Tensor::stack(&grads, 0)?;
    let n = g.dim(0)?;
    let norms = g.reshape((n, b, ()))?.sqr()?.sum(2)?.sqrt()?;
    let host: Vec<Vec<f32>> = norms.to_device(&candle_core::Device::Cpu)?.to_vec2()?;
    let mut scale = vec![0f32; n * b];
    for j in 0..b {
        let col: Vec<f64> = host.iter().map(|r| r[j] as f64).collect();
        let cap = quantile(&col, 0.85);
        for i in 0..n {
            let v = col[i];
            scale[i * b + j] = if v > cap && v > 0.0 {
                (cap / v) as f32
            } else {
                1.0
            };
        }
    }
    let scale = Tensor::from_vec(scale, (n, b, 1, 1, 1), x_final.device())?;
    Ok((g.broadcast_mul(&scale)?.mean(0)?, rewards))
}

/// The lean adjoint of the module docs along `latents` (`X_0 … X_K`, the rule's K steps), started from
/// `terminal` (`ã_K`): one input vector-Jacobian product of `unet` (the base model, its weights constants)
/// per step, its graph freed before the next, so memory does not grow with K beyond the stored tensors.
/// `cond` is the conditioning the adjoint uses (the conditional rows alone, or with the unconditional ones
/// when `guidance` > 1).
pub fn lean_adjoint(
    unet: &UNet2DConditionModel,
    rule: &StepRule,
    latents: &[Tensor],
    cond: &Conditioning,
    guidance: f64,
    terminal: Tensor,
) -> Result<LeanAdjoint> {
    let k_steps = rule.timesteps.len();
    ensure!(
        latents.len() == k_steps + 1,
        "lean adjoint: {} latents for {k_steps} steps",
        latents.len()
    );
    let b = latents[0].dim(0)?;
    let dev = latents[0].device();
    let mut adjoints = vec![terminal];
    let mut base_means = Vec::with_capacity(k_steps);
    for k in (0..k_steps).rev() {
        let x = Var::from_tensor(&latents[k].to_dtype(DType::F32)?)?;
        let t = Tensor::full(rule.timesteps[k] as f32, b, dev)?;
        let eps = guided_output(unet, x.as_tensor(), &t, cond, guidance)?;
        let tr = transition(
            rule,
            &eps,
            x.as_tensor(),
            &vec![k; b],
            DdimTransition::PrevSample(&latents[k + 1]),
        )?;
        let next = adjoints.last().expect("the terminal adjoint");
        let grads = (&tr.mean * next)?.sum_all()?.backward()?;
        let a = grads
            .get(x.as_tensor())
            .context("lean adjoint: no gradient reached the latent (an op without backward cut the graph)")?
            .detach();
        adjoints.push(a);
        base_means.push(tr.mean.detach());
    }
    adjoints.reverse();
    base_means.reverse();
    Ok(LeanAdjoint {
        adjoints,
        base_means,
    })
}

/// The matching terms `ℓ = ‖w + s ã‖²` (summed over all but the first dimension) of controls `w`, adjoints `a`
/// (`[N, …]`) and step stds `s` (`[N]`) → `[N]`.
pub fn matching_terms(w: &Tensor, a: &Tensor, s: &Tensor) -> Result<Tensor> {
    let n = w.dim(0)?;
    let target = a.broadcast_mul(&s.reshape((n, 1, 1, 1))?)?;
    Ok((w + target)?.sqr()?.reshape((n, ()))?.sum(1)?)
}

/// The `q` quantile of `v` (linear interpolation between order statistics, as `torch.quantile`).
pub fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::INFINITY;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let pos = q.clamp(0.0, 1.0) * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

/// The timestep buckets of the per-bucket loss metrics.
const BUCKETS: [(&str, f64, f64); 4] = [
    ("loss_t0_250", 0.0, 250.0),
    ("loss_t250_500", 250.0, 500.0),
    ("loss_t500_750", 500.0, 750.0),
    ("loss_t750_1000", 750.0, f64::INFINITY),
];

/// A micro-batch of trajectories with their adjoints (everything f32, no graph).
struct Chunk {
    prompts: Vec<String>,
    /// `X_0 … X_K`.
    latents: Vec<Tensor>,
    /// `ã_0 … ã_K`.
    adjoints: Vec<Tensor>,
    /// `μ_k(X_k; ε^b)`, k < K.
    base_means: Vec<Tensor>,
    /// `s_k` per step, `[B]` each.
    stds: Vec<Tensor>,
    /// The training reward of each trajectory's image.
    rewards: Vec<f64>,
    /// Sampler conditioning (both branches under guidance) and the adjoint's.
    cond: Conditioning,
}

/// The trajectories of an optimizer step (or several, with `buffer_passes`) and the micro-batches still to train.
struct Round {
    chunks: Vec<Chunk>,
    queue: Vec<usize>,
}

#[derive(Serialize, Deserialize)]
struct AdjointState {
    noise_rng: Rng,
    select_rng: Rng,
    smooth_rng: Rng,
    prompt_epoch: u64,
    prompt_index: usize,
    rounds: u64,
    reward_calls: u64,
    threshold: Option<f64>,
    round: Option<RoundState>,
}

#[derive(Serialize, Deserialize)]
struct ChunkState {
    prompts: Vec<String>,
    rewards: Vec<f64>,
}

#[derive(Serialize, Deserialize)]
struct RoundState {
    side: usize,
    chunks: Vec<ChunkState>,
    queue: Vec<usize>,
}

const ROUND_FILE: &str = "adjoint_round.safetensors";

/// Adjoint Matching as a [`Method`].
pub struct AdjointMethod {
    model: StableDiffusion,
    cfg: AdjointSection,
    rollout_cfg: RolloutConfig,
    rule: StepRule,
    reward: Box<dyn Reward>,
    prompts: PromptCycle,
    batch_size: usize,
    noise_rng: Rng,
    select_rng: Rng,
    smooth_rng: Rng,
    rounds: u64,
    reward_calls: u64,
    /// The EMA threshold on √ℓ (`clip = "quantile"`).
    threshold: Option<f64>,
    round: Option<Round>,
    pending: Option<RoundState>,
}

impl AdjointMethod {
    pub fn new(cfg: &AdjointConfig, model: StableDiffusion) -> Result<AdjointMethod> {
        let device = model.device().clone();
        let prompts_file = cfg.adjoint.prompts.as_ref().context("[adjoint] prompts")?;
        let prompts =
            read_prompts(prompts_file, cfg.reward.is_shapes()).context("[adjoint] prompts")?;
        let reward = cfg.reward.load("[reward]", &device)?;
        let rule = StepRule::new(&model, &cfg.rollout)?;
        Ok(AdjointMethod {
            rule,
            reward,
            prompts: PromptCycle::new(prompts, cfg.run.seed, "adjoint"),
            cfg: cfg.adjoint.clone(),
            rollout_cfg: cfg.rollout.clone(),
            batch_size: cfg.run.optim.batch_size,
            noise_rng: Rng::derive(cfg.run.seed, "adjoint-noise"),
            select_rng: Rng::derive(cfg.run.seed, "adjoint-select"),
            smooth_rng: Rng::derive(cfg.run.seed, "adjoint-smooth"),
            rounds: 0,
            reward_calls: 0,
            threshold: None,
            round: None,
            pending: None,
            model,
        })
    }

    /// The conditioning and guidance the adjoint and the control use, from the sampler's.
    fn adjoint_cond(&self, sampler: &Conditioning) -> Result<(Conditioning, f64)> {
        if self.cfg.guided_adjoint {
            Ok((sampler.clone(), self.rule.guidance))
        } else {
            Ok((sampler.cond_only(&self.model)?, 1.0))
        }
    }

    /// Samples `n` trajectories with the current policy (in micro-batches), computes their terminal and lean
    /// adjoints, and queues them for `buffer_passes` optimizer steps.
    fn new_round(&mut self, policy: &Policy, n: usize) -> Result<Vec<(&'static str, f64)>> {
        let (t0, mut adjoint_s) = (Instant::now(), 0.0);
        let mut chunks = Vec::new();
        let (mut norm_noise, mut norm_image) = (0.0, 0.0);
        let mut left = n;
        while left > 0 {
            let m = left.min(self.batch_size);
            left -= m;
            let prompts: Vec<String> = (0..m).map(|_| self.prompts.next_prompt()).collect();
            let ps: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
            let (rule, res, rng) = (&self.rule, self.rollout_cfg.resolution, &mut self.noise_rng);
            let traj = policy.with_weights(&mut self.model, Weights::Current, |m| {
                rollout::sample(m, rule, &ps, res, rng)
            })?;
            let t1 = Instant::now();
            let x_final = traj.latents.last().context("empty trajectory")?.clone();
            let (terminal, rewards) = smoothed_terminal_adjoint(
                &self.model,
                self.reward.as_ref(),
                &x_final,
                &ps,
                self.cfg.reward_scale,
                (self.cfg.grad_copies, self.cfg.grad_noise),
                &mut self.smooth_rng,
            )?;
            self.reward_calls += (m * (1 + self.cfg.grad_copies)) as u64;
            let (cond, guidance) = self.adjoint_cond(&traj.cond)?;
            let rule = &self.rule;
            let lean = policy.with_weights(&mut self.model, Weights::Base, |md| {
                lean_adjoint(&md.unet, rule, &traj.latents, &cond, guidance, terminal)
            })?;
            adjoint_s += t1.elapsed().as_secs_f64();
            norm_image += mean_norm(lean.adjoints.last().expect("terminal"))? * m as f64;
            norm_noise += mean_norm(&lean.adjoints[0])? * m as f64;
            chunks.push(Chunk {
                prompts,
                latents: traj.latents,
                adjoints: lean.adjoints,
                base_means: lean.base_means,
                stds: traj.stds,
                rewards,
                cond: traj.cond,
            });
        }
        let rewards: Vec<f64> = chunks.iter().flat_map(|c| c.rewards.clone()).collect();
        let mut queue = Vec::new();
        for pass in 0..self.cfg.buffer_passes {
            let mut idx: Vec<usize> = (0..chunks.len()).collect();
            if pass > 0 {
                self.select_rng.shuffle(&mut idx);
            }
            queue.extend(idx);
        }
        self.round = Some(Round { chunks, queue });
        self.rounds += 1;
        let nn = n as f64;
        Ok(vec![
            ("round_reward", rewards.iter().sum::<f64>() / nn),
            ("adjoint_norm_image", norm_image / nn),
            ("adjoint_norm_noise", norm_noise / nn),
            ("rounds", self.rounds as f64),
            ("sample_s", t0.elapsed().as_secs_f64() - adjoint_s),
            ("adjoint_s", adjoint_s),
        ])
    }

    /// The trained steps of a micro-batch: `early_steps` of the noisy part and `late_steps` (0 = all) of the
    /// late part, sorted.
    fn draw_steps(&mut self) -> Vec<usize> {
        let (mut early, mut late) = split_steps(self.rule.timesteps.len(), self.cfg.late_fraction);
        self.select_rng.shuffle(&mut early);
        early.truncate(self.cfg.early_steps);
        if self.cfg.late_steps > 0 {
            self.select_rng.shuffle(&mut late);
            late.truncate(self.cfg.late_steps);
        }
        let mut s: Vec<usize> = early.into_iter().chain(late).collect();
        s.sort_unstable();
        s
    }

    /// The mask of the kept terms (`[N]` f32) for their values `terms`, updating the EMA threshold.
    fn keep_mask(&mut self, terms: &[f64]) -> (Vec<f32>, f64) {
        let lambda2 = self.cfg.reward_scale * self.cfg.reward_scale;
        match self.cfg.clip {
            LossClip::None => (vec![1.0; terms.len()], f64::INFINITY),
            LossClip::Fixed => {
                let lct = self.cfg.clip_value * lambda2;
                (
                    terms.iter().map(|&l| (l <= lct) as u8 as f32).collect(),
                    lct.sqrt(),
                )
            }
            LossClip::Quantile => {
                let roots: Vec<f64> = terms.iter().map(|l| l.sqrt()).collect();
                let q = quantile(&roots, self.cfg.clip_quantile);
                let thr = match self.threshold {
                    Some(t) => self.cfg.clip_ema * t + (1.0 - self.cfg.clip_ema) * q,
                    None => q,
                };
                self.threshold = Some(thr);
                (
                    roots.iter().map(|&r| (r <= thr) as u8 as f32).collect(),
                    thr,
                )
            }
        }
    }
}

/// Mean over rows of the per-row L2 norm of `t` (`[B, …]`).
fn mean_norm(t: &Tensor) -> Result<f64> {
    let b = t.dim(0)?;
    Ok(t.reshape((b, ()))?
        .sqr()?
        .sum(1)?
        .sqrt()?
        .to_dtype(DType::F64)?
        .mean_all()?
        .to_scalar::<f64>()?)
}

fn host_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1()?)
}

impl Method for AdjointMethod {
    fn name(&self) -> &str {
        "adjoint"
    }

    fn unit(&self) -> &str {
        "trajectories"
    }

    fn headline_metric(&self) -> Option<&'static str> {
        Some("reward")
    }

    fn on_start(&mut self, ctx: StartContext<'_>) -> Result<()> {
        ctx.progress.println(format!(
            "adjoint: λ = {}, {} steps a trajectory, {} training prompts, reward {}",
            self.cfg.reward_scale,
            self.rule.timesteps.len(),
            self.prompts.len(),
            self.reward.name()
        ));
        Ok(())
    }

    fn before_step(&mut self, ctx: &StepContext<'_>) -> Result<Vec<(&'static str, f64)>> {
        match &self.round {
            Some(r) if r.queue.len() >= ctx.grad_accum => Ok(Vec::new()),
            _ => self.new_round(ctx.policy, ctx.batch_size * ctx.grad_accum),
        }
    }

    fn micro_step(&mut self, _ctx: &StepContext<'_>) -> Result<MicroStep> {
        let steps = self.draw_steps();
        let round = self.round.as_mut().context("adjoint: no round sampled")?;
        let ci = round.queue.remove(0);
        let chunk = &self.round.as_ref().expect("a round").chunks[ci];
        let b = chunk.prompts.len();
        let n = b * steps.len();
        // All trained steps of the micro-batch in one forward pass: rows (k, sample).
        let cat = |f: &dyn Fn(usize) -> Tensor| -> Result<Tensor> {
            Ok(Tensor::cat(
                &steps.iter().map(|&k| f(k)).collect::<Vec<_>>(),
                0,
            )?)
        };
        let x = cat(&|k| chunk.latents[k].clone())?;
        let base = cat(&|k| chunk.base_means[k].clone())?;
        let std = cat(&|k| chunk.stds[k].clone())?;
        let adj = match self.cfg.pairing {
            Pairing::Current => cat(&|k| chunk.adjoints[k].clone())?,
            Pairing::Next => cat(&|k| chunk.adjoints[k + 1].clone())?,
        };
        let ks: Vec<usize> = steps
            .iter()
            .flat_map(|&k| std::iter::repeat_n(k, b))
            .collect();
        let times: Vec<f32> = ks.iter().map(|&k| self.rule.timesteps[k] as f32).collect();
        let t = Tensor::from_vec(times.clone(), n, x.device())?;
        let (cond, guidance) = self.adjoint_cond(&chunk.cond)?;
        let cond = Conditioning::concat(&vec![&cond; steps.len()])?;
        let eps = guided_output(&self.model.unet, &x, &t, &cond, guidance)?;
        let tr = transition(&self.rule, &eps, &x, &ks, DdimTransition::PrevSample(&x))?;
        let w = (&tr.mean - &base)?.broadcast_div(&std.reshape((n, 1, 1, 1))?)?;
        let terms = matching_terms(&w, &adj, &std)?;
        let values = host_f64(&terms)?;
        let reward = chunk.rewards.iter().sum::<f64>() / b as f64;
        let about = format!(
            "round {}, steps {steps:?} of trajectories of {}",
            self.rounds,
            chunk.prompts.join("; ")
        );
        let (mask, thr) = self.keep_mask(&values);
        let kept = mask.iter().map(|&m| m as f64).sum::<f64>();
        let mask_host = mask.clone();
        let mask = Tensor::from_vec(mask, n, terms.device())?;
        let loss = ((&terms * &mask)?.sum_all()? / n as f64)?;
        // How much of the targets the control explains: 1 − Σℓ / Σ‖s ã‖² over the kept terms (0 for no control).
        let zero = host_f64(&matching_terms(&w.zeros_like()?, &adj, &std)?)?;
        let kept_sum =
            |v: &[f64]| -> f64 { v.iter().zip(&mask_host).map(|(x, &m)| x * m as f64).sum() };
        let explained = 1.0 - kept_sum(&values) / kept_sum(&zero).max(f64::MIN_POSITIVE);
        let mut metrics = vec![
            ("reward", reward),
            ("kept_frac", kept / n as f64),
            ("clip_threshold", thr),
            ("control_norm", mean_norm(&w)?),
            (
                "target_norm",
                zero.iter().map(|z| z.sqrt()).sum::<f64>() / n as f64,
            ),
            ("explained", explained),
        ];
        for (name, lo, hi) in BUCKETS {
            let v: Vec<f64> = values
                .iter()
                .zip(&times)
                .filter(|(_, &t)| (t as f64) >= lo && (t as f64) < hi)
                .map(|(&l, _)| l)
                .collect();
            if !v.is_empty() {
                metrics.push((name, v.iter().sum::<f64>() / v.len() as f64));
            }
        }
        Ok(MicroStep {
            loss,
            metrics,
            units: b,
            about,
        })
    }

    fn after_step(&mut self, _ctx: &StepContext<'_>) -> Result<Vec<(&'static str, f64)>> {
        Ok(vec![("reward_calls", self.reward_calls as f64)])
    }

    fn report(&self) -> serde_json::Value {
        serde_json::json!({
            "training_reward": self.reward.name(),
            "reward_calls": self.reward_calls,
            "rounds": self.rounds,
            "reward_scale": self.cfg.reward_scale,
        })
    }

    fn state(&self) -> Result<serde_json::Value> {
        let (epoch, index) = self.prompts.position();
        Ok(serde_json::to_value(AdjointState {
            noise_rng: self.noise_rng.clone(),
            select_rng: self.select_rng.clone(),
            smooth_rng: self.smooth_rng.clone(),
            prompt_epoch: epoch,
            prompt_index: index,
            rounds: self.rounds,
            reward_calls: self.reward_calls,
            threshold: self.threshold,
            round: self.round.as_ref().map(|r| RoundState {
                side: r.chunks[0].cond.side(),
                chunks: r
                    .chunks
                    .iter()
                    .map(|c| ChunkState {
                        prompts: c.prompts.clone(),
                        rewards: c.rewards.clone(),
                    })
                    .collect(),
                queue: r.queue.clone(),
            }),
        })?)
    }

    fn load_state(&mut self, state: serde_json::Value) -> Result<()> {
        let s: AdjointState = serde_json::from_value(state)?;
        self.noise_rng = s.noise_rng;
        self.select_rng = s.select_rng;
        self.smooth_rng = s.smooth_rng;
        self.prompts.seek(s.prompt_epoch, s.prompt_index);
        self.rounds = s.rounds;
        self.reward_calls = s.reward_calls;
        self.threshold = s.threshold;
        self.round = None;
        self.pending = s.round;
        Ok(())
    }

    fn save_files(&self, dir: &Path) -> Result<()> {
        let Some(r) = &self.round else {
            return Ok(());
        };
        let mut tensors = Vec::new();
        for (i, c) in r.chunks.iter().enumerate() {
            tensors.push((format!("{i}.latents"), Tensor::stack(&c.latents, 0)?));
            tensors.push((format!("{i}.adjoints"), Tensor::stack(&c.adjoints, 0)?));
            tensors.push((format!("{i}.base_means"), Tensor::stack(&c.base_means, 0)?));
            tensors.push((format!("{i}.stds"), Tensor::stack(&c.stds, 0)?));
        }
        crate::io::save_safetensors(&dir.join(ROUND_FILE), &tensors)
    }

    fn load_files(&mut self, dir: &Path) -> Result<()> {
        let Some(rs) = self.pending.take() else {
            return Ok(());
        };
        let path = dir.join(ROUND_FILE);
        let saved = crate::io::SavedTensors::load(
            &path,
            self.model.device(),
            "the Adjoint Matching round",
        )?;
        let get = |k: &str| saved.rows(k);
        let mut chunks = Vec::with_capacity(rs.chunks.len());
        for (i, c) in rs.chunks.into_iter().enumerate() {
            let ps: Vec<&str> = c.prompts.iter().map(|s| s.as_str()).collect();
            let cond = Conditioning::new(&self.model, &ps, self.rule.guidance, rs.side)?;
            let chunk = Chunk {
                latents: get(&format!("{i}.latents"))?,
                adjoints: get(&format!("{i}.adjoints"))?,
                base_means: get(&format!("{i}.base_means"))?,
                stds: get(&format!("{i}.stds"))?,
                prompts: c.prompts,
                rewards: c.rewards,
                cond,
            };
            if chunk.latents.len() != self.rule.timesteps.len() + 1 {
                bail!(
                    "{}: trajectories of {} steps, but [rollout] steps = {}",
                    path.display(),
                    chunk.latents.len().saturating_sub(1),
                    self.rule.timesteps.len()
                );
            }
            chunks.push(chunk);
        }
        self.round = Some(Round {
            chunks,
            queue: rs.queue,
        });
        Ok(())
    }

    fn model(&mut self) -> Option<&mut StableDiffusion> {
        Some(&mut self.model)
    }
}

/// Runs (or resumes) a `train adjoint` run. `stop` (e.g. from Ctrl-C) makes it save a checkpoint and return
/// early.
pub fn train(cfg: &AdjointConfig, stop: Option<StopFlag>) -> Result<TrainSummary> {
    cfg.validate()?;
    let mut inputs = Vec::new();
    if let Some(p) = &cfg.adjoint.prompts {
        inputs.push(crate::output::Input::new("[adjoint] prompts file", p));
    }
    train_method(
        &cfg.run,
        &cfg.output_dir(),
        "train adjoint",
        &inputs,
        serde_json::to_value(cfg)?,
        stop,
        |model, _| AdjointMethod::new(cfg, model),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matching_terms_match_hand_computed_values() {
        let dev = Device::Cpu;
        // Two rows of two elements (shaped [N, 1, 1, 2]).
        let w = Tensor::new(&[1.0f32, -2.0, 0.5, 0.0], &dev)
            .unwrap()
            .reshape((2, 1, 1, 2))
            .unwrap();
        let a = Tensor::new(&[3.0f32, 1.0, -1.0, 4.0], &dev)
            .unwrap()
            .reshape((2, 1, 1, 2))
            .unwrap();
        let s = Tensor::new(&[0.5f32, 2.0], &dev).unwrap();
        let got: Vec<f32> = matching_terms(&w, &a, &s).unwrap().to_vec1().unwrap();
        // Row 0: (1 + 1.5)² + (−2 + 0.5)² = 6.25 + 2.25; row 1: (0.5 − 2)² + (0 + 8)² = 2.25 + 64.
        assert_eq!(got, vec![8.5, 66.25]);
    }

    #[test]
    fn quantile_interpolates_like_torch() {
        let v = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 4.0);
        assert!((quantile(&v, 0.9) - 3.7).abs() < 1e-12);
        assert!((quantile(&v, 0.5) - 2.5).abs() < 1e-12);
        assert_eq!(quantile(&[], 0.9), f64::INFINITY);
    }

    #[test]
    fn steps_split_into_noisy_and_late_parts() {
        assert_eq!(split_steps(10, 0.4), ((0..6).collect(), (6..10).collect()));
        assert_eq!(split_steps(40, 0.25).1.len(), 10);
        assert_eq!(split_steps(3, 0.0), ((0..3).collect(), vec![]));
        assert_eq!(split_steps(3, 1.0), (vec![], (0..3).collect()));
    }
}
