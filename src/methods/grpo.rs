//! `diffpref train grpo`: group-relative policy optimisation on the denoising MDP of Stable Diffusion's
//! stochastic DDIM sampler (Flow-GRPO, Liu et al. 2025, and DanceGRPO, Xue et al. 2025, adapted from flow
//! models' SDE sampling to SD's DDIM with η > 0; the per-step objective is DDPO's, Black et al. 2024).
//!
//! **Rounds.** Each round draws `prompts_per_round` training prompts and samples `group_size` trajectories of
//! each with the current policy (no graph; [`crate::rollout`]: `x_T → … → x_0`, the transitions' log-probs
//! `log π_old(x_{t'} | x_t)` recorded), decodes and scores the images with the training reward `r` (8-bit
//! images, as the judge sees them), and standardises the rewards within each prompt's group:
//!
//! ```text
//! A_i = clip((r_i − mean_g r) / (std_g r + 1e-4), −a, a)        g = the group of sample i's prompt
//! ```
//!
//! (`advantage = "batch"` scales by the round's std instead, `"none"` keeps the centred reward.)
//!
//! **Updates.** Trajectories are sampled in micro-batches of `optim.batch_size` (the prompts' groups shuffled
//! across them), and each micro-batch trains a random subset of `train_timesteps` of its stochastic steps (0 =
//! all; the "fast" variants train few steps per trajectory; `timestep_range` restricts them, e.g. to the
//! high-noise steps); `grad_accum` micro-batches make an optimizer step,
//! and the round is passed over `inner_epochs` times (micro-batches in a new random order each pass). For each
//! trained step the policy's log-probability of the micro-batch's transitions is recomputed with graph by the
//! same code, on the same batch, as it was sampled — so the ratio is exactly 1 for the first update of a round
//! — and
//!
//! ```text
//! ρ = exp(log π_θ(x_{t'} | x_t) − log π_old(x_{t'} | x_t))
//! L = mean over transitions of max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε))  +  β · mean KL
//! KL = mean over C, H, W of (μ_θ − μ_ref)² / (2 σ_t²)                  (the Gaussians' KL, per transition)
//! ```
//!
//! with μ_ref the reference's mean on the same `x_t` (the base model: adapters off, or the frozen copy). Log-
//! probabilities are the mean over latent elements, so ρ moves little per update: ε is small (1e-4 in DDPO and
//! Flow-GRPO; the defaults here are measured on the shapes world).
//!
//! **Variance.** A group's reward differences come from its members' initial noise `x_T` and from every
//! stochastic step, but only the trained steps are credited with them. `shared_noise` gives a group one `x_T`
//! (DanceGRPO), and `[rollout] stochastic_range` keeps the sampler's Gaussian at the trained steps only (the
//! others are deterministic DDIM, MixGRPO's SDE window): the differences then come from the trained actions.
//!
//! **Branched credit** (`credit = "branch"`, after TempFlow-GRPO, He et al. 2025): each group shares its initial
//! noise and follows the deterministic DDIM path (η = 0, the sampler users run) except at one branching step
//! `k`, drawn per micro-batch from the trainable steps, where each member draws its own noise from the η > 0
//! Gaussian. The members' reward differences then come from that one transition, and only it is trained (the
//! loss above with the single step `k`): far less variance per sample, and a quarter of the training compute
//! of four trained steps per trajectory.
//!
//! **Reward vs judge.** The training reward is `[reward]` (any [`crate::scoring::RewardSpec`]: the exact shapes
//! reward, its differentiable surrogate, CLIP score, PickScore, HPSv2, ImageReward, aesthetic, or a weighted
//! mix); the held-out judge is `[eval]` (on the shapes world: the exact reward on held-out prompts). Both are
//! reported; a training reward that rises while the judge does not is reward hacking.

use crate::data::prompt_cycle::PromptCycle;
use crate::engine::config::RunConfig;
use crate::engine::method::{Method, MicroStep, StartContext, StepContext};
use crate::engine::policy::{Policy, Weights};
use crate::engine::run::{train_method, TrainSummary};
use crate::eval::read_prompts;
use crate::rollout::{self, Conditioning, RolloutConfig, Selection, StepRule, Trajectory};
use crate::scoring::{score_saved_images, RewardSpec};
use crate::train::checkpoint::StopFlag;
use crate::train::rng::Rng;
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor};
use diffpref_pipelines::loading::StableDiffusion;
use diffpref_rewards::Reward;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How rewards become advantages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageNorm {
    /// `(r − mean_g) / (std_g + 1e-4)` within each prompt's group (GRPO). Default.
    #[default]
    Group,
    /// `(r − mean_g) / (std_round + 1e-4)`: group-centred, scaled by the round's std (Dr. GRPO-style: no
    /// up-weighting of prompts whose samples barely differ).
    Batch,
    /// `r − mean_g` (no scaling).
    None,
}

/// Which transitions a group's reward differences are credited to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Credit {
    /// Whole stochastic trajectories; the advantage trains `train_timesteps` random steps of each (Flow-GRPO,
    /// DanceGRPO). Default.
    #[default]
    Trajectory,
    /// Branched groups: a group shares its initial noise and the deterministic DDIM path except at one
    /// branching step (drawn per micro-batch from the trainable steps), where each member draws its own noise;
    /// that step alone is trained (TempFlow-GRPO's trajectory branching: the reward differences come from one
    /// transition, and the rest of the path is the deterministic sampler users run).
    Branch,
}

/// `[grpo]`: the method's settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoSection {
    /// Training prompts, one per line. Required.
    pub prompts: Option<PathBuf>,
    /// Prompts per sampling round. Default 4.
    pub prompts_per_round: usize,
    /// Samples per prompt (the group). Default 8.
    pub group_size: usize,
    /// group | batch | none (see the module docs). Default group.
    pub advantage: AdvantageNorm,
    /// Advantages are clipped to [−a, a]. Default 5.
    pub adv_clip: f64,
    /// PPO clip range ε of the ratio. Default 1e-4.
    pub clip_range: f64,
    /// Weight β of the KL to the reference (0 = none, no reference forward). Default 0.
    pub kl_beta: f64,
    /// Steps trained per micro-batch, a random subset of its stochastic steps (0 = all). Default 0.
    pub train_timesteps: usize,
    /// Only steps whose timestep lies in `[lo, hi)` are trained (e.g. the high-noise steps, where composition
    /// is decided). Default: every step.
    pub timestep_range: Option<[u64; 2]>,
    /// Passes over each round's trajectories. Default 1.
    pub inner_epochs: usize,
    /// trajectory | branch (see [`Credit`]). Default trajectory.
    pub credit: Credit,
    /// The members of a group start from one initial noise `x_T` (DanceGRPO): their reward differences then
    /// come from the sampler's stochastic steps, the actions that are trained, not from `x_T`. Default false.
    pub shared_noise: bool,
}

impl Default for GrpoSection {
    fn default() -> Self {
        GrpoSection {
            prompts: None,
            prompts_per_round: 4,
            group_size: 8,
            advantage: AdvantageNorm::Group,
            adv_clip: 5.0,
            clip_range: 1e-4,
            kl_beta: 0.0,
            train_timesteps: 0,
            timestep_range: None,
            inner_epochs: 1,
            credit: Credit::Trajectory,
            shared_noise: false,
        }
    }
}

/// A whole `diffpref train grpo` run: the shared run settings ([`RunConfig`]), `[grpo]`, `[rollout]` (the
/// sampler of the trajectories) and `[reward]` (the training reward). See `examples/grpo.toml`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GrpoConfig {
    #[serde(flatten)]
    pub run: RunConfig,
    pub grpo: GrpoSection,
    pub rollout: RolloutConfig,
    pub reward: RewardSpec,
}

impl GrpoConfig {
    /// Reads a TOML config (or the defaults) and applies `--set key=value` overrides; unknown keys are errors
    /// naming the key.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<GrpoConfig> {
        crate::config::load_toml(path, overrides)
    }

    /// Parses a TOML configuration (`what` names it in errors) and applies `--set` overrides.
    pub fn from_toml(text: &str, what: &str, overrides: &[String]) -> Result<GrpoConfig> {
        crate::config::from_toml(text, what, overrides)
    }

    /// The run folder (`output_dir`, default `runs/grpo`).
    pub fn output_dir(&self) -> PathBuf {
        self.run.output_dir("grpo")
    }

    /// Trajectories per round.
    pub fn round_size(&self) -> usize {
        self.grpo.prompts_per_round * self.grpo.group_size
    }

    /// Optimizer steps per round.
    pub fn steps_per_round(&self) -> usize {
        self.round_size() * self.grpo.inner_epochs
            / (self.run.optim.batch_size * self.run.optim.grad_accum)
    }

    pub fn validate(&self) -> Result<()> {
        self.run.validate()?;
        let g = &self.grpo;
        ensure!(
            g.prompts.is_some(),
            "[grpo] prompts (the training prompts, one per line) is required"
        );
        ensure!(
            g.prompts_per_round >= 1,
            "[grpo] prompts_per_round must be at least 1"
        );
        ensure!(
            g.prompts_per_round.saturating_mul(g.group_size) <= crate::engine::config::MAX_BATCH,
            "[grpo] prompts_per_round x group_size = {} x {}: at most {} trajectories a round",
            g.prompts_per_round,
            g.group_size,
            crate::engine::config::MAX_BATCH
        );
        ensure!(
            g.group_size >= 2,
            "[grpo] group_size must be at least 2 (advantages are relative to the group)"
        );
        ensure!(
            g.adv_clip.is_finite() && g.adv_clip > 0.0,
            "[grpo] adv_clip must be positive (got {})",
            g.adv_clip
        );
        ensure!(
            g.clip_range.is_finite() && g.clip_range > 0.0,
            "[grpo] clip_range must be positive (got {})",
            g.clip_range
        );
        ensure!(
            g.kl_beta.is_finite() && g.kl_beta >= 0.0,
            "[grpo] kl_beta must be >= 0 (got {})",
            g.kl_beta
        );
        ensure!(
            g.inner_epochs >= 1,
            "[grpo] inner_epochs must be at least 1"
        );
        let per_step = self.run.optim.batch_size * self.run.optim.grad_accum;
        ensure!(
            self.round_size().is_multiple_of(per_step),
            "[grpo] a round's {} trajectories (prompts_per_round x group_size) must split into optimizer steps of \
             optim.batch_size x optim.grad_accum = {per_step}",
            self.round_size()
        );
        self.rollout.validate("[rollout]")?;
        ensure!(
            g.train_timesteps <= self.rollout.steps,
            "[grpo] train_timesteps {} exceeds [rollout] steps {}",
            g.train_timesteps,
            self.rollout.steps
        );
        if g.credit == Credit::Branch {
            ensure!(
                self.run.optim.batch_size.is_multiple_of(g.group_size),
                "[grpo] credit = \"branch\" samples whole groups per micro-batch: optim.batch_size {} must be a \
                 multiple of group_size {}",
                self.run.optim.batch_size,
                g.group_size
            );
        }
        if let Some([lo, hi]) = g.timestep_range {
            ensure!(
                lo < hi,
                "[grpo] timestep_range = [{lo}, {hi}] must have lo < hi"
            );
        }
        self.reward.validate("[reward]")
    }
}

/// `A_i` of the module docs for rewards `r` in groups of `g` consecutive samples.
pub fn advantages(r: &[f64], g: usize, norm: AdvantageNorm, clip: f64) -> Vec<f64> {
    let (_, round_std) = mean_std(r);
    r.chunks(g)
        .flat_map(|grp| {
            let (m, s) = mean_std(grp);
            grp.iter()
                .map(move |x| {
                    let a = match norm {
                        AdvantageNorm::Group => (x - m) / (s + 1e-4),
                        AdvantageNorm::Batch => (x - m) / (round_std + 1e-4),
                        AdvantageNorm::None => x - m,
                    };
                    a.clamp(-clip, clip)
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Mean and population standard deviation of `v` (0, 0 when empty).
fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n;
    (m, var.sqrt())
}

/// A micro-batch of a round: trajectories sampled together (and recomputed together), their rewards and
/// advantages, and the steps it trains.
struct Chunk {
    traj: Trajectory,
    rewards: Vec<f64>,
    advantages: Vec<f64>,
    steps: Vec<usize>,
}

/// One sampling round: its micro-batches and the ones still to train (indices, next first).
struct Round {
    chunks: Vec<Chunk>,
    queue: Vec<usize>,
}

/// What a checkpoint restores besides the round's tensors.
#[derive(Serialize, Deserialize)]
struct GrpoState {
    noise_rng: Rng,
    select_rng: Rng,
    prompt_epoch: u64,
    prompt_index: usize,
    rounds: u64,
    reward_calls: u64,
    round: Option<RoundState>,
}

#[derive(Serialize, Deserialize)]
struct ChunkState {
    prompts: Vec<String>,
    rewards: Vec<f64>,
    advantages: Vec<f64>,
    steps: Vec<usize>,
}

#[derive(Serialize, Deserialize)]
struct RoundState {
    side: usize,
    timesteps: Vec<f64>,
    chunks: Vec<ChunkState>,
    queue: Vec<usize>,
}

const ROUND_FILE: &str = "grpo_round.safetensors";

/// GRPO as a [`Method`].
pub struct GrpoMethod {
    model: StableDiffusion,
    cfg: GrpoSection,
    rollout_cfg: RolloutConfig,
    rule: StepRule,
    reward: Box<dyn Reward>,
    reward_batch: usize,
    prompts: PromptCycle,
    batch_size: usize,
    noise_rng: Rng,
    select_rng: Rng,
    rounds: u64,
    reward_calls: u64,
    round: Option<Round>,
    /// A round restored from a checkpoint's `state.json`, waiting for its tensors ([`Method::load_files`]).
    pending: Option<RoundState>,
}

impl GrpoMethod {
    pub fn new(cfg: &GrpoConfig, model: StableDiffusion) -> Result<GrpoMethod> {
        let device = model.device().clone();
        let prompts_file = cfg.grpo.prompts.as_ref().context("[grpo] prompts")?;
        let prompts =
            read_prompts(prompts_file, cfg.reward.is_shapes()).context("[grpo] prompts")?;
        let reward = cfg.reward.load("[reward]", &device)?;
        let rule = StepRule::new(&model, &cfg.rollout)?;
        let m = GrpoMethod {
            rule,
            reward,
            reward_batch: cfg.reward.batch_size,
            prompts: PromptCycle::new(prompts, cfg.run.seed, "grpo"),
            cfg: cfg.grpo.clone(),
            rollout_cfg: cfg.rollout.clone(),
            batch_size: cfg.run.optim.batch_size,
            noise_rng: Rng::derive(cfg.run.seed, "grpo-noise"),
            select_rng: Rng::derive(cfg.run.seed, "grpo-select"),
            rounds: 0,
            reward_calls: 0,
            round: None,
            pending: None,
            model,
        };
        Ok(m)
    }

    /// Scores images `[B, 3, H, W]` in [0, 1] as 8-bit images (what a user saves and the judge scores).
    fn score(&mut self, images: &Tensor, prompts: &[String]) -> Result<Vec<f64>> {
        let p: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
        let s = score_saved_images(self.reward.as_ref(), images, &p, self.reward_batch)
            .context("the training reward")?;
        self.reward_calls += prompts.len() as u64;
        Ok(s)
    }

    /// Samples and scores a new round with the current policy; returns its figures.
    fn new_round(&mut self, policy: &Policy) -> Result<Vec<(&'static str, f64)>> {
        let t0 = Instant::now();
        let g = self.cfg.group_size;
        let mut prompts = Vec::with_capacity(self.cfg.prompts_per_round * g);
        for _ in 0..self.cfg.prompts_per_round {
            let p = self.prompts.next_prompt();
            prompts.extend(std::iter::repeat_n(p, g));
        }
        // The steps that may be trained.
        let candidates: Vec<usize> = self
            .rule
            .stochastic_steps()
            .into_iter()
            .filter(|&k| {
                let t = self.rule.timesteps[k];
                self.cfg
                    .timestep_range
                    .is_none_or(|[lo, hi]| t >= lo as f64 && t < hi as f64)
            })
            .collect();
        ensure!(
            !candidates.is_empty(),
            "[grpo] timestep_range {:?} holds none of the sampler's timesteps {:?}",
            self.cfg.timestep_range,
            self.rule.timesteps
        );
        // Micro-batches: rows spread in a random order (rewards are standardised by group first); whole groups
        // when branching.
        let branch = self.cfg.credit == Credit::Branch;
        let mut order: Vec<usize> = if branch {
            let mut groups: Vec<usize> = (0..self.cfg.prompts_per_round).collect();
            self.select_rng.shuffle(&mut groups);
            groups.iter().flat_map(|&q| q * g..(q + 1) * g).collect()
        } else {
            (0..prompts.len()).collect()
        };
        if !branch {
            self.select_rng.shuffle(&mut order);
        }
        let k = match self.cfg.train_timesteps {
            0 => candidates.len(),
            k => k.min(candidates.len()),
        };
        // One initial noise per group when the group shares it (branched groups always do).
        let group_noise = if self.cfg.shared_noise && !branch {
            let shape = rollout::initial_noise_shape(
                &self.model,
                self.cfg.prompts_per_round,
                self.rollout_cfg.resolution,
            )?;
            Some(self.noise_rng.normal_tensor(&shape, self.model.device())?)
        } else {
            None
        };
        let mut parts = Vec::new();
        for rows in order.chunks(self.batch_size) {
            let ps: Vec<&str> = rows.iter().map(|&i| prompts[i].as_str()).collect();
            let steps = if branch {
                vec![candidates[self.select_rng.below(candidates.len() as u64) as usize]]
            } else {
                let mut s = candidates.clone();
                self.select_rng.shuffle(&mut s);
                s.truncate(k);
                s.sort_unstable();
                s
            };
            let (rule, res, rng) = (&self.rule, self.rollout_cfg.resolution, &mut self.noise_rng);
            let traj = policy.with_weights(&mut self.model, Weights::Current, |m| {
                if branch {
                    rollout::sample_branched(m, rule, &ps, g, steps[0], res, rng)
                } else if let Some(noise) = &group_noise {
                    let idx: Vec<u32> = rows.iter().map(|&i| (i / g) as u32).collect();
                    let idx = Tensor::from_vec(idx, rows.len(), noise.device())?;
                    rollout::sample_from(m, rule, &ps, noise.index_select(&idx, 0)?, rng)
                } else {
                    rollout::sample(m, rule, &ps, res, rng)
                }
            })?;
            parts.push((rows.to_vec(), traj, steps));
        }
        let sample_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut rewards = vec![0.0; prompts.len()];
        for (rows, traj, _) in &parts {
            let r = self.score(&traj.images, &traj.prompts)?;
            for (&i, v) in rows.iter().zip(r) {
                rewards[i] = v;
            }
        }
        let score_s = t1.elapsed().as_secs_f64();
        let adv = advantages(&rewards, g, self.cfg.advantage, self.cfg.adv_clip);
        let group_std = rewards.chunks(g).map(|grp| mean_std(grp).1).sum::<f64>()
            / self.cfg.prompts_per_round as f64;
        let chunks: Vec<Chunk> = parts
            .into_iter()
            .map(|(rows, traj, steps)| Chunk {
                rewards: rows.iter().map(|&i| rewards[i]).collect(),
                advantages: rows.iter().map(|&i| adv[i]).collect(),
                steps,
                traj,
            })
            .collect();
        let mut queue = Vec::new();
        for epoch in 0..self.cfg.inner_epochs {
            let mut idx: Vec<usize> = (0..chunks.len()).collect();
            if epoch > 0 {
                self.select_rng.shuffle(&mut idx);
            }
            queue.extend(idx);
        }
        let (mean, std) = mean_std(&rewards);
        self.round = Some(Round { chunks, queue });
        self.rounds += 1;
        Ok(vec![
            ("round_reward", mean),
            ("round_reward_std", std),
            ("group_reward_std", group_std),
            ("rounds", self.rounds as f64),
            ("sample_s", sample_s),
            ("score_s", score_s),
        ])
    }
}

/// The clipped policy-gradient objective of the module docs, `mean max(−A ρ, −A clip(ρ, 1−ε, 1+ε))` with
/// `ρ = exp(new − old)` (`[N]` each, f32; `old` detached), and its figures: mean |A|, mean ρ, the fraction of
/// transitions with |ρ − 1| > ε, and `approx_kl = mean ½ (log ρ)²` (DDPO's).
pub fn clipped_objective(
    new: &Tensor,
    old: &Tensor,
    adv: &Tensor,
    eps: f64,
) -> Result<(Tensor, Vec<(&'static str, f64)>)> {
    let log_ratio = (new - old.detach())?;
    let ratio = log_ratio.exp()?;
    let unclipped = (adv.neg()? * &ratio)?;
    let clipped = (adv.neg()? * ratio.clamp(1.0 - eps, 1.0 + eps)?)?;
    let loss = unclipped.maximum(&clipped)?.mean_all()?;
    let stats = vec![
        ("adv_abs", mean_of(&adv.abs()?)?),
        ("ratio", mean_of(&ratio)?),
        (
            "clip_frac",
            mean_of(&(&ratio - 1.0)?.abs()?.gt(eps)?.to_dtype(DType::F32)?)?,
        ),
        ("approx_kl", mean_of(&(log_ratio.sqr()? * 0.5)?)?),
        // > 0 when earlier updates of the round raised the log-probability of the better-than-average samples.
        ("adv_log_ratio", mean_of(&(adv * &log_ratio)?)?),
    ];
    Ok((loss, stats))
}

/// The KL of two Gaussian transitions with the same std, per row: `mean over C, H, W of (μ_a − μ_b)² / (2σ²)`
/// (`[N, …]` means, `[N]` stds) → `[N]`.
pub fn gaussian_kl(mean_a: &Tensor, mean_b: &Tensor, std: &Tensor) -> Result<Tensor> {
    let n = mean_a.dim(0)?;
    let d2 = (mean_a - mean_b)?.sqr()?.reshape((n, ()))?.mean(1)?;
    Ok((d2 / (std.sqr()? * 2.0)?)?)
}

/// `mean(x)` of a tensor as f64.
fn mean_of(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?)
}

impl Method for GrpoMethod {
    fn name(&self) -> &str {
        "grpo"
    }

    fn unit(&self) -> &str {
        "trajectories"
    }

    fn headline_metric(&self) -> Option<&'static str> {
        Some("reward")
    }

    fn on_start(&mut self, ctx: StartContext<'_>) -> Result<()> {
        ctx.progress.println(format!(
            "grpo: {} prompts x {} samples per round, {} training prompts, reward {}",
            self.cfg.prompts_per_round,
            self.cfg.group_size,
            self.prompts.len(),
            self.reward.name()
        ));
        Ok(())
    }

    fn before_step(&mut self, ctx: &StepContext<'_>) -> Result<Vec<(&'static str, f64)>> {
        let need = ctx.grad_accum;
        match &self.round {
            Some(r) if r.queue.len() >= need => Ok(Vec::new()),
            _ => self.new_round(ctx.policy),
        }
    }

    fn micro_step(&mut self, ctx: &StepContext<'_>) -> Result<MicroStep> {
        let round = self.round.as_mut().context("grpo: no round sampled")?;
        let chunk = &round.chunks[round.queue.remove(0)];
        let model = &self.model;
        let b = chunk.traj.len();
        let reference = if self.cfg.kl_beta > 0.0 {
            Some(
                ctx.policy
                    .reference()
                    .context("[grpo] kl_beta > 0 needs a reference model")?,
            )
        } else {
            None
        };
        // One recomputation per trained step over the whole micro-batch: the layout it was sampled in.
        let (mut new, mut old, mut kls) = (Vec::new(), Vec::new(), Vec::new());
        for &k in &chunk.steps {
            let sel = Selection::step(b, k);
            let tr = rollout::recompute(&model.unet, model, &self.rule, &chunk.traj, &sel)?;
            if let Some(r) = &reference {
                let scope = r.scope(&model.unet);
                let rt = rollout::recompute(scope.unet(), model, &self.rule, &chunk.traj, &sel)?;
                drop(scope);
                kls.push(gaussian_kl(
                    &tr.mean,
                    &rt.mean.detach(),
                    &chunk.traj.stds[k],
                )?);
            }
            new.push(tr.log_prob);
            old.push(chunk.traj.log_probs[k].clone());
        }
        let new = Tensor::cat(&new, 0)?;
        let old = Tensor::cat(&old, 0)?;
        let adv: Vec<f32> = chunk
            .steps
            .iter()
            .flat_map(|_| chunk.advantages.iter().map(|&a| a as f32))
            .collect();
        let adv = Tensor::from_vec(adv, new.dim(0)?, new.device())?;
        let (pg, ratio_stats) = clipped_objective(&new, &old, &adv, self.cfg.clip_range)?;
        let mut metrics = vec![("reward", chunk.rewards.iter().sum::<f64>() / b as f64)];
        metrics.extend(ratio_stats);
        let loss = if kls.is_empty() {
            pg
        } else {
            let kl = Tensor::cat(&kls, 0)?.mean_all()?;
            metrics.push(("kl", mean_of(&kl)?));
            (pg + (kl * self.cfg.kl_beta)?)?
        };
        Ok(MicroStep {
            loss,
            metrics,
            units: b,
            about: format!(
                "round {}, trajectories of {}",
                self.rounds,
                chunk.traj.prompts.join("; ")
            ),
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
        })
    }

    fn state(&self) -> Result<serde_json::Value> {
        Ok(serde_json::to_value(GrpoState {
            noise_rng: self.noise_rng.clone(),
            select_rng: self.select_rng.clone(),
            prompt_epoch: self.prompts.position().0,
            prompt_index: self.prompts.position().1,
            rounds: self.rounds,
            reward_calls: self.reward_calls,
            round: self.round.as_ref().map(|r| RoundState {
                side: r.chunks[0].traj.side,
                timesteps: r.chunks[0].traj.timesteps.clone(),
                chunks: r
                    .chunks
                    .iter()
                    .map(|c| ChunkState {
                        prompts: c.traj.prompts.clone(),
                        rewards: c.rewards.clone(),
                        advantages: c.advantages.clone(),
                        steps: c.steps.clone(),
                    })
                    .collect(),
                queue: r.queue.clone(),
            }),
        })?)
    }

    fn load_state(&mut self, state: serde_json::Value) -> Result<()> {
        let s: GrpoState = serde_json::from_value(state)?;
        self.noise_rng = s.noise_rng;
        self.select_rng = s.select_rng;
        self.prompts.seek(s.prompt_epoch, s.prompt_index);
        self.rounds = s.rounds;
        self.reward_calls = s.reward_calls;
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
            let t = &c.traj;
            tensors.push((format!("{i}.latents"), Tensor::stack(&t.latents, 0)?));
            tensors.push((format!("{i}.log_probs"), Tensor::stack(&t.log_probs, 0)?));
            tensors.push((format!("{i}.stds"), Tensor::stack(&t.stds, 0)?));
        }
        crate::io::save_safetensors(&dir.join(ROUND_FILE), &tensors)
    }

    fn load_files(&mut self, dir: &Path) -> Result<()> {
        let Some(rs) = self.pending.take() else {
            return Ok(());
        };
        let path = dir.join(ROUND_FILE);
        let saved = crate::io::SavedTensors::load(&path, self.model.device(), "the GRPO round")?;
        let get = |k: &str| saved.rows(k);
        let mut chunks = Vec::with_capacity(rs.chunks.len());
        for (i, c) in rs.chunks.into_iter().enumerate() {
            // The sampler's conditioning, re-encoded in the batch it was sampled in (the same values).
            let ps: Vec<&str> = c.prompts.iter().map(|s| s.as_str()).collect();
            let cond = Conditioning::new(&self.model, &ps, self.rule.guidance, rs.side)?;
            let traj = Trajectory {
                prompts: c.prompts,
                side: rs.side,
                timesteps: rs.timesteps.clone(),
                latents: get(&format!("{i}.latents"))?,
                log_probs: get(&format!("{i}.log_probs"))?,
                stds: get(&format!("{i}.stds"))?,
                means: Vec::new(),
                pred_x0: Vec::new(),
                images: Tensor::zeros(1, DType::F32, self.model.device())?,
                cond,
            };
            chunks.push(Chunk {
                traj,
                rewards: c.rewards,
                advantages: c.advantages,
                steps: c.steps,
            });
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

/// Runs (or resumes) a `train grpo` run. `stop` (e.g. from Ctrl-C) makes it save a checkpoint and return early.
pub fn train(cfg: &GrpoConfig, stop: Option<StopFlag>) -> Result<TrainSummary> {
    cfg.validate()?;
    let mut inputs = Vec::new();
    if let Some(p) = &cfg.grpo.prompts {
        inputs.push(crate::output::Input::new("[grpo] prompts file", p));
    }
    train_method(
        &cfg.run,
        &cfg.output_dir(),
        "train grpo",
        &inputs,
        serde_json::to_value(cfg)?,
        stop,
        |model, _| GrpoMethod::new(cfg, model),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_are_standardised_within_groups_and_clipped() {
        // Two groups of three.
        let r = [0.1, 0.2, 0.3, 0.5, 0.5, 0.5];
        let a = advantages(&r, 3, AdvantageNorm::Group, 5.0);
        let s = (2.0f64 / 3.0).sqrt() * 0.1; // population std of 0.1, 0.2, 0.3
        for (got, want) in a
            .iter()
            .zip([-0.1 / (s + 1e-4), 0.0, 0.1 / (s + 1e-4), 0.0, 0.0, 0.0])
        {
            assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        }
        assert!(advantages(&r, 3, AdvantageNorm::Group, 1.0)
            .iter()
            .all(|x| x.abs() <= 1.0));
        // Batch: centred by the group, scaled by the whole round's std.
        let m = r.iter().sum::<f64>() / 6.0;
        let sd = (r.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / 6.0).sqrt();
        let b = advantages(&r, 3, AdvantageNorm::Batch, 5.0);
        assert!((b[0] + 0.1 / (sd + 1e-4)).abs() < 1e-9);
        assert!((advantages(&r, 3, AdvantageNorm::None, 5.0)[2] - 0.1).abs() < 1e-12);
    }

    #[test]
    fn clipped_objective_matches_hand_computed_values() {
        let d = &candle_core::Device::Cpu;
        let old = Tensor::new(&[0.0f32, 0.0, 0.0, 0.0], d).unwrap();
        // log-ratios 0.3, -0.3, 0.05, 0; ε = 0.1.
        let new = Tensor::new(&[0.3f32, -0.3, 0.05, 0.0], d).unwrap();
        let adv = Tensor::new(&[1.0f32, 1.0, -2.0, 3.0], d).unwrap();
        let (loss, stats) = clipped_objective(&new, &old, &adv, 0.1).unwrap();
        let r = [0.3f64.exp(), (-0.3f64).exp(), 0.05f64.exp(), 1.0];
        // Row 0: A > 0, ρ > 1 + ε: the clipped term −1.1 is the max. Row 1: A > 0, ρ < 1 − ε: −ρ. Row 2: A < 0,
        // ρ inside: 2ρ. Row 3: −3.
        let want = (-1.1 - r[1] + 2.0 * r[2] - 3.0) / 4.0;
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        let get = |k: &str| stats.iter().find(|(n, _)| *n == k).unwrap().1;
        assert!((get("clip_frac") - 0.5).abs() < 1e-9);
        assert!((get("adv_abs") - 1.75).abs() < 1e-6);
        // The gradient: only unclipped rows pass it, −A ρ ∂ log ρ.
        let v = candle_core::Var::from_tensor(&new).unwrap();
        let (l, _) = clipped_objective(v.as_tensor(), &old, &adv, 0.1).unwrap();
        let g = l
            .backward()
            .unwrap()
            .get(v.as_tensor())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want_g = [0.0, -r[1] / 4.0, 2.0 * r[2] / 4.0, -3.0 / 4.0];
        for (a, b) in g.iter().zip(want_g) {
            assert!((*a as f64 - b).abs() < 1e-6, "{g:?}");
        }
    }

    #[test]
    fn gaussian_kl_per_row() {
        let d = &candle_core::Device::Cpu;
        let a = Tensor::new(&[[1.0f32, 2.0], [0.0, 0.0]], d).unwrap();
        let b = Tensor::new(&[[0.0f32, 0.0], [0.5, -0.5]], d).unwrap();
        let std = Tensor::new(&[2.0f32, 0.5], d).unwrap();
        let kl = gaussian_kl(&a, &b, &std).unwrap().to_vec1::<f32>().unwrap();
        // Row 0: mean(1, 4) / (2·4) = 2.5 / 8; row 1: mean(0.25, 0.25) / (2·0.25) = 0.5.
        assert!(
            (kl[0] - 2.5 / 8.0).abs() < 1e-7 && (kl[1] - 0.5).abs() < 1e-7,
            "{kl:?}"
        );
    }
}
