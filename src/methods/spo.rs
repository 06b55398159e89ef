//! `diffpref train spo`: Step-by-step Preference Optimization (Liang et al., "Aesthetic Post-Training Diffusion
//! Models from Generic Preferences with Step-by-step Preference Optimization", CVPR 2025; first "Step-aware
//! Preference Optimization", arXiv 2406.04314; code `RockeyCoss/SPO`): on-policy step-level preference
//! optimisation with a step-aware preference model ([`diffpref_rewards::spm`], `train spm`).
//!
//! **Sampling** (per round of `prompts_per_round` prompts; no graph, the policy's current weights): DDIM with
//! η = 1 and CFG. At every step from a shared parent x_t, a pool of K children
//! `x_{t'}^{(j)} = μ_θ(x_t, t) + σ_t ξ_j` (K independent noises, one guided forward);
//!
//! ```text
//! s_j = SPM(decode(x̂₀(x_{t'}^{(j)})), p, t')         x̂₀ from the policy's guided ε̂ at the child's timestep t'
//!                                                    (the last step's children are x₀ themselves, t' = 0)
//! (w, l) = (argmax s, argmin s); keep when tanh((s_w − s_l)/2) > threshold  and t ∈ timestep_range
//! x_{t'} ← a child drawn uniformly (the step-wise resampler: the next comparison is independent of this one)
//! ```
//!
//! The steps outside `timestep_range` still sample (one child continues) but give no pair: the paper trains the
//! 16 transitions from t = 751 down of its 20 (`divert_start_step = 4`), as its SPM is unreliable at high noise.
//!
//! **Loss** per kept (x_t, x_w, x_l) — the winner and loser share x_t, so one guided forward of the policy (with
//! graph) and one of the frozen reference give both log-probabilities:
//!
//! ```text
//! lp(x'|x) = mean over C·H·W of log N(x'; μ(x, t), σ_t²)          (a mean: β assumes it)
//! ρ_w = clamp(exp(lp_θ(x_w|x) − lp_ref(x_w|x)), 1 − ε, 1 + ε),  ρ_l likewise
//! L   = −log σ(β (log ρ_w − log ρ_l))                               β = 10, ε = 0.1
//! ```
//!
//! The hard clamp zeroes the gradient of a tuple once its ratio leaves [1 − ε, 1 + ε]: a trust region around
//! the frozen base. The reference is the base model (adapters off, or the frozen copy).
//!
//! One implementation serves LPO and SPO ([`crate::methods::lpo::StepLevelMethod`]): SPO is the loop with the
//! SPM as its scorer (or, `scorer = "reward"`, any image reward on x̂₀ — on the shapes world the exact reward
//! as an oracle, to tell the scorer's quality from the optimiser's). The training reward is the step scorer; the
//! held-out judge is `[eval]`.

use crate::engine::config::RunConfig;
use crate::engine::run::{train_method, TrainSummary};
use crate::methods::lpo::{
    validate_step_settings, Continuation, LpoSection, StepLevelMethod, StepScorer,
};
use crate::rollout::RolloutConfig;
use crate::train::checkpoint::StopFlag;
use anyhow::{ensure, Context, Result};
use diffpref_rewards::spm::StepAwarePreferenceModel;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What scores the children of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SpoScorer {
    /// The step-aware preference model `spo.spm` on each child's decoded x̂₀ at the child's timestep.
    #[default]
    Spm,
    /// `[reward]` on each child's decoded x̂₀ (8-bit, as the judge sees images), times `score_scale`.
    Reward,
}

/// `[spo]`: the method's settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoSection {
    /// Training prompts, one per line. Required.
    pub prompts: Option<PathBuf>,
    /// The step-aware preference model folder (written by `train spm`). Required with `scorer = "spm"`.
    pub spm: Option<PathBuf>,
    /// spm | reward (see [`SpoScorer`]). Default spm.
    pub scorer: SpoScorer,
    /// Scores are multiplied by this before the threshold test (the SPM's are PickScore-scale logits: 1).
    /// Default 1.
    pub score_scale: f64,
    /// Prompts sampled per round. Default 10 (the SD1.5 recipe's per-GPU batch).
    pub prompts_per_round: usize,
    /// Pool size K (children per step). Default 4 (SD1.5; the SDXL recipe uses 2).
    pub k: usize,
    /// β of the step loss. Default 10.
    pub beta: f64,
    /// Ratio clip ε. Default 0.1.
    pub clip_range: f64,
    /// Keep a pair when `tanh((s_w − s_l)/2)` exceeds this. Default 0.3 (SD1.5; SDXL 0.4).
    pub threshold: f64,
    /// Only steps whose (parent) timestep lies in `[lo, hi)` give pairs. Default [0, 800): on SD's 20-step
    /// DDIM grid (951, 901, …, 1) the paper's trained steps, 751 and below.
    pub timestep_range: Option<[u64; 2]>,
    /// random (the paper's resampler) | best. Default random.
    pub continuation: Continuation,
}

impl Default for SpoSection {
    fn default() -> Self {
        SpoSection {
            prompts: None,
            spm: None,
            scorer: SpoScorer::Spm,
            score_scale: 1.0,
            prompts_per_round: 10,
            k: 4,
            beta: 10.0,
            clip_range: 0.1,
            threshold: 0.3,
            timestep_range: Some([0, 800]),
            continuation: Continuation::Random,
        }
    }
}

impl SpoSection {
    /// The loop's settings (the LRM-only fields unused).
    fn step_settings(&self) -> LpoSection {
        LpoSection {
            prompts: self.prompts.clone(),
            score_scale: self.score_scale,
            prompts_per_round: self.prompts_per_round,
            k: self.k,
            beta: self.beta,
            clip_range: self.clip_range,
            threshold: [self.threshold, self.threshold],
            timestep_range: self.timestep_range,
            continuation: self.continuation,
            ..LpoSection::default()
        }
    }
}

/// A whole `diffpref train spo` run: the shared run settings, `[spo]`, `[rollout]` (DDIM η = 1, as the paper)
/// and `[reward]` (the step scorer with `scorer = "reward"`). See `examples/spo.toml`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SpoConfig {
    #[serde(flatten)]
    pub run: RunConfig,
    pub spo: SpoSection,
    pub rollout: RolloutConfig,
    pub reward: crate::scoring::RewardSpec,
}

impl SpoConfig {
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<SpoConfig> {
        crate::config::load_toml(path, overrides)
    }

    pub fn from_toml(text: &str, what: &str, overrides: &[String]) -> Result<SpoConfig> {
        crate::config::from_toml(text, what, overrides)
    }

    /// The run folder (`output_dir`, default `runs/spo`).
    pub fn output_dir(&self) -> PathBuf {
        self.run.output_dir("spo")
    }

    pub fn validate(&self) -> Result<()> {
        self.run.validate()?;
        let s = &self.spo;
        match s.scorer {
            SpoScorer::Spm => ensure!(
                s.spm.is_some(),
                "[spo] spm (a step-aware preference model folder, from `diffpref train spm`) is required with \
                 scorer = \"spm\""
            ),
            SpoScorer::Reward => self.reward.validate("[reward]")?,
        }
        ensure!(
            s.threshold.is_finite() && (0.0..1.0).contains(&s.threshold),
            "[spo] threshold must lie in [0, 1) (tanh((s_w - s_l)/2) does; got {})",
            s.threshold
        );
        validate_step_settings("[spo]", &s.step_settings())?;
        self.rollout.validate("[rollout]")
    }
}

/// Runs (or resumes) a `train spo` run. `stop` (e.g. from Ctrl-C) makes it save a checkpoint and return early.
pub fn train(cfg: &SpoConfig, stop: Option<StopFlag>) -> Result<TrainSummary> {
    cfg.validate()?;
    let mut inputs = Vec::new();
    if let Some(p) = &cfg.spo.prompts {
        inputs.push(crate::output::Input::new("[spo] prompts file", p));
    }
    if let (Some(p), SpoScorer::Spm) = (&cfg.spo.spm, cfg.spo.scorer) {
        inputs.push(crate::output::Input::new("[spo] spm folder", p));
    }
    train_method(
        &cfg.run,
        &cfg.output_dir(),
        "train spo",
        &inputs,
        serde_json::to_value(cfg)?,
        stop,
        |model, _| {
            let scorer = match cfg.spo.scorer {
                SpoScorer::Spm => {
                    let dir = cfg.spo.spm.as_ref().context("[spo] spm")?;
                    StepScorer::Spm(Box::new(
                        StepAwarePreferenceModel::load(dir, candle_core::DType::F32, model.device())
                            .with_context(|| {
                                format!(
                                    "[spo] spm = {}: loading the step-aware preference model (train one with \
                                     `diffpref train spm`)",
                                    dir.display()
                                )
                            })?,
                    ))
                }
                SpoScorer::Reward => StepScorer::Reward(
                    cfg.reward.load("[reward]", model.device())?,
                    cfg.reward.batch_size,
                ),
            };
            StepLevelMethod::new(
                "spo",
                &cfg.spo.step_settings(),
                &cfg.rollout,
                &cfg.run,
                scorer,
                model,
            )
        },
    )
}
