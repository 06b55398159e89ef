//! `diffpref train lpo`: Latent Preference Optimization (Zhang et al., "Diffusion Model as a Noise-Aware Latent
//! Reward Model for Step-Level Preference Optimization", NeurIPS 2025, §3.2–3.4; code `Kwai-Kolors/LPO`), the
//! step-level preference optimisation of SPO (Liang et al. 2025) with a latent reward model
//! ([`diffpref_rewards::lrm`]) as the step scorer.
//!
//! **Sampling** (per round of `prompts_per_round` prompts; no graph, the policy's current weights):
//!
//! ```text
//! x ~ N(0, I)
//! for each step k (timestep t → t'):
//!     K children of the same parent: x'_j = μ_θ(x, t) + σ_t z_j        (the sampler's η > 0 step, CFG w)
//!     s_j = LRM(x'_j, prompt, t)                                           (the parent's t: the code's convention)
//!     w = argmax s, l = argmin s;  p_w − p_l = tanh((s_w − s_l)/2)        (softmax over the two)
//!     keep (x, x'_w, x'_l, k) when p_w − p_l > th(σ_t) and t lies in `timestep_range`
//!     x ← x'_j, j uniform (`continuation = "random"`, the paper) or the best (`"best"`)
//! th(σ) = th_min + (σ − σ_min)/(σ_max − σ_min) · (th_max − th_min)     σ over the sampler's stochastic steps
//! ```
//!
//! **Loss** (per kept tuple; the winner and loser share the parent, so one guided forward of the policy (with
//! graph) and one of the frozen reference give both log-probabilities):
//!
//! ```text
//! lp(x'|x)  = mean over C·H·W of log N(x'; μ(x, t), σ_t²)
//! r_w = clip(exp(lp_θ(x'_w|x) − lp_ref(x'_w|x)), 1 − ε, 1 + ε),   r_l likewise
//! L   = −log σ(β · (log r_w − log r_l))                      β = 500, ε = 0.1 (SD1.5)
//! ```
//!
//! The kept tuples of a round are shuffled into a queue; each optimizer step trains `batch_size × grad_accum`
//! of them, and a new round is sampled whenever the queue runs short (the last tuples of a round train with the
//! next round's first). The reference is the base model (adapters off, or the frozen copy).
//!
//! **Scorers.** `scorer = "lrm"` is LPO; `scorer = "reward"` scores each child's decoded prediction x̂₀ (one more
//! guided policy forward at the child's timestep, whose ε̂ the continuing child reuses at the next step) with any
//! `[reward]` — SPO's step scoring with an image reward, e.g. the shapes world's exact reward as an oracle that
//! tells the scorer's quality from the optimiser's. `score_scale` multiplies the scores before `p_w − p_l` (a
//! reward's gaps are in its own units). The loop itself is [`StepLevelMethod`]; `train spo`
//! ([`crate::methods::spo`]) runs it with the step-aware preference model as the scorer.
//!
//! The training reward is the step scorer; the held-out judge is `[eval]` (on the shapes world: the exact
//! reward on held-out prompts), as for every method.

use crate::data::prompt_cycle::PromptCycle;
use crate::engine::config::RunConfig;
use crate::engine::method::{Method, MicroStep, StartContext, StepContext};
use crate::engine::policy::{Policy, Weights};
use crate::engine::run::{train_method, TrainSummary};
use crate::eval::read_prompts;
use crate::rollout::branch::branch_from_output;
use crate::rollout::{self, guided_output, transition, Conditioning, RolloutConfig, StepRule};
use crate::train::checkpoint::StopFlag;
use crate::train::rng::Rng;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use diffpref_pipelines::loading::StableDiffusion;
use diffpref_pipelines::schedulers::DdimTransition;
use diffpref_rewards::lrm::LatentRewardModel;
use diffpref_rewards::spm::StepAwarePreferenceModel;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Which child sampling continues from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Continuation {
    /// A child drawn uniformly (the paper and SPO): the trajectory stays on-policy.
    #[default]
    Random,
    /// The best-scored child (greedy).
    Best,
}

/// The timestep the LRM scores a child at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScoreAt {
    /// The parent's timestep t (the released code; its LRMs were trained for it).
    #[default]
    Parent,
    /// The child's own timestep t' (the paper's notation).
    Child,
}

/// What scores the children of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Scorer {
    /// The latent reward model `lpo.lrm` on the noisy children (LPO).
    #[default]
    Lrm,
    /// `[reward]` on the decoded prediction x̂₀ of each child (one more guided forward of the policy at the
    /// child's timestep; the last step's children are x₀ themselves), times `lpo.score_scale`: SPO's step
    /// scoring with any image reward, e.g. the shapes world's exact reward as an oracle, to tell the scorer's
    /// quality from the optimiser's.
    Reward,
}

/// `[lpo]`: the method's settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LpoSection {
    /// Training prompts, one per line. Required.
    pub prompts: Option<PathBuf>,
    /// The latent reward model folder (written by `train lrm`). Required with `scorer = "lrm"`.
    pub lrm: Option<PathBuf>,
    /// lrm | reward (see [`Scorer`]). Default lrm.
    pub scorer: Scorer,
    /// Scores are multiplied by this before `p_w − p_l` (a reward's gaps are in its own units; the LRM's are
    /// logits). Default 1.
    pub score_scale: f64,
    /// Prompts sampled per round. Default 5.
    pub prompts_per_round: usize,
    /// Children per step, K. Default 4.
    pub k: usize,
    /// β of the step DPO loss. Default 500.
    pub beta: f64,
    /// Ratio clip ε. Default 0.1.
    pub clip_range: f64,
    /// [th_min, th_max] of the σ-dependent threshold on `p_w − p_l`. Default [0.35, 0.5] (SD1.5).
    pub threshold: [f64; 2],
    /// Only steps whose timestep lies in `[lo, hi)` give training tuples. Default: every step.
    pub timestep_range: Option<[u64; 2]>,
    /// random | best. Default random.
    pub continuation: Continuation,
    /// parent | child. Default parent.
    pub score_at: ScoreAt,
    /// LRM dtype: f32 | bf16 | f16. Default f32.
    pub lrm_dtype: crate::config::DTypeSpec,
}

impl Default for LpoSection {
    fn default() -> Self {
        LpoSection {
            prompts: None,
            lrm: None,
            scorer: Scorer::Lrm,
            score_scale: 1.0,
            prompts_per_round: 5,
            k: 4,
            beta: 500.0,
            clip_range: 0.1,
            threshold: [0.35, 0.5],
            timestep_range: None,
            continuation: Continuation::Random,
            score_at: ScoreAt::Parent,
            lrm_dtype: crate::config::DTypeSpec::F32,
        }
    }
}

/// A whole `diffpref train lpo` run: the shared run settings, `[lpo]` and `[rollout]` (the sampler: DDIM with
/// η = 1, as the paper). See `examples/lpo.toml`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LpoConfig {
    #[serde(flatten)]
    pub run: RunConfig,
    pub lpo: LpoSection,
    pub rollout: RolloutConfig,
    /// The step scorer with `lpo.scorer = "reward"` (any [`crate::scoring::RewardSpec`]).
    pub reward: crate::scoring::RewardSpec,
}

impl LpoConfig {
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<LpoConfig> {
        crate::config::load_toml(path, overrides)
    }

    pub fn from_toml(text: &str, what: &str, overrides: &[String]) -> Result<LpoConfig> {
        crate::config::from_toml(text, what, overrides)
    }

    /// The run folder (`output_dir`, default `runs/lpo`).
    pub fn output_dir(&self) -> PathBuf {
        self.run.output_dir("lpo")
    }

    pub fn validate(&self) -> Result<()> {
        self.run.validate()?;
        let l = &self.lpo;
        ensure!(
            l.prompts.is_some(),
            "[lpo] prompts (the training prompts, one per line) is required"
        );
        match l.scorer {
            Scorer::Lrm => ensure!(
                l.lrm.is_some(),
                "[lpo] lrm (a latent reward model folder, from `diffpref train lrm`) is required with scorer = \"lrm\""
            ),
            Scorer::Reward => self.reward.validate("[reward]")?,
        }
        validate_step_settings("[lpo]", l)?;
        self.rollout.validate("[rollout]")
    }
}

/// Checks the fields of the step-level loop (`[lpo]`, or `[spo]` converted), naming `section`.
pub(crate) fn validate_step_settings(section: &str, l: &LpoSection) -> Result<()> {
    ensure!(
        l.score_scale.is_finite() && l.score_scale > 0.0,
        "{section} score_scale must be positive (got {})",
        l.score_scale
    );
    ensure!(
        (1..=crate::engine::config::MAX_BATCH).contains(&l.prompts_per_round),
        "{section} prompts_per_round must be 1 to {}",
        crate::engine::config::MAX_BATCH
    );
    ensure!(
        (2..=64).contains(&l.k),
        "{section} k (children per step) must be 2 to 64 (got {})",
        l.k
    );
    ensure!(
        l.beta.is_finite() && l.beta > 0.0,
        "{section} beta must be positive (got {})",
        l.beta
    );
    ensure!(
        l.clip_range.is_finite() && l.clip_range > 0.0 && l.clip_range < 1.0,
        "{section} clip_range must lie in (0, 1) (got {})",
        l.clip_range
    );
    let [a, b] = l.threshold;
    ensure!(
        a.is_finite() && b.is_finite() && (0.0..1.0).contains(&a) && a <= b && b < 1.0,
        "{section} threshold = [{a}, {b}] must satisfy 0 <= min <= max < 1 (p_w - p_l lies in [0, 1))"
    );
    if let Some([lo, hi]) = l.timestep_range {
        ensure!(
            lo < hi,
            "{section} timestep_range = [{lo}, {hi}] must have lo < hi"
        );
    }
    if l.prompts.is_none() {
        bail!("{section} prompts (the training prompts, one per line) is required");
    }
    Ok(())
}

/// `p_w − p_l` of two scores: the softmax over (s_w, s_l) gives `tanh((s_w − s_l) / 2)`.
pub fn preference_gap(s_w: f64, s_l: f64) -> f64 {
    ((s_w - s_l) / 2.0).tanh()
}

/// The σ-dependent threshold of the module docs.
pub fn dynamic_threshold(sigma: f64, sigma_range: [f64; 2], th: [f64; 2]) -> f64 {
    let [lo, hi] = sigma_range;
    if hi <= lo {
        return th[0];
    }
    th[0] + (sigma - lo) / (hi - lo) * (th[1] - th[0])
}

/// The η step std σ of each step of `rule` (0 for deterministic steps), from the sampler's own transition.
pub fn step_sigmas(rule: &StepRule) -> Result<Vec<f64>> {
    let dev = Device::Cpu;
    let z = Tensor::zeros((1, 1, 1, 1), DType::F32, &dev)?;
    (0..rule.timesteps.len())
        .map(|k| {
            if !rule.is_stochastic(k) {
                return Ok(0.0);
            }
            let tr = transition(rule, &z, &z, &[k], DdimTransition::Noise(&z))?;
            Ok(tr.std.to_vec1::<f32>()?[0] as f64)
        })
        .collect()
}

/// The clipped-ratio step DPO loss of the module docs, mean over tuples, from the policy's and the reference's
/// log-probabilities of the winners and losers (`[N]` each, f32; the reference's are detached), and the share
/// of tuples whose winner's log-ratio exceeds the loser's.
pub fn step_dpo_loss(
    lp_w: &Tensor,
    lp_l: &Tensor,
    ref_w: &Tensor,
    ref_l: &Tensor,
    beta: f64,
    eps: f64,
) -> Result<(Tensor, Vec<(&'static str, f64)>)> {
    let ratio = |lp: &Tensor, r: &Tensor| -> Result<Tensor> {
        Ok((lp - r.detach())?.exp()?.clamp(1.0 - eps, 1.0 + eps)?)
    };
    let (rw, rl) = (ratio(lp_w, ref_w)?, ratio(lp_l, ref_l)?);
    let z = ((rw.log()? - rl.log()?)? * beta)?;
    // −log σ(z) = softplus(−z) = max(−z, 0) + log(1 + e^−|z|)
    let nz = z.neg()?;
    let loss = (nz.relu()? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?.mean_all()?;
    let mean =
        |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?) };
    let dw = (lp_w - ref_w)?;
    let dl = (lp_l - ref_l)?;
    let stats = vec![
        (
            "step_acc",
            mean(&(&dw - &dl)?.gt(0.0)?.to_dtype(DType::F32)?)?,
        ),
        ("log_ratio_w", mean(&dw)?),
        ("log_ratio_l", mean(&dl)?),
        (
            "clip_frac",
            mean(
                &((rw.ge(1.0 + eps)?.to_dtype(DType::F32)?
                    + rw.le(1.0 - eps)?.to_dtype(DType::F32)?)?
                    + (rl.ge(1.0 + eps)?.to_dtype(DType::F32)?
                        + rl.le(1.0 - eps)?.to_dtype(DType::F32)?)?)?,
            )? / 2.0,
        ),
    ];
    Ok((loss, stats))
}

/// Kept training tuples: `(parent, winner, loser)` at a step, with the prompt.
#[derive(Default)]
struct Tuples {
    prompts: Vec<String>,
    steps: Vec<usize>,
    /// `[C, h, w]` each.
    parents: Vec<Tensor>,
    winners: Vec<Tensor>,
    losers: Vec<Tensor>,
}

impl Tuples {
    fn len(&self) -> usize {
        self.prompts.len()
    }

    fn push(&mut self, prompt: &str, step: usize, x: Tensor, w: Tensor, l: Tensor) {
        self.prompts.push(prompt.to_string());
        self.steps.push(step);
        self.parents.push(x);
        self.winners.push(w);
        self.losers.push(l);
    }

    /// Removes and returns the first `n`.
    fn take(&mut self, n: usize) -> Tuples {
        let n = n.min(self.len());
        Tuples {
            prompts: self.prompts.drain(..n).collect(),
            steps: self.steps.drain(..n).collect(),
            parents: self.parents.drain(..n).collect(),
            winners: self.winners.drain(..n).collect(),
            losers: self.losers.drain(..n).collect(),
        }
    }

    fn append(&mut self, mut o: Tuples) {
        self.prompts.append(&mut o.prompts);
        self.steps.append(&mut o.steps);
        self.parents.append(&mut o.parents);
        self.winners.append(&mut o.winners);
        self.losers.append(&mut o.losers);
    }

    /// Reorders by `perm`.
    fn permute(&mut self, perm: &[usize]) {
        fn apply<T: Clone>(v: &mut Vec<T>, p: &[usize]) {
            *v = p.iter().map(|&i| v[i].clone()).collect();
        }
        apply(&mut self.prompts, perm);
        apply(&mut self.steps, perm);
        apply(&mut self.parents, perm);
        apply(&mut self.winners, perm);
        apply(&mut self.losers, perm);
    }
}

#[derive(Serialize, Deserialize)]
struct LpoState {
    noise_rng: Rng,
    select_rng: Rng,
    prompt_epoch: u64,
    prompt_index: usize,
    rounds: u64,
    scorer_calls: u64,
    tuples_kept: u64,
    tuples_seen: u64,
    queue_prompts: Vec<String>,
    queue_steps: Vec<usize>,
}

const QUEUE_FILE: &str = "lpo_queue.safetensors";

/// What scores the K children of a step (loaded).
pub enum StepScorer {
    /// A latent reward model on the noisy children (LPO).
    Lrm(Box<LatentRewardModel>),
    /// A step-aware preference model on each child's decoded x̂₀ at the child's timestep (SPO).
    Spm(Box<StepAwarePreferenceModel>),
    /// An image reward on each child's decoded x̂₀, with its batch size.
    Reward(Box<dyn diffpref_rewards::Reward>, usize),
}

impl StepScorer {
    fn describe(&self) -> String {
        match self {
            StepScorer::Lrm(l) => format!("latent reward model on {}", l.config.backbone.display()),
            StepScorer::Spm(s) => format!("step-aware preference model ({})", s.clip.source),
            StepScorer::Reward(r, _) => format!("{} on each child's x0 prediction", r.name()),
        }
    }
}

/// The step-level preference loop of LPO and SPO (see the module docs) as a [`Method`]: one implementation
/// of "branch K children, score, keep a pair, continue", with any [`StepScorer`].
pub struct StepLevelMethod {
    /// `lpo` or `spo` (the metrics' and the random streams' name).
    name: &'static str,
    model: StableDiffusion,
    cfg: LpoSection,
    rollout_cfg: RolloutConfig,
    rule: StepRule,
    sigmas: Vec<f64>,
    sigma_range: [f64; 2],
    scorer: StepScorer,
    prompts: PromptCycle,
    noise_rng: Rng,
    select_rng: Rng,
    rounds: u64,
    scorer_calls: u64,
    tuples_kept: u64,
    tuples_seen: u64,
    queue: Tuples,
    /// Tuples per optimizer step.
    per_step: usize,
}

/// The LRM of `[lpo] lrm`, checked against the model's latents.
fn load_lrm(cfg: &LpoSection, model: &StableDiffusion) -> Result<LatentRewardModel> {
    let lrm_dir = cfg.lrm.as_ref().context("[lpo] lrm")?;
    let lrm = LatentRewardModel::load(lrm_dir, cfg.lrm_dtype.dtype(), model.device()).with_context(
        || {
            format!(
                "[lpo] lrm = {}: loading the latent reward model (train one with `diffpref train lrm`)",
                lrm_dir.display()
            )
        },
    )?;
    let (lc, mc) = (
        lrm.model.unet.config().in_channels,
        model.unet.config().in_channels,
    );
    ensure!(
        lc == mc && lrm.model.vae_scale_factor() == model.vae_scale_factor(),
        "[lpo] lrm {}: its backbone's latents ({lc} channels) are not the model's ({mc}): an LRM \
         scores latents of its own VAE",
        lrm_dir.display()
    );
    Ok(lrm)
}

impl StepLevelMethod {
    /// LPO: `[lpo]`'s scorer.
    pub fn lpo(cfg: &LpoConfig, model: StableDiffusion) -> Result<StepLevelMethod> {
        let scorer = match cfg.lpo.scorer {
            Scorer::Lrm => StepScorer::Lrm(Box::new(load_lrm(&cfg.lpo, &model)?)),
            Scorer::Reward => StepScorer::Reward(
                cfg.reward.load("[reward]", model.device())?,
                cfg.reward.batch_size,
            ),
        };
        Self::new("lpo", &cfg.lpo, &cfg.rollout, &cfg.run, scorer, model)
    }

    /// The loop with `settings` (the `[lpo]` fields; SPO converts its `[spo]`), sampling with `rollout`.
    pub fn new(
        name: &'static str,
        settings: &LpoSection,
        rollout: &RolloutConfig,
        run: &RunConfig,
        scorer: StepScorer,
        model: StableDiffusion,
    ) -> Result<StepLevelMethod> {
        let section = format!("[{name}]");
        let prompts_file = settings
            .prompts
            .as_ref()
            .with_context(|| format!("{section} prompts"))?;
        let prompts =
            read_prompts(prompts_file, false).with_context(|| format!("{section} prompts"))?;
        let rule = StepRule::new(&model, rollout)?;
        let sigmas = step_sigmas(&rule)?;
        let stoch: Vec<f64> = rule
            .stochastic_steps()
            .into_iter()
            .map(|k| sigmas[k])
            .collect();
        ensure!(
            !stoch.is_empty(),
            "[rollout] has no stochastic step to branch"
        );
        let sigma_range = [
            stoch.iter().cloned().fold(f64::INFINITY, f64::min),
            stoch.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        ];
        let m = StepLevelMethod {
            name,
            rule,
            sigmas,
            sigma_range,
            scorer,
            prompts: PromptCycle::new(prompts, run.seed, name),
            cfg: settings.clone(),
            rollout_cfg: rollout.clone(),
            noise_rng: Rng::derive(run.seed, &format!("{name}-noise")),
            select_rng: Rng::derive(run.seed, &format!("{name}-select")),
            rounds: 0,
            scorer_calls: 0,
            tuples_kept: 0,
            tuples_seen: 0,
            queue: Tuples::default(),
            per_step: run.optim.batch_size * run.optim.grad_accum,
            model,
        };
        Ok(m)
    }

    /// Whether step `k` may give training tuples.
    fn trainable(&self, k: usize) -> bool {
        let t = self.rule.timesteps[k];
        self.rule.is_stochastic(k)
            && self
                .cfg
                .timestep_range
                .is_none_or(|[lo, hi]| t >= lo as f64 && t < hi as f64)
    }

    /// The scores of children `[B, K, C, h, w]` of step `k` (timestep `t`) → `[B][K]`, times `score_scale`;
    /// and, when scoring ran the policy on the children (x̂₀ scorers), their guided ε̂ at step `k + 1`
    /// (`[B·K, C, h, w]`, row-major), which the next step reuses for the child that continues.
    fn score_children(
        &mut self,
        policy: &Policy,
        children: &Tensor,
        k: usize,
        prompts: &[String],
    ) -> Result<(Vec<Vec<f64>>, Option<Tensor>)> {
        let (b, kk) = (children.dim(0)?, children.dim(1)?);
        let flat = children.flatten_to(1)?.to_dtype(DType::F32)?;
        let ps: Vec<&str> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.as_str(), kk))
            .collect();
        let t = self.rule.timesteps[k];
        let mut children_eps = None;
        let s: Tensor = if let StepScorer::Lrm(lrm) = &self.scorer {
            let t_score = match self.cfg.score_at {
                ScoreAt::Parent => t,
                ScoreAt::Child => (t - self.rule.step_ratio as f64).max(0.0),
            };
            let tt = Tensor::new(&[t_score as f32], flat.device())?;
            lrm.score_latents(&flat, &tt, &ps)?
        } else {
            // x̂₀ of each child: the policy's guided prediction at the next step (the last step's children are
            // x₀).
            let rule = &self.rule;
            let x0 = if k + 1 < rule.timesteps.len() {
                let n = b * kk;
                let pixels = flat.dim(2)? * self.model.vae_scale_factor();
                let (x0, eps) = policy.with_weights(&mut self.model, Weights::Current, |m| {
                    let cond = Conditioning::new(m, &ps, rule.guidance, pixels)?;
                    let tt = Tensor::full(rule.timesteps[k + 1] as f32, n, m.device())?;
                    let eps = guided_output(&m.unet, &flat, &tt, &cond, rule.guidance)?.detach();
                    let z = flat.zeros_like()?;
                    let x0 = transition(
                        rule,
                        &eps,
                        &flat,
                        &vec![k + 1; n],
                        DdimTransition::Noise(&z),
                    )?
                    .pred_x0
                    .detach();
                    Ok((x0, eps))
                })?;
                children_eps = Some(eps);
                x0
            } else {
                flat.clone()
            };
            let images = self
                .model
                .vae
                .decode_to_image01(&x0.to_dtype(self.model.dtype())?)?
                .to_dtype(DType::F32)?;
            match &self.scorer {
                StepScorer::Spm(spm) => {
                    // The child's own timestep (0 for the last step's x₀), as the SPM was trained.
                    let t_child = rule.timesteps.get(k + 1).copied().unwrap_or(0.0);
                    let tt = Tensor::new(&[t_child as f32], images.device())?;
                    let mut parts = Vec::new();
                    let n = images.dim(0)?;
                    let mut i = 0;
                    while i < n {
                        let m = 64.min(n - i);
                        parts.push(spm.score_images(
                            &images.narrow(0, i, m)?,
                            &ps[i..i + m],
                            &tt,
                        )?);
                        i += m;
                    }
                    Tensor::cat(&parts, 0)?
                }
                StepScorer::Reward(reward, bs) => {
                    // Scored as 8-bit images, as the judge sees them.
                    let imgs = crate::imaging::tensor_to_images(&images)?;
                    let x = crate::imaging::images_to_tensor(&imgs, self.model.device())?;
                    reward.score_batched(&x, &ps, *bs)?
                }
                StepScorer::Lrm(_) => unreachable!("scored above"),
            }
        };
        let s: Vec<f32> = s
            .detach()
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .to_vec1()?;
        self.scorer_calls += (b * kk) as u64;
        let scale = self.cfg.score_scale;
        Ok((
            s.chunks(kk)
                .map(|c| c.iter().map(|&x| x as f64 * scale).collect())
                .collect(),
            children_eps,
        ))
    }

    /// Samples one round (see the module docs) and appends its kept tuples, shuffled, to the queue; returns its
    /// figures.
    fn new_round(&mut self, policy: &Policy) -> Result<Vec<(&'static str, f64)>> {
        let t0 = Instant::now();
        let prompts: Vec<String> = (0..self.cfg.prompts_per_round)
            .map(|_| self.prompts.next_prompt())
            .collect();
        let ps: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
        let b = ps.len();
        let shape = rollout::initial_noise_shape(&self.model, b, self.rollout_cfg.resolution)?;
        let mut x = self.noise_rng.normal_tensor(&shape, self.model.device())?;
        let pixels = shape[2] * self.model.vae_scale_factor();
        let mut round = Tuples::default();
        let (mut seen, mut gap_sum) = (0usize, 0f64);
        let mut policy_s = 0f64;
        let mut carried_eps: Option<Tensor> = None;
        let mut children_eps_kept: Option<Tensor> = None;
        for k in 0..self.rule.timesteps.len() {
            let t = self.rule.timesteps[k];
            let tp = Instant::now();
            let (rule, kk, rng) = (&self.rule, self.cfg.k, &mut self.noise_rng);
            let carried = carried_eps.take();
            let step = policy.with_weights(&mut self.model, Weights::Current, |m| {
                // The parents' guided ε̂: kept from scoring the previous step's children when there was one.
                let eps = match carried {
                    Some(e) => e,
                    None => {
                        let cond = Conditioning::new(m, &ps, rule.guidance, pixels)?;
                        let tt = Tensor::full(t as f32, b, m.device())?;
                        guided_output(&m.unet, &x, &tt, &cond, rule.guidance)?.detach()
                    }
                };
                if rule.is_stochastic(k) {
                    Ok((Some(branch_from_output(rule, &x, &eps, k, kk, rng)?), None))
                } else {
                    let tr = if rule.in_window(k) {
                        // DDPM's deterministic last step.
                        transition(
                            rule,
                            &eps,
                            &x,
                            &vec![k; b],
                            DdimTransition::Noise(&x.zeros_like()?),
                        )?
                    } else {
                        rollout::deterministic_step(rule, &eps, &x, k)?
                    };
                    Ok((None, Some(tr.prev_sample.detach())))
                }
            })?;
            policy_s += tp.elapsed().as_secs_f64();
            let (br, next) = step;
            let Some(br) = br else {
                x = next.expect("a deterministic step's sample");
                continue;
            };
            let choice: Vec<usize> = if self.trainable(k)
                || self.cfg.continuation == Continuation::Best
            {
                let (scores, children_eps) =
                    self.score_children(policy, &br.children, k, &prompts)?;
                children_eps_kept = children_eps;
                let th = dynamic_threshold(self.sigmas[k], self.sigma_range, self.cfg.threshold);
                let mut choice = Vec::with_capacity(b);
                for (i, s) in scores.iter().enumerate() {
                    let (mut w, mut l) = (0, 0);
                    for (j, &v) in s.iter().enumerate() {
                        if v > s[w] {
                            w = j;
                        }
                        if v < s[l] {
                            l = j;
                        }
                    }
                    if self.trainable(k) {
                        seen += 1;
                        let gap = preference_gap(s[w], s[l]);
                        gap_sum += gap;
                        if gap > th && w != l {
                            round.push(
                                &prompts[i],
                                k,
                                br.parent.i(i)?,
                                br.children.i((i, w))?,
                                br.children.i((i, l))?,
                            );
                        }
                    }
                    choice.push(match self.cfg.continuation {
                        Continuation::Best => w,
                        Continuation::Random => self.select_rng.below(self.cfg.k as u64) as usize,
                    });
                }
                choice
            } else {
                (0..b)
                    .map(|_| self.select_rng.below(self.cfg.k as u64) as usize)
                    .collect()
            };
            x = br.select(&choice)?;
            // The chosen children's ε̂ at the next step, if scoring computed it.
            carried_eps = match children_eps_kept.take() {
                Some(e) => Some(Tensor::stack(
                    &choice
                        .iter()
                        .enumerate()
                        .map(|(i, &c)| e.get(i * self.cfg.k + c))
                        .collect::<candle_core::Result<Vec<_>>>()?,
                    0,
                )?),
                None => None,
            };
        }
        let kept = round.len();
        let mut perm: Vec<usize> = (0..kept).collect();
        self.select_rng.shuffle(&mut perm);
        round.permute(&perm);
        self.queue.append(round);
        self.rounds += 1;
        self.tuples_kept += kept as u64;
        self.tuples_seen += seen as u64;
        Ok(vec![
            ("round_tuples", kept as f64),
            ("keep_rate", kept as f64 / seen.max(1) as f64),
            ("mean_gap", gap_sum / seen.max(1) as f64),
            ("rounds", self.rounds as f64),
            ("sample_s", t0.elapsed().as_secs_f64()),
            ("policy_s", policy_s),
        ])
    }
}

impl Method for StepLevelMethod {
    fn name(&self) -> &str {
        self.name
    }

    fn unit(&self) -> &str {
        "tuples"
    }

    fn headline_metric(&self) -> Option<&'static str> {
        Some("step_acc")
    }

    fn on_start(&mut self, ctx: StartContext<'_>) -> Result<()> {
        ctx.progress.println(format!(
            "{}: {} prompts x {} children per step, {} training prompts, scorer: {}",
            self.name,
            self.cfg.prompts_per_round,
            self.cfg.k,
            self.prompts.len(),
            self.scorer.describe()
        ));
        Ok(())
    }

    fn before_step(&mut self, ctx: &StepContext<'_>) -> Result<Vec<(&'static str, f64)>> {
        let mut figures = Vec::new();
        let mut empty = 0;
        while self.queue.len() < self.per_step {
            let f = self.new_round(ctx.policy)?;
            if f[0].1 == 0.0 {
                empty += 1;
                if empty >= 20 {
                    bail!(
                        "[{name}] 20 rounds in a row kept no tuple: no pair of children cleared the threshold {:?} \
                         (lower [{name}] threshold, or check the step scorer: {})",
                        self.cfg.threshold,
                        self.scorer.describe(),
                        name = self.name
                    );
                }
            } else {
                empty = 0;
            }
            figures = f;
        }
        Ok(figures)
    }

    fn micro_step(&mut self, ctx: &StepContext<'_>) -> Result<MicroStep> {
        let batch = self.queue.take(ctx.batch_size);
        ensure!(batch.len() > 0, "lpo: the tuple queue is empty");
        let n = batch.len();
        let model = &self.model;
        let dev = model.device().clone();
        let x = Tensor::stack(&batch.parents, 0)?;
        let xw = Tensor::stack(&batch.winners, 0)?;
        let xl = Tensor::stack(&batch.losers, 0)?;
        let ps: Vec<&str> = batch.prompts.iter().map(|s| s.as_str()).collect();
        let pixels = x.dim(2)? * model.vae_scale_factor();
        let cond = Conditioning::new(model, &ps, self.rule.guidance, pixels)?;
        let t = Tensor::from_vec(
            batch
                .steps
                .iter()
                .map(|&k| self.rule.timesteps[k] as f32)
                .collect::<Vec<_>>(),
            n,
            &dev,
        )?;
        let logps = |unet: &diffpref_pipelines::models::unet::UNet2DConditionModel| -> Result<(Tensor, Tensor)> {
            let eps = guided_output(unet, &x, &t, &cond, self.rule.guidance)?;
            let w = transition(&self.rule, &eps, &x, &batch.steps, DdimTransition::PrevSample(&xw))?;
            let l = transition(&self.rule, &eps, &x, &batch.steps, DdimTransition::PrevSample(&xl))?;
            Ok((w.log_prob, l.log_prob))
        };
        let (lp_w, lp_l) = logps(&model.unet)?;
        let reference = ctx
            .policy
            .reference()
            .context("LPO needs a reference model (the base UNet)")?;
        let (ref_w, ref_l) = {
            let scope = reference.scope(&model.unet);
            let (a, b) = logps(scope.unet())?;
            (a.detach(), b.detach())
        };
        let (loss, stats) = step_dpo_loss(
            &lp_w,
            &lp_l,
            &ref_w,
            &ref_l,
            self.cfg.beta,
            self.cfg.clip_range,
        )?;
        let mean_t = batch
            .steps
            .iter()
            .map(|&k| self.rule.timesteps[k])
            .sum::<f64>()
            / n as f64;
        let mut metrics = stats;
        metrics.push(("mean_t", mean_t));
        Ok(MicroStep {
            loss,
            metrics,
            units: n,
            about: format!(
                "round {}, tuples of {}",
                self.rounds,
                batch.prompts.join("; ")
            ),
        })
    }

    fn after_step(&mut self, _ctx: &StepContext<'_>) -> Result<Vec<(&'static str, f64)>> {
        Ok(vec![
            ("scorer_calls", self.scorer_calls as f64),
            ("tuples_kept", self.tuples_kept as f64),
        ])
    }

    fn report(&self) -> serde_json::Value {
        serde_json::json!({
            "training_reward": self.scorer.describe(),
            "lrm": self.cfg.lrm,
            "scorer_calls": self.scorer_calls,
            "rounds": self.rounds,
            "tuples_kept": self.tuples_kept,
            "tuples_seen": self.tuples_seen,
        })
    }

    fn state(&self) -> Result<serde_json::Value> {
        Ok(serde_json::to_value(LpoState {
            noise_rng: self.noise_rng.clone(),
            select_rng: self.select_rng.clone(),
            prompt_epoch: self.prompts.position().0,
            prompt_index: self.prompts.position().1,
            rounds: self.rounds,
            scorer_calls: self.scorer_calls,
            tuples_kept: self.tuples_kept,
            tuples_seen: self.tuples_seen,
            queue_prompts: self.queue.prompts.clone(),
            queue_steps: self.queue.steps.clone(),
        })?)
    }

    fn load_state(&mut self, state: serde_json::Value) -> Result<()> {
        let s: LpoState = serde_json::from_value(state)?;
        self.noise_rng = s.noise_rng;
        self.select_rng = s.select_rng;
        self.prompts.seek(s.prompt_epoch, s.prompt_index);
        self.rounds = s.rounds;
        self.scorer_calls = s.scorer_calls;
        self.tuples_kept = s.tuples_kept;
        self.tuples_seen = s.tuples_seen;
        self.queue = Tuples {
            prompts: s.queue_prompts,
            steps: s.queue_steps,
            ..Default::default()
        };
        Ok(())
    }

    fn save_files(&self, dir: &Path) -> Result<()> {
        if self.queue.len() == 0 {
            return Ok(());
        }
        crate::io::save_safetensors(
            &dir.join(QUEUE_FILE),
            &[
                (
                    "parents".to_string(),
                    Tensor::stack(&self.queue.parents, 0)?,
                ),
                (
                    "winners".to_string(),
                    Tensor::stack(&self.queue.winners, 0)?,
                ),
                ("losers".to_string(), Tensor::stack(&self.queue.losers, 0)?),
            ],
        )
    }

    fn load_files(&mut self, dir: &Path) -> Result<()> {
        let n = self.queue.prompts.len();
        if n == 0 {
            return Ok(());
        }
        let path = dir.join(QUEUE_FILE);
        let saved =
            crate::io::SavedTensors::load(&path, self.model.device(), "the LPO tuple queue")?;
        let get = |k: &str| -> Result<Vec<Tensor>> {
            let rows = saved.rows(k)?;
            ensure!(
                rows.len() == n,
                "{}: `{k}` has {} rows, state.json {n}",
                path.display(),
                rows.len()
            );
            Ok(rows)
        };
        self.queue.parents = get("parents")?;
        self.queue.winners = get("winners")?;
        self.queue.losers = get("losers")?;
        Ok(())
    }

    fn model(&mut self) -> Option<&mut StableDiffusion> {
        Some(&mut self.model)
    }
}

/// Runs (or resumes) a `train lpo` run. `stop` (e.g. from Ctrl-C) makes it save a checkpoint and return early.
pub fn train(cfg: &LpoConfig, stop: Option<StopFlag>) -> Result<TrainSummary> {
    cfg.validate()?;
    let mut inputs = Vec::new();
    if let Some(p) = &cfg.lpo.prompts {
        inputs.push(crate::output::Input::new("[lpo] prompts file", p));
    }
    if let (Some(p), Scorer::Lrm) = (&cfg.lpo.lrm, cfg.lpo.scorer) {
        inputs.push(crate::output::Input::new("[lpo] lrm folder", p));
    }
    train_method(
        &cfg.run,
        &cfg.output_dir(),
        "train lpo",
        &inputs,
        serde_json::to_value(cfg)?,
        stop,
        |model, _| StepLevelMethod::lpo(cfg, model),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::run::{load_model, load_policy};

    #[test]
    fn preference_gap_is_the_two_way_softmax_difference() {
        for (a, b) in [(1.3, 0.2), (-0.5, 0.7), (4.0, 4.0), (20.0, -3.0)] {
            let (ea, eb) = (f64::exp(a), f64::exp(b));
            let want = ea / (ea + eb) - eb / (ea + eb);
            assert!((preference_gap(a, b) - want).abs() < 1e-12, "{a} {b}");
        }
        // The paper's thresholds as raw score gaps: 0.35 / 0.5 / 0.6 ↔ 0.73 / 1.10 / 1.39.
        for (th, gap) in [(0.35, 0.73), (0.5, 1.10), (0.6, 1.39)] {
            assert!((preference_gap(gap, 0.0) - th).abs() < 0.005, "{th}");
        }
    }

    #[test]
    fn dynamic_threshold_is_linear_in_sigma() {
        let r = [0.0206, 0.6444];
        let th = [0.35, 0.5];
        assert!((dynamic_threshold(0.0206, r, th) - 0.35).abs() < 1e-12);
        assert!((dynamic_threshold(0.6444, r, th) - 0.5).abs() < 1e-12);
        // t = 501 on SD1.5's 20-step grid: σ = 0.4293 → the spec's 0.448.
        let mid = dynamic_threshold(0.4293, r, th);
        assert!((mid - 0.448).abs() < 1e-3, "{mid}");
        assert!(mid > 0.35 && mid < 0.5);
        assert_eq!(dynamic_threshold(0.3, [0.5, 0.5], th), 0.35);
    }

    #[test]
    fn step_dpo_loss_matches_hand_computed_values() {
        let d = &Device::Cpu;
        // Log-ratios: w 0.05, l −0.02 (inside the clip); w 0.3 (clipped at log 1.1), l 0.
        let lp_w = Tensor::new(&[0.05f32, 0.3], d).unwrap();
        let lp_l = Tensor::new(&[-0.02f32, 0.0], d).unwrap();
        let zero = Tensor::new(&[0.0f32, 0.0], d).unwrap();
        let (beta, eps) = (500.0, 0.1);
        let (loss, stats) = step_dpo_loss(&lp_w, &lp_l, &zero, &zero, beta, eps).unwrap();
        let sp = |x: f64| (1.0 + x.exp()).ln();
        let z0 = beta * (0.05f32 as f64 - (-0.02f32) as f64);
        let z1 = beta * (1.1f64.ln() - 0.0);
        let want = (sp(-z0) + sp(-z1)) / 2.0;
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-4 * want.max(1.0), "{got} vs {want}");
        let get = |k: &str| stats.iter().find(|(n, _)| *n == k).unwrap().1;
        assert_eq!(get("step_acc"), 1.0);
        assert!((get("clip_frac") - 0.25).abs() < 1e-9);
        // Gradient: the clipped row passes none; the other −β σ(−z) (±1) / N through its two log-probs.
        let vw = candle_core::Var::from_tensor(&lp_w).unwrap();
        let vl = candle_core::Var::from_tensor(&lp_l).unwrap();
        let (l, _) =
            step_dpo_loss(vw.as_tensor(), vl.as_tensor(), &zero, &zero, beta, eps).unwrap();
        let g = l.backward().unwrap();
        let gw = g.get(vw.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let gl = g.get(vl.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let s = 1.0 / (1.0 + z0.exp());
        assert!(
            (gw[0] as f64 + beta * s / 2.0).abs() < 1e-3 * (beta * s),
            "{gw:?}"
        );
        assert!(
            (gl[0] as f64 - beta * s / 2.0).abs() < 1e-3 * (beta * s),
            "{gl:?}"
        );
        assert_eq!(gw[1], 0.0, "a clipped winner passes no gradient");
        // At the start (policy = reference) the loss is log 2.
        let (l0, _) = step_dpo_loss(&zero, &zero, &zero, &zero, beta, eps).unwrap();
        assert!((l0.to_scalar::<f32>().unwrap() as f64 - 2f64.ln()).abs() < 1e-6);
    }

    /// A round of the loop with the shapes surrogate as the step scorer (continuous: no ties), every pair kept.
    fn round(continuation: &str, k: usize) -> Tuples {
        let fx = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd");
        let tmp = tempfile::tempdir().unwrap();
        let prompts = tmp.path().join("p.txt");
        std::fs::write(&prompts, "a red circle\na blue square\na green triangle\n").unwrap();
        let sets: Vec<String> = vec![
            format!("model = {:?}", fx.display().to_string()),
            format!("lpo.prompts = {:?}", prompts.display().to_string()),
            "lpo.scorer = \"reward\"".into(),
            "reward.kind = \"shapes_surrogate\"".into(),
            "lpo.prompts_per_round = 3".into(),
            format!("lpo.k = {k}"),
            "lpo.threshold = [0.0, 0.0]".into(),
            format!("lpo.continuation = {continuation:?}"),
            "lora.rank = 2".into(),
            "rollout.steps = 8".into(),
        ];
        let cfg = LpoConfig::load(None, &sets).unwrap();
        let (mut model, dir) = load_model(&cfg.run).unwrap();
        let policy = load_policy(&cfg.run, &mut model, &dir).unwrap();
        let mut m = StepLevelMethod::lpo(&cfg, model).unwrap();
        m.new_round(&policy).unwrap();
        std::mem::take(&mut m.queue)
    }

    fn same(a: &Tensor, b: &Tensor) -> bool {
        let (a, b): (Vec<f32>, Vec<f32>) = (
            a.flatten_all().unwrap().to_vec1().unwrap(),
            b.flatten_all().unwrap().to_vec1().unwrap(),
        );
        a == b
    }

    /// For each prompt's consecutive kept steps (k, k + 1): whether the next parent is the winner or the loser
    /// of step k (with K = 2 it is always one of them: the pool's children share their parent).
    fn continuations(t: &Tuples) -> (usize, usize) {
        let (mut to_w, mut to_l) = (0, 0);
        for i in 0..t.len() {
            for j in 0..t.len() {
                if t.prompts[i] == t.prompts[j] && t.steps[j] == t.steps[i] + 1 {
                    let next = &t.parents[j];
                    let (w, l) = (same(next, &t.winners[i]), same(next, &t.losers[i]));
                    assert!(
                        w != l,
                        "the next parent is one of the two children, exactly"
                    );
                    if w {
                        to_w += 1;
                    } else {
                        to_l += 1;
                    }
                }
            }
        }
        (to_w, to_l)
    }

    #[test]
    fn the_next_parent_is_a_child_of_the_pool_drawn_at_random_or_the_best() {
        let r = round("random", 2);
        assert!(r.len() >= 15, "{} tuples", r.len());
        for i in 0..r.len() {
            assert!(!same(&r.winners[i], &r.losers[i]));
            assert!(!same(&r.parents[i], &r.winners[i]));
        }
        let (w, l) = continuations(&r);
        assert!(w + l >= 12, "{w} {l}");
        // The resampler: the loser continues about as often as the winner.
        assert!(w > 0 && l > 0, "{w} {l}");
        let (w, l) = continuations(&round("best", 2));
        assert!(w >= 12 && l == 0, "{w} {l}");
    }
}
