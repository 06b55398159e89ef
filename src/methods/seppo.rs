//! `diffpref train seppo`: SePPO, semi-policy preference optimisation (Zhang, Lan et al., "SePPO: Semi-Policy
//! Preference Optimization for Diffusion Alignment", arXiv 2410.05255 v1, 2024; renamed SSPO in v2). No
//! training code was released: this follows `specs/seppo.md`'s reconstruction, and every guess is a setting.
//!
//! **Pairs without losers.** Each pair is a winner `x^w` for prompt `c` — the chosen image of a preference set
//! (its loser is ignored; the paper's setting), or, online (`winners = "best_of_k"`), the best of `k` samples of
//! the current policy under `[reward]` — and a **reference sample** `x^ref ~ p_{θ_ref}(·|c)`, generated fresh
//! by the reference model for the same prompt (no graph; `sample_steps` steps of `scheduler` with guidance
//! `guidance`, from the run's `sample` random stream).
//!
//! **Random checkpoint replay.** Every `pool_every` optimizer steps the current weights are saved into the
//! pool (`<run>/seppo-pool/step-NNNNNN.safetensors`: the LoRA, or the full UNet's weights); the pool starts
//! with the base model. Before each optimizer step the reference is drawn, `reference = "random"`:
//! `θ_ref ~ U{θ_0, …, θ_{k−1}}` (SePPO); `"base"`: always `θ_0` (DITTO-style); `"latest"`: always the newest
//! (SPIN-Diffusion-style). It is redrawn every optimizer step (the paper's per-batch or per-block cadence is
//! not known).
//!
//! **Loss.** One timestep `t` and one noise `ε` per pair, shared by both images (as Diffusion-DPO); `e_m(x)` is
//! the per-sample mean squared error of model `m`'s prediction on `x` noised to `t`, and
//!
//! ```text
//! Δ_w = e_θ(x^w) − e_ref(x^w),    Δ_r = e_θ(x^ref) − e_ref(x^ref)
//! s   = sign(e_ref(x^w) − e_θ(x^w)) = −sign(Δ_w)        (no gradient; Δ_w = 0 counts as s = +1)
//! L   = −log σ(−k·ω(t)·(Δ_w − s·Δ_r))                  k = β/2 (official convention) or β (diffusers')
//! ```
//!
//! The **anchor-based adaptive flipper** (`flipper = "sign"`): the winner is the anchor; when the policy
//! already denoises it better than the reference (`s = +1`) the reference is read as the weaker model and
//! `x^ref` is a loser — a Diffusion-DPO pair; otherwise (`s = −1`) `x^ref` is read as winner-like and both
//! images are pushed to be denoised better than by the reference. `"indicator"` replaces `s` by
//! `m = 𝟙(e_ref(x^w) − e_θ(x^w) > 0) ∈ {0, 1}`: `m = 0` drops the reference sample's term, leaving the
//! winner-only `−log σ(−k ω Δ_w)` (the v2 paper's "switch from DPO to SFT"). `"off"` keeps `s = +1`: plain
//! DPO against the reference sample (the paper's ablation without the flipper, SPIN-Diffusion's loss with a
//! random reference). `dead_zone = δ > 0` (a diffpref addition, not the paper's) treats `|Δ_w| < δ` as
//! `s = +1`: early in training `θ ≈ θ_ref` and the test is a coin flip.
//!
//! The flip is applied to the loser's errors (`e(x^ref) → s·e(x^ref)`), so the rest of the Diffusion-DPO
//! family's loss ([`crate::methods::dpo::pair_loss`], `[loss]`: `sigmoid`, `hinge`, `ipo`, `robust`; β; ω(t);
//! `timestep_range`; the SFT and unconditional anchors) applies unchanged: with `s = +1` a SePPO pair is
//! exactly a DPO pair with `x^ref` as the loser.
//!
//! **Metrics** per step: `flip_rate` (the fraction of pairs off the DPO branch: `s = −1`, or `m = 0`) and
//! `dpo_rate` (its complement), `ref_step` (the drawn reference's step, 0 = the base model), `pool_size`,
//! `implicit_acc` (the fraction where the policy prefers the winner over the reference sample relative to the
//! reference, `Δ_w < Δ_r`), the errors; with a `[reward]` also `winner_reward`, `ref_sample_reward` and
//! `flip_agreement` (the fraction of pairs where the flipper's call agrees with the reward: flipped exactly when
//! the reference sample scores at least the winner) and `ref_better_rate` (how often it does): the check the paper
//! never made. A flipper independent of the reward agrees with it at `(1 − f)(1 − q) + f q` for flip rate `f` and
//! `ref_better_rate` `q`.
//!
//! Every random draw comes from serialisable streams (`noise`: timesteps and noise; `data`: crops, caption
//! dropout, VAE posteriors; `sample`: the samples' initial noise; `reference`: the draws from the pool), saved
//! with the data position and the pool in each checkpoint, so a resumed CPU run ends bit-identically.

use crate::config::SchedulerSpec;
use crate::data::cache::ImageId;
use crate::data::preprocess::preprocess_image;
use crate::data::prompt_cycle::PromptCycle;
use crate::data::{
    maybe_drop_caption, DatasetPosition, LatentCache, PreprocessConfig, SkipReport, TextEmbedCache,
    Transform,
};
use crate::engine::config::RunConfig;
use crate::engine::method::{Method, MicroStep, StartContext, StepContext};
use crate::engine::policy::{Policy, Weights};
use crate::engine::run::{train_method, TrainSummary};
use crate::eval::read_prompts;
use crate::methods::dpo::{pair_errors, pair_loss, DpoLossConfig, LossKind, PairBatch, PairErrors};
use crate::methods::pairwise::{
    draw_timesteps_and_noise, embed_prompts, sdxl_added_cond, stored_pair_latents,
    training_latents, unconditional_embeds, DataConfig, TrainData,
};
use crate::scoring::{score_saved_images, RewardSpec};
use crate::train::checkpoint::{save_vars, StopFlag};
use crate::train::lora::LoraFormat;
use crate::train::rng::Rng;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};
use diffpref_pipelines::loading::StableDiffusion;
use diffpref_pipelines::pipeline::{GenerateOptions, Pipeline};
use diffpref_pipelines::schedulers::{NoiseSchedule, SchedulerConfig};
use diffpref_rewards::Reward;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The anchor-based adaptive flipper (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Flipper {
    /// `s = sign(e_ref(x^w) − e_θ(x^w))` (SePPO). Default.
    #[default]
    Sign,
    /// `m = 𝟙(e_ref(x^w) − e_θ(x^w) > 0)`: the reference sample's term is dropped instead of flipped.
    Indicator,
    /// `s = +1`: every reference sample is a loser (the ablation).
    Off,
}

/// Which checkpoint of the pool is the reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReferenceChoice {
    /// Uniform over the pool (random checkpoint replay). Default.
    #[default]
    Random,
    /// Always the base model.
    Base,
    /// Always the newest checkpoint.
    Latest,
}

/// Where the winners come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WinnerSource {
    /// The chosen images of `[data]`'s preference pairs (their losers are ignored). Default.
    #[default]
    Data,
    /// The best of `k` samples of the current policy per training prompt under `[reward]`.
    BestOfK,
}

/// `[seppo]`: the method's settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SeppoSection {
    /// sign | indicator | off. Default sign.
    pub flipper: Flipper,
    /// `|Δ_w| < dead_zone` counts as `s = +1` (MSE units; a diffpref addition). Default 0.
    pub dead_zone: f64,
    /// random | base | latest. Default random.
    pub reference: ReferenceChoice,
    /// A checkpoint joins the pool every this many optimizer steps (the paper: 30). Default 30.
    pub pool_every: u64,
    /// data | best_of_k. Default data.
    pub winners: WinnerSource,
    /// Training prompts, one per line (`winners = "best_of_k"`). Default: none.
    pub prompts: Option<PathBuf>,
    /// Samples per prompt the best is chosen from (`winners = "best_of_k"`). Default 4.
    pub k: usize,
    /// Denoising steps of the reference samples (and best-of-k samples). Default 20.
    pub sample_steps: usize,
    /// Classifier-free guidance of those samples. Default 7.5.
    pub guidance: f64,
    /// Their sampler (ddim, ddpm, euler, euler-a, dpmpp-2m; deterministic ones with η = 0). Default: the
    /// model's scheduler.
    pub scheduler: Option<SchedulerSpec>,
    /// Image side of the samples in pixels with `winners = "best_of_k"` (with `data`, `[data] resolution`).
    /// Default: the UNet's sample size.
    pub resolution: Option<usize>,
}

impl Default for SeppoSection {
    fn default() -> Self {
        SeppoSection {
            flipper: Flipper::Sign,
            dead_zone: 0.0,
            reference: ReferenceChoice::Random,
            pool_every: 30,
            winners: WinnerSource::Data,
            prompts: None,
            k: 4,
            sample_steps: 20,
            guidance: 7.5,
            scheduler: None,
            resolution: None,
        }
    }
}

/// A whole `diffpref train seppo` run: the shared run settings ([`RunConfig`]), `[seppo]`, `[loss]` (the
/// Diffusion-DPO family's settings: kind, β, timesteps, anchors), `[data]` (the winners' preference set) and an
/// optional `[reward]` (the best-of-k winners' reward; with data winners, diagnostics only). See
/// `examples/seppo.toml`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SeppoConfig {
    #[serde(flatten)]
    pub run: RunConfig,
    pub seppo: SeppoSection,
    pub loss: DpoLossConfig,
    pub data: DataConfig,
    pub reward: Option<RewardSpec>,
}

impl SeppoConfig {
    /// Reads a TOML config (or the defaults) and applies `--set key=value` overrides; unknown keys are errors
    /// naming the key.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<SeppoConfig> {
        crate::config::load_toml(path, overrides)
    }

    /// Parses a TOML configuration (`what` names it in errors) and applies `--set` overrides.
    pub fn from_toml(text: &str, what: &str, overrides: &[String]) -> Result<SeppoConfig> {
        crate::config::from_toml(text, what, overrides)
    }

    /// The run folder (`output_dir`, default `runs/seppo`).
    pub fn output_dir(&self) -> PathBuf {
        self.run.output_dir("seppo")
    }

    pub fn validate(&self) -> Result<()> {
        self.run.validate()?;
        self.loss.validate()?;
        let s = &self.seppo;
        ensure!(
            matches!(
                self.loss.kind,
                LossKind::Sigmoid | LossKind::Hinge | LossKind::Ipo | LossKind::Robust
            ),
            "loss.kind = {:?}: SePPO compares the policy with its reference on a winner and a reference sample; \
             use sigmoid, hinge, ipo or robust",
            self.loss.kind
        );
        ensure!(
            s.dead_zone.is_finite() && s.dead_zone >= 0.0,
            "[seppo] dead_zone must be a finite number >= 0 (got {})",
            s.dead_zone
        );
        ensure!(s.pool_every >= 1, "[seppo] pool_every must be at least 1");
        ensure!(
            s.sample_steps >= 1,
            "[seppo] sample_steps must be at least 1"
        );
        ensure!(
            s.guidance.is_finite(),
            "[seppo] guidance must be finite (got {})",
            s.guidance
        );
        if let Some(r) = s.resolution {
            diffpref_pipelines::limits::check_image_size("[seppo] resolution", r as u64, r as u64)?;
        }
        match s.winners {
            WinnerSource::Data => {
                ensure!(
                    self.data.manifest.is_some() || !self.data.parquet.is_empty(),
                    "[seppo] winners = \"data\" needs [data] manifest (JSONL) or parquet (Pick-a-Pic shards): \
                     their chosen images are the winners"
                );
                ensure!(
                    self.data.unpaired_manifest.is_none(),
                    "[data] unpaired_manifest is for KTO; SePPO takes the chosen images of a pair manifest"
                );
                ensure!(
                    s.resolution.is_none() || s.resolution == Some(self.data.resolution as usize),
                    "[seppo] resolution = {:?} differs from [data] resolution = {}: with data winners the \
                     reference samples are drawn at the data's resolution (leave [seppo] resolution unset)",
                    s.resolution,
                    self.data.resolution
                );
                self.data.validate()?;
            }
            WinnerSource::BestOfK => {
                ensure!(
                    s.prompts.is_some(),
                    "[seppo] winners = \"best_of_k\" needs prompts (the training prompts, one per line)"
                );
                ensure!(
                    self.reward.is_some(),
                    "[seppo] winners = \"best_of_k\" needs a [reward] to choose the best sample"
                );
                ensure!(
                    (2..=256).contains(&s.k),
                    "[seppo] k must be 2 to 256 (got {})",
                    s.k
                );
                ensure!(
                    self.run.optim.batch_size.saturating_mul(s.k)
                        <= crate::engine::config::MAX_BATCH,
                    "[seppo] optim.batch_size x k = {} x {}: at most {} samples a micro-batch",
                    self.run.optim.batch_size,
                    s.k,
                    crate::engine::config::MAX_BATCH
                );
            }
        }
        if let Some(r) = &self.reward {
            r.validate("[reward]")?;
        }
        Ok(())
    }
}

/// The flipper's factor per pair for the errors `e_θ(x^w)` (`model_w`) and `e_ref(x^w)` (`ref_w`): `s ∈ {−1,
/// +1}` (sign), `m ∈ {0, 1}` (indicator) or 1 (off), with `|Δ_w| < dead_zone` counting as the DPO branch.
pub fn flip_factors(flipper: Flipper, dead_zone: f64, model_w: &[f32], ref_w: &[f32]) -> Vec<f32> {
    model_w
        .iter()
        .zip(ref_w)
        .map(|(&m, &r)| {
            let delta_w = m as f64 - r as f64;
            let policy_worse = delta_w > 0.0 && delta_w.abs() >= dead_zone;
            match (flipper, policy_worse) {
                (Flipper::Off, _) | (_, false) => 1.0,
                (Flipper::Sign, true) => -1.0,
                (Flipper::Indicator, true) => 0.0,
            }
        })
        .collect()
}

/// A per-pair error vector `[P]` on the host, f32.
fn host_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1()?)
}

/// Scalar statistics of a SePPO batch (means over pairs).
#[derive(Clone, Debug, Default, Serialize)]
pub struct SeppoStats {
    pub loss: f64,
    /// Mean SePPO logit `−k·ω·(Δ_w − s·Δ_r)`.
    pub margin: f64,
    /// Fraction of pairs with `Δ_w < Δ_r` (the DPO branch's implicit accuracy, winner vs reference sample).
    pub implicit_acc: f64,
    /// Fraction of pairs off the DPO branch (`s = −1` or `m = 0`).
    pub flip_rate: f64,
    pub model_mse_w: f64,
    pub model_mse_ref: f64,
    pub ref_mse_w: f64,
    pub ref_mse_ref: f64,
    pub uncond_drift: f64,
}

/// The SePPO loss of the module docs on the errors of `[winners; reference samples]` (`e.model_l`/`e.ref_l`
/// are the reference samples'), with the flipper's `factors` (see [`flip_factors`]): the loser's errors are
/// multiplied by the factor (a constant: no gradient flows through it) and `cfg`'s Diffusion-DPO loss is taken.
pub fn seppo_loss(
    cfg: &DpoLossConfig,
    e: &PairErrors,
    factors: &[f32],
) -> Result<(Tensor, SeppoStats)> {
    let p = e.model_w.dim(0)?;
    ensure!(
        factors.len() == p,
        "{} flip factors for {p} pairs",
        factors.len()
    );
    let (ref_w, ref_l) = match (&e.ref_w, &e.ref_l) {
        (Some(a), Some(b)) => (a.detach(), b.detach()),
        _ => bail!("SePPO needs the reference's errors"),
    };
    let s = Tensor::from_slice(factors, p, e.model_w.device())?;
    let flipped = PairErrors {
        model_l: e.model_l.to_dtype(DType::F32)?.mul(&s)?,
        ref_l: Some(ref_l.to_dtype(DType::F32)?.mul(&s)?),
        ..e.clone()
    };
    let (loss, st) = pair_loss(cfg, &flipped, None)?;
    let v =
        |t: &Tensor| -> Result<Vec<f64>> { Ok(host_vec(t)?.into_iter().map(f64::from).collect()) };
    let (mw, ml, rw, rl) = (v(&e.model_w)?, v(&e.model_l)?, v(&ref_w)?, v(&ref_l)?);
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len().max(1) as f64;
    let acc = (0..p)
        .map(|i| {
            let (dw, dr) = (mw[i] - rw[i], ml[i] - rl[i]);
            if dw < dr {
                1.0
            } else if dw == dr {
                0.5
            } else {
                0.0
            }
        })
        .sum::<f64>()
        / p as f64;
    let stats = SeppoStats {
        loss: st.loss,
        margin: st.margin,
        implicit_acc: acc,
        flip_rate: factors.iter().filter(|&&f| f != 1.0).count() as f64 / p as f64,
        model_mse_w: mean(&mw),
        model_mse_ref: mean(&ml),
        ref_mse_w: mean(&rw),
        ref_mse_ref: mean(&rl),
        uncond_drift: st.uncond_drift,
    };
    Ok((loss, stats))
}

/// A micro-batch's winners.
struct Winners {
    /// Scaled latents `[P, C, h, w]`, f32, detached.
    latents: Tensor,
    /// The prompts the reference samples are drawn for.
    prompts: Vec<String>,
    /// The prompts trained on (after caption dropout).
    train_prompts: Vec<String>,
    /// The crops applied (SDXL micro-conditioning); identity crops for sampled winners.
    transforms: Vec<Transform>,
    /// Rewards of the winners (best-of-k; with data winners only when a reward is set, computed later).
    rewards: Option<Vec<f64>>,
    about: String,
}

/// The resumable state of a run.
#[derive(Serialize, Deserialize)]
struct SeppoState {
    noise_rng: Rng,
    data_rng: Rng,
    sample_rng: Rng,
    reference_rng: Rng,
    position: Option<DatasetPosition>,
    prompts: Option<(u64, usize)>,
    /// Steps of the pool's checkpoints (0 = the base model).
    pool: Vec<u64>,
    ref_step: u64,
    reward_calls: u64,
    samples: u64,
}

/// SePPO as a [`Method`].
pub struct SeppoMethod {
    model: StableDiffusion,
    schedule: NoiseSchedule,
    cfg: SeppoSection,
    loss: DpoLossConfig,
    data_cfg: DataConfig,
    data: Option<TrainData>,
    skipped: SkipReport,
    prompts: Option<PromptCycle>,
    pcfg: PreprocessConfig,
    latent_cache: Option<LatentCache>,
    text_cache: Option<TextEmbedCache>,
    reward: Option<(Box<dyn Reward>, usize)>,
    noise_rng: Rng,
    data_rng: Rng,
    sample_rng: Rng,
    reference_rng: Rng,
    uncond: Option<diffpref_pipelines::loading::PromptEmbeds>,
    t_band: (u64, u64),
    /// Latent side and channels of a training image.
    latent_side: usize,
    latent_channels: usize,
    pool_dir: PathBuf,
    pool: Vec<u64>,
    ref_step: u64,
    reward_calls: u64,
    /// Images sampled (reference samples and best-of-k candidates).
    samples: u64,
}

impl SeppoMethod {
    /// The method on `model` (loaded from `model_dir`), writing its checkpoint pool into `out`.
    pub fn new(
        cfg: &SeppoConfig,
        model: StableDiffusion,
        model_dir: &Path,
        out: &Path,
    ) -> Result<SeppoMethod> {
        cfg.validate()?;
        let sched_cfg = SchedulerConfig::from_file(&model.scheduler_config_path)?;
        let schedule = NoiseSchedule::new(&sched_cfg)?;
        let t_band = cfg
            .loss
            .timestep_band(sched_cfg.num_train_timesteps as u64)?;
        let device = model.device().clone();
        let reward = match &cfg.reward {
            Some(r) => Some((r.load("[reward]", &device)?, r.batch_size)),
            None => None,
        };
        let is_shapes = cfg.reward.as_ref().is_some_and(|r| r.is_shapes());
        let (data, skipped, prompts, side) = match cfg.seppo.winners {
            WinnerSource::Data => {
                let (d, skipped) = TrainData::load(&cfg.data, cfg.run.seed)?;
                let side = cfg.data.resolution as usize / model.vae_scale_factor();
                (Some(d), skipped, None, side)
            }
            WinnerSource::BestOfK => {
                let file = cfg.seppo.prompts.as_ref().context("[seppo] prompts")?;
                let p = read_prompts(file, is_shapes).context("[seppo] prompts")?;
                ensure!(!p.is_empty(), "{}: no prompts", file.display());
                let side = crate::rollout::latent_side(&model, cfg.seppo.resolution)?;
                (
                    None,
                    SkipReport::default(),
                    Some(PromptCycle::new(p, cfg.run.seed, "seppo")),
                    side,
                )
            }
        };
        let model_id = model_dir.display().to_string();
        let (latent_cache, text_cache) = match &cfg.data.cache_dir {
            Some(d) if cfg.seppo.winners == WinnerSource::Data => (
                Some(LatentCache::new(d.join("latents"), &model_id)?),
                Some(TextEmbedCache::new(d.join("text"), &model_id)?),
            ),
            _ => (None, None),
        };
        let uncond = if cfg.loss.uncond_anchor > 0.0 {
            Some(unconditional_embeds(&model)?)
        } else {
            None
        };
        Ok(SeppoMethod {
            latent_side: side,
            latent_channels: model.unet.config().in_channels,
            schedule,
            cfg: cfg.seppo.clone(),
            loss: cfg.loss.clone(),
            data_cfg: cfg.data.clone(),
            data,
            skipped,
            prompts,
            pcfg: PreprocessConfig {
                center_crop: cfg.data.center_crop,
                random_flip: cfg.data.random_flip,
                ..PreprocessConfig::new(cfg.data.resolution)
            },
            latent_cache,
            text_cache,
            reward,
            noise_rng: Rng::derive(cfg.run.seed, "noise"),
            data_rng: Rng::derive(cfg.run.seed, "data"),
            sample_rng: Rng::derive(cfg.run.seed, "seppo-sample"),
            reference_rng: Rng::derive(cfg.run.seed, "seppo-reference"),
            uncond,
            t_band,
            pool_dir: out.join("seppo-pool"),
            pool: vec![0],
            ref_step: 0,
            reward_calls: 0,
            samples: 0,
            model,
        })
    }

    /// The file of the pool's checkpoint of `step` (> 0).
    pub fn pool_file(&self, step: u64) -> PathBuf {
        self.pool_dir.join(format!("step-{step:06}.safetensors"))
    }

    /// The steps of the pool's checkpoints (0 = the base model).
    pub fn pool(&self) -> &[u64] {
        &self.pool
    }

    /// Samples `prompts` with `which` weights from fresh initial noise of the `sample` stream: the final latents
    /// `[N, C, h, w]` (f32, detached) and the images in [0, 1].
    fn sample(
        &mut self,
        policy: &Policy,
        which: Weights,
        prompts: &[&str],
    ) -> Result<(Tensor, Tensor)> {
        let n = prompts.len();
        let side = self.latent_side;
        let device = self.model.device().clone();
        let init = self
            .sample_rng
            .normal_tensor(&[n, self.latent_channels, side, side], &device)?;
        let pixels = side * self.model.vae_scale_factor();
        let opts = GenerateOptions {
            steps: self.cfg.sample_steps,
            guidance_scale: self.cfg.guidance,
            scheduler: self.cfg.scheduler.map(|s| s.0),
            width: Some(pixels),
            height: Some(pixels),
            init_latents: Some(init),
            ..Default::default()
        };
        let out = policy.with_weights(&mut self.model, which, |m| {
            Ok(Pipeline::new(m)?.generate(prompts, &[], &opts, None)?)
        })?;
        self.samples += n as u64;
        Ok((
            out.latents.to_dtype(DType::F32)?.detach(),
            out.images.detach(),
        ))
    }

    /// Scores images with the `[reward]` (8-bit, as saved).
    fn score(&mut self, images: &Tensor, prompts: &[&str]) -> Result<Vec<f64>> {
        let (reward, batch) = self.reward.as_ref().context("no [reward]")?;
        let s = score_saved_images(reward.as_ref(), images, prompts, *batch).context("[reward]")?;
        self.reward_calls += prompts.len() as u64;
        Ok(s)
    }

    /// `bs` chosen images of the preference set (their losers ignored).
    fn data_winners(&mut self, bs: usize) -> Result<Winners> {
        let Some(TrainData::Pairs(dataset)) = &mut self.data else {
            bail!("SePPO's data winners need a pair dataset")
        };
        let pairs = dataset.next_batch(bs)?;
        let p = pairs.len();
        let stored = stored_pair_latents(
            self.data_cfg.stored_latents,
            &pairs,
            self.latent_channels,
            self.latent_side,
            self.data_cfg.random_flip,
        )?;
        let mut pre = Vec::with_capacity(p);
        for x in &pairs {
            pre.push(
                preprocess_image(&x.chosen, &self.pcfg, &mut self.data_rng)
                    .with_context(|| format!("pair {}", x.source))?,
            );
        }
        let model = &self.model;
        let device = model.device().clone();
        let latents = match stored {
            Some(z) => z.narrow(0, 0, p)?.to_device(&device)?,
            None => {
                let images: Vec<&Tensor> = pre.iter().map(|x| &x.0).collect();
                let images = Tensor::stack(&images, 0)?
                    .to_device(&device)?
                    .to_dtype(model.dtype())?;
                let ids: Vec<(ImageId, &Transform)> = pairs
                    .iter()
                    .zip(&pre)
                    .map(|(x, pp)| (ImageId::Bytes(x.chosen.as_raw()), &pp.1))
                    .collect();
                training_latents(
                    model,
                    self.latent_cache.as_ref(),
                    &images,
                    &ids,
                    self.data_cfg.vae_posterior,
                    &mut self.data_rng,
                )?
            }
        };
        let prompts: Vec<String> = pairs.iter().map(|x| x.prompt.clone()).collect();
        let train_prompts = prompts
            .iter()
            .map(|x| {
                maybe_drop_caption(x, self.data_cfg.caption_dropout, &mut self.data_rng).to_string()
            })
            .collect();
        Ok(Winners {
            latents: latents.to_dtype(DType::F32)?.detach(),
            prompts,
            train_prompts,
            transforms: pre.into_iter().map(|x| x.1).collect(),
            rewards: None,
            about: format!(
                "pairs {}",
                pairs
                    .iter()
                    .map(|x| x.source.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }

    /// `bs` training prompts, each with the best of `k` samples of the current policy under `[reward]`.
    fn best_of_k(&mut self, policy: &Policy, bs: usize) -> Result<Winners> {
        let k = self.cfg.k;
        let cycle = self.prompts.as_mut().context("[seppo] prompts")?;
        let prompts: Vec<String> = (0..bs).map(|_| cycle.next_prompt()).collect();
        let rows: Vec<&str> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.as_str(), k))
            .collect();
        let (latents, images) = self.sample(policy, Weights::Current, &rows)?;
        let scores = self.score(&images, &rows)?;
        let mut best = Vec::with_capacity(bs);
        let mut rewards = Vec::with_capacity(bs);
        for g in 0..bs {
            let group = &scores[g * k..(g + 1) * k];
            // The first of equal scores (deterministic).
            let (j, r) =
                group
                    .iter()
                    .enumerate()
                    .fold((0, f64::NEG_INFINITY), |(bj, br), (j, &r)| {
                        if r > br {
                            (j, r)
                        } else {
                            (bj, br)
                        }
                    });
            best.push((g * k + j) as u32);
            rewards.push(r);
        }
        let idx = Tensor::new(best.as_slice(), latents.device())?;
        let pixels = (self.latent_side * self.model.vae_scale_factor()) as u32;
        Ok(Winners {
            latents: latents.index_select(&idx, 0)?,
            train_prompts: prompts.clone(),
            about: format!("prompts {}", prompts.join(" | ")),
            prompts,
            transforms: vec![
                Transform {
                    original_size: (pixels, pixels),
                    resized_size: (pixels, pixels),
                    crop_top: 0,
                    crop_left: 0,
                    flip: false,
                    resolution: pixels,
                };
                bs
            ],
            rewards: Some(rewards),
        })
    }
}

impl Method for SeppoMethod {
    fn name(&self) -> &str {
        "seppo"
    }

    fn unit(&self) -> &str {
        "pairs"
    }

    fn headline_metric(&self) -> Option<&'static str> {
        Some("flip_rate")
    }

    fn on_start(&mut self, ctx: StartContext<'_>) -> Result<()> {
        if self.skipped.count > 0 {
            eprintln!("skipped {} bad rows", self.skipped.count);
            ctx.metrics.write(
                &serde_json::json!({"step": ctx.start_step, "skipped_rows": self.skipped.count}),
            )?;
        }
        for &s in &self.pool[1..] {
            let f = self.pool_file(s);
            ensure!(
                f.is_file(),
                "the checkpoint pool lists step {s}, but {} is missing (was the run folder changed?)",
                f.display()
            );
        }
        Ok(())
    }

    fn before_step(&mut self, ctx: &StepContext<'_>) -> Result<Vec<(&'static str, f64)>> {
        let n = self.pool.len();
        let j = match self.cfg.reference {
            ReferenceChoice::Random => self.reference_rng.below(n as u64) as usize,
            ReferenceChoice::Base => 0,
            ReferenceChoice::Latest => n - 1,
        };
        self.ref_step = self.pool[j];
        let file = (self.ref_step > 0).then(|| self.pool_file(self.ref_step));
        ctx.policy
            .set_reference_snapshot(&self.model.unet, file.as_deref())
            .context("setting the reference from the checkpoint pool")?;
        Ok(vec![
            ("ref_step", self.ref_step as f64),
            ("pool_size", n as f64),
        ])
    }

    fn micro_step(&mut self, ctx: &StepContext<'_>) -> Result<MicroStep> {
        let policy = ctx.policy;
        let bs = ctx.batch_size;
        let w = match self.cfg.winners {
            WinnerSource::Data => self.data_winners(bs)?,
            WinnerSource::BestOfK => self.best_of_k(policy, bs)?,
        };
        let p = w.prompts.len();
        let prompts: Vec<&str> = w.prompts.iter().map(|s| s.as_str()).collect();
        let (ref_latents, ref_images) = self.sample(policy, Weights::Reference, &prompts)?;
        let mut metrics = Vec::new();
        // With a reward: whether each reference sample scores at least its winner (for `flip_agreement`).
        let mut ref_better: Option<Vec<bool>> = None;
        if self.reward.is_some() {
            let winner_rewards = match &w.rewards {
                Some(r) => r.clone(),
                None => {
                    let images = self
                        .model
                        .vae
                        .decode_to_image01(&w.latents.to_dtype(self.model.dtype())?)?
                        .to_dtype(DType::F32)?;
                    self.score(&images, &prompts)?
                }
            };
            let ref_rewards = self.score(&ref_images, &prompts)?;
            metrics.push((
                "winner_reward",
                winner_rewards.iter().sum::<f64>() / p as f64,
            ));
            metrics.push((
                "ref_sample_reward",
                ref_rewards.iter().sum::<f64>() / p as f64,
            ));
            ref_better = Some(
                ref_rewards
                    .iter()
                    .zip(&winner_rewards)
                    .map(|(r, w)| r >= w)
                    .collect(),
            );
        }
        let model = &self.model;
        let device = model.device().clone();
        let train_prompts: Vec<&str> = w.train_prompts.iter().map(|s| s.as_str()).collect();
        let embeds = embed_prompts(model, self.text_cache.as_ref(), &train_prompts)?;
        let transforms: Vec<&Transform> = w.transforms.iter().collect();
        let added = sdxl_added_cond(model, &embeds, &transforms, model.dtype())?;
        let (t, noise) =
            draw_timesteps_and_noise(&mut self.noise_rng, self.t_band, w.latents.dims(), &device)?;
        let batch = PairBatch {
            latents_w: &w.latents,
            latents_l: &ref_latents,
            noise: &noise,
            timesteps: &t,
            encoder_hidden_states: &embeds.hidden_states.detach(),
            added: added.as_ref(),
            uncond: self.uncond.as_ref(),
        };
        let reference = policy
            .reference()
            .context("SePPO needs a reference model (LoRA or full fine-tuning)")?;
        let errors = pair_errors(
            &model.unet,
            Some(&reference),
            &self.schedule,
            self.loss.timestep_weighting,
            &batch,
        )?;
        let mw = host_vec(&errors.model_w)?;
        let rw = host_vec(errors.ref_w.as_ref().context("reference errors")?)?;
        let factors = flip_factors(self.cfg.flipper, self.cfg.dead_zone, &mw, &rw);
        let (loss, st) = seppo_loss(&self.loss, &errors, &factors)?;
        if let Some(better) = ref_better {
            let agree = better
                .iter()
                .zip(&factors)
                .filter(|(&b, &f)| b == (f != 1.0))
                .count();
            metrics.push(("flip_agreement", agree as f64 / p as f64));
            let better = better.iter().filter(|&&b| b).count();
            metrics.push(("ref_better_rate", better as f64 / p as f64));
        }
        let mut all = vec![
            ("flip_rate", st.flip_rate),
            ("dpo_rate", 1.0 - st.flip_rate),
            ("implicit_acc", st.implicit_acc),
            ("seppo_margin", st.margin),
            ("model_mse_w", st.model_mse_w),
            ("model_mse_ref", st.model_mse_ref),
            ("ref_mse_w", st.ref_mse_w),
            ("ref_mse_ref", st.ref_mse_ref),
            ("uncond_drift", st.uncond_drift),
        ];
        all.extend(metrics);
        Ok(MicroStep {
            loss,
            metrics: all,
            units: p,
            about: w.about,
        })
    }

    fn after_step(&mut self, ctx: &StepContext<'_>) -> Result<Vec<(&'static str, f64)>> {
        let done = ctx.step + 1;
        if done.is_multiple_of(self.cfg.pool_every) && done < ctx.max_steps {
            let file = self.pool_file(done);
            std::fs::create_dir_all(&self.pool_dir)
                .with_context(|| format!("cannot create {}", self.pool_dir.display()))?;
            match ctx.policy.lora_set() {
                Some(l) => l.save(&file, LoraFormat::Peft)?,
                None => save_vars(&file, ctx.policy.params())?,
            }
            if !self.pool.contains(&done) {
                self.pool.push(done);
            }
        }
        Ok(vec![
            ("samples", self.samples as f64),
            ("reward_calls", self.reward_calls as f64),
        ])
    }

    fn report(&self) -> serde_json::Value {
        serde_json::json!({
            "reward_calls": self.reward_calls,
            "samples": self.samples,
            "pool": self.pool,
        })
    }

    fn state(&self) -> Result<serde_json::Value> {
        Ok(serde_json::to_value(SeppoState {
            noise_rng: self.noise_rng.clone(),
            data_rng: self.data_rng.clone(),
            sample_rng: self.sample_rng.clone(),
            reference_rng: self.reference_rng.clone(),
            position: self.data.as_ref().map(|d| d.position()),
            prompts: self.prompts.as_ref().map(|c| c.position()),
            pool: self.pool.clone(),
            ref_step: self.ref_step,
            reward_calls: self.reward_calls,
            samples: self.samples,
        })?)
    }

    fn load_state(&mut self, state: serde_json::Value) -> Result<()> {
        let s: SeppoState = serde_json::from_value(state)?;
        ensure!(
            s.pool.first() == Some(&0),
            "the checkpoint pool must start with the base model (step 0); got {:?}",
            s.pool
        );
        self.noise_rng = s.noise_rng;
        self.data_rng = s.data_rng;
        self.sample_rng = s.sample_rng;
        self.reference_rng = s.reference_rng;
        if let (Some(d), Some(pos)) = (self.data.as_mut(), s.position) {
            d.seek(pos)?;
        }
        if let (Some(c), Some((e, i))) = (self.prompts.as_mut(), s.prompts) {
            c.seek(e, i);
        }
        self.pool = s.pool;
        self.ref_step = s.ref_step;
        self.reward_calls = s.reward_calls;
        self.samples = s.samples;
        Ok(())
    }

    fn model(&mut self) -> Option<&mut StableDiffusion> {
        Some(&mut self.model)
    }
}

/// Runs (or resumes) a `train seppo` run. `stop` (e.g. from Ctrl-C) makes it save a checkpoint and return early.
pub fn train(cfg: &SeppoConfig, stop: Option<StopFlag>) -> Result<TrainSummary> {
    cfg.validate()?;
    let mut inputs = Vec::new();
    if cfg.seppo.winners == WinnerSource::Data {
        if let Some(m) = &cfg.data.manifest {
            inputs.push(crate::output::Input::new("[data] manifest", m));
        }
        for p in &cfg.data.parquet {
            inputs.push(crate::output::Input::new("[data] parquet file", p));
        }
    }
    if let Some(p) = &cfg.seppo.prompts {
        inputs.push(crate::output::Input::new("[seppo] prompts file", p));
    }
    let out = cfg.output_dir();
    train_method(
        &cfg.run,
        &out,
        "train seppo",
        &inputs,
        serde_json::to_value(cfg)?,
        stop,
        |model, model_dir| SeppoMethod::new(cfg, model, model_dir, &out),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn the_flipper_follows_the_anchor_test() {
        // Δ_w = e_θ(x^w) − e_ref(x^w): −0.1 (policy better), +0.2 (worse), 0 (tie), +0.01 (worse, small).
        let mw = [0.9, 1.2, 1.0, 1.01];
        let rw = [1.0, 1.0, 1.0, 1.0];
        assert_eq!(
            flip_factors(Flipper::Sign, 0.0, &mw, &rw),
            vec![1.0, -1.0, 1.0, -1.0]
        );
        assert_eq!(
            flip_factors(Flipper::Indicator, 0.0, &mw, &rw),
            vec![1.0, 0.0, 1.0, 0.0]
        );
        assert_eq!(
            flip_factors(Flipper::Off, 0.0, &mw, &rw),
            vec![1.0, 1.0, 1.0, 1.0]
        );
        // The dead zone keeps |Δ_w| < 0.05 on the DPO branch.
        assert_eq!(
            flip_factors(Flipper::Sign, 0.05, &mw, &rw),
            vec![1.0, -1.0, 1.0, 1.0]
        );
    }

    /// −log σ(x).
    fn nls(x: f64) -> f64 {
        (1.0 + (-x).exp()).ln()
    }

    #[test]
    fn seppo_loss_is_dpo_flipped_or_winner_only_with_no_gradient_through_the_flip() {
        // Two pairs: errors of the policy (vars) and the reference on the winner and the reference sample.
        let mw = Var::from_tensor(&t(&[0.30, 0.52])).unwrap();
        let ml = Var::from_tensor(&t(&[0.41, 0.44])).unwrap();
        let (rw, rl) = ([0.31f32, 0.50], [0.40f32, 0.45]);
        let e = PairErrors {
            model_w: mw.as_tensor().clone(),
            model_l: ml.as_tensor().clone(),
            ref_w: Some(t(&rw)),
            ref_l: Some(t(&rl)),
            weight: t(&[1.0, 1.0]),
            uncond_drift: None,
        };
        let cfg = DpoLossConfig {
            beta: 100.0,
            ..Default::default()
        };
        let k = 50.0; // β/2, the official convention
        let dw = [0.30 - 0.31, 0.52 - 0.50];
        let dr = [0.41 - 0.40, 0.44 - 0.45];
        let factors = flip_factors(
            Flipper::Sign,
            0.0,
            &e.model_w.to_vec1::<f32>().unwrap(),
            &rw,
        );
        assert_eq!(factors, vec![1.0, -1.0]);
        let (loss, stats) = seppo_loss(&cfg, &e, &factors).unwrap();
        // Pair 0: s = +1, the Diffusion-DPO pair; pair 1: s = −1, both images positive.
        let want = (nls(-k * (dw[0] - dr[0])) + nls(-k * (dw[1] + dr[1]))) / 2.0;
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        assert_eq!(stats.flip_rate, 0.5);
        // Implicit accuracy of the DPO form: Δ_w < Δ_r for pair 0 only.
        assert_eq!(stats.implicit_acc, 0.5);
        // s = +1 on both is exactly pair_loss with the reference sample as the loser.
        let (dpo, _) = pair_loss(&cfg, &e, None).unwrap();
        let (same, _) = seppo_loss(&cfg, &e, &[1.0, 1.0]).unwrap();
        assert_eq!(
            dpo.to_scalar::<f32>().unwrap(),
            same.to_scalar::<f32>().unwrap()
        );
        // Gradients: ∂L/∂e_θ(x^ref) is −k σ(−z)/P for s = +1 (descent raises the error: a loser) and
        // +k σ(−z)/P for s = −1 (descent lowers it: a positive); the flip is a constant.
        let g = loss.backward().unwrap();
        let gl = g.get(ml.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let z0 = -k * (dw[0] - dr[0]);
        let z1 = -k * (dw[1] + dr[1]);
        assert!((gl[0] as f64 + k * sig(-z0) / 2.0).abs() < 1e-3, "{gl:?}");
        assert!((gl[1] as f64 - k * sig(-z1) / 2.0).abs() < 1e-3, "{gl:?}");
        // Indicator: m = 0 drops the reference sample's term (no gradient reaches it), leaving −log σ(−k Δ_w).
        let (ind, _) = seppo_loss(&cfg, &e, &[1.0, 0.0]).unwrap();
        let want = (nls(-k * (dw[0] - dr[0])) + nls(-k * dw[1])) / 2.0;
        let got = ind.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        let g = ind.backward().unwrap();
        let gl = g.get(ml.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(gl[1], 0.0);
        assert!(gl[0] < 0.0);
    }
}
