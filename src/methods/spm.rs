//! `diffpref train spm`: trains a step-aware preference model ([`StepAwarePreferenceModel`], SPO's §3.1; code
//! `RockeyCoss/SPO`, `step_aware_preference_model/trainer/tasks/spm_task.py`) on preference pairs at random
//! noise levels:
//!
//! ```text
//! t ~ U{0 … T−1}                 one per pair (`timestep_grid = S`: the S-point grid instead)
//! x_t^i = √ᾱ_t z^i + √(1−ᾱ_t) ε  the SAME ε for both images of the pair (the code's `get_noised_imgs`)
//! x̂₀^i = (x_t^i − √(1−ᾱ_t) ε̂_w(x_t^i, t, p)) / √ᾱ_t        the frozen diffusion model, CFG w (the paper: 5)
//! s^i  = SPM(decode(x̂₀^i), p, t)
//! ℓ    = −[y log σ(s^w − s^l) + (1 − y) log σ(s^l − s^w)]   (PickScore's pair loss; y = ½ for ties)
//! ```
//!
//! The whole CLIP (text tower included) and the timestep conditioning are trained, as the paper's. The
//! per-prompt weighting of the code is not used: every pair weighs the same.
//!
//! Data, the loop, checkpoints and the per-band held-out accuracy are `train lrm`'s
//! ([`crate::methods::lrm`]): `[data]` (a JSONL manifest or Pick-a-Pic parquet) or, in the shapes world,
//! `[pairs]` made from the diffusion model's samples labelled by the ground truth; `[eval]` bands with Wilson
//! intervals, before and after, in `spm_eval.json`. The trained model is written to `<output_dir>/spm`, loadable
//! by `score --reward spm --weights DIR` and `train spo`.

use crate::config::DeviceSpec;
use crate::engine::config::{LogConfig, OptimConfig};
use crate::methods::lrm::{
    train_pair_rm, LrmEvalConfig, MakePairsConfig, PairRmRun, PairRmSummary, StepRewardModel,
};
use crate::methods::pairwise::DataConfig;
use crate::rollout::{guided_output, Conditioning};
use crate::train::checkpoint::StopFlag;
use crate::train::rng::Rng;
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use diffpref_pipelines::loading::{LoadOptions, StableDiffusion};
use diffpref_pipelines::schedulers::{NoiseSchedule, SchedulerConfig};
use diffpref_rewards::spm::{ScratchTower, SpmBackbone, StepAwarePreferenceModel};
use diffpref_rewards::Reward;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `[spm]`: the model and how it is trained.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpmSection {
    /// A CLIP-family folder to start from (a transformers `CLIPModel` such as PickScore_v1, or open_clip);
    /// every weight is trained. Give this or `[spm.scratch]`.
    pub clip: Option<PathBuf>,
    /// A tokenizer folder for a `clip` that ships none (open_clip checkpoints).
    pub tokenizer: Option<PathBuf>,
    /// A new image tower next to the diffusion model's CLIP text encoder (the shapes world).
    pub scratch: Option<ScratchTower>,
    /// Classifier-free guidance of the diffusion model's x̂₀ prediction. Default 5 (the paper).
    pub guidance: f64,
    /// Training timesteps: 0 = uniform over [0, T) (the paper); S > 0 = the S-point grid {1, 1 + T/S, …}.
    /// Default 0.
    pub timestep_grid: usize,
}

impl Default for SpmSection {
    fn default() -> Self {
        SpmSection {
            clip: None,
            tokenizer: None,
            scratch: None,
            guidance: 5.0,
            timestep_grid: 0,
        }
    }
}

/// A whole `diffpref train spm` run. See `examples/spm.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpmConfig {
    /// The diffusion model whose x̂₀ the SPM scores (its UNet predicts, its VAE encodes and decodes).
    /// Required.
    pub model: String,
    /// Run folder (checkpoints, metrics, `spm/`, `spm_eval.json`). Default `runs/spm`.
    pub output_dir: Option<PathBuf>,
    pub seed: u64,
    pub device: DeviceSpec,
    /// Continue from the latest checkpoint. Default true.
    pub resume: bool,
    /// Write into a non-empty `output_dir` not written by `train spm`. Default false.
    pub overwrite: bool,
    pub spm: SpmSection,
    pub data: DataConfig,
    /// Make the training pairs first (shapes world). Default: none (use `[data]`).
    pub pairs: Option<MakePairsConfig>,
    pub optim: OptimConfig,
    pub log: LogConfig,
    pub eval: LrmEvalConfig,
}

impl Default for SpmConfig {
    fn default() -> Self {
        SpmConfig {
            model: String::new(),
            output_dir: None,
            seed: 0,
            device: DeviceSpec::Cpu,
            resume: true,
            overwrite: false,
            spm: SpmSection::default(),
            data: DataConfig::default(),
            pairs: None,
            optim: OptimConfig::default(),
            log: LogConfig::default(),
            eval: LrmEvalConfig::default(),
        }
    }
}

impl SpmConfig {
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<SpmConfig> {
        crate::config::load_toml(path, overrides)
    }

    pub fn from_toml(text: &str, what: &str, overrides: &[String]) -> Result<SpmConfig> {
        crate::config::from_toml(text, what, overrides)
    }

    pub fn output_dir(&self) -> PathBuf {
        self.output_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs/spm"))
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.model.is_empty(),
            "`model` (the diffusion model whose x0 predictions the SPM scores) is required"
        );
        let s = &self.spm;
        match (&s.clip, &s.scratch) {
            (Some(_), Some(_)) => {
                anyhow::bail!("[spm] give either clip (a CLIP folder) or [spm.scratch], not both")
            }
            (None, None) => anyhow::bail!(
                "[spm] needs a backbone: clip = \"<a CLIP folder>\" (e.g. PickScore_v1), or [spm.scratch] (a new \
                 image tower)"
            ),
            _ => {}
        }
        if let Some(t) = &s.scratch {
            ensure!(
                t.patch_size > 0 && t.image_size > 0 && t.image_size.is_multiple_of(t.patch_size),
                "[spm.scratch] image_size ({}) must be a positive multiple of patch_size ({})",
                t.image_size,
                t.patch_size
            );
            ensure!(
                t.heads > 0 && t.width.is_multiple_of(t.heads) && t.layers > 0,
                "[spm.scratch] width ({}) must be a multiple of heads ({}), layers >= 1",
                t.width,
                t.heads
            );
        }
        ensure!(
            s.guidance.is_finite() && s.guidance >= 0.0,
            "[spm] guidance must be finite and >= 0 (got {})",
            s.guidance
        );
        ensure!(
            s.timestep_grid <= 1000,
            "[spm] timestep_grid must be 0 (uniform) or a grid of at most 1000 points (got {})",
            s.timestep_grid
        );
        // The data, pairs and evaluation are validated as train lrm's.
        crate::methods::lrm::validate_pair_sources(
            &self.optim,
            &self.data,
            self.pairs.as_ref(),
            &self.eval,
        )
    }
}

/// An SPM with the diffusion model that makes its inputs: a [`StepRewardModel`] on noisy latents.
pub struct SpmOnLatents {
    pub spm: StepAwarePreferenceModel,
    /// The frozen diffusion model (x̂₀ and the decoder).
    pub diffusion: StableDiffusion,
    schedule: NoiseSchedule,
    /// As a [`Reward`]: the timestep images are scored at ([`SpmOnLatents::score_images_at`]) and the seed of
    /// their noise.
    pub reward_timestep: f64,
    pub noise_seed: u64,
}

impl SpmOnLatents {
    /// `spm` with the diffusion model its config names, loaded in `dtype` (f32 for training).
    pub fn new(spm: StepAwarePreferenceModel, dtype: DType) -> Result<SpmOnLatents> {
        let dir = spm.config.diffusion_model.clone();
        let device = spm.clip.device().clone();
        let diffusion = StableDiffusion::load(
            &dir,
            &LoadOptions {
                dtype,
                device,
                variant: None,
            },
        )
        .with_context(|| {
            format!(
                "loading the SPM's diffusion model {} (spm_config.json diffusion_model)",
                dir.display()
            )
        })?;
        let schedule = NoiseSchedule::new(&SchedulerConfig::from_file(
            &diffusion.scheduler_config_path,
        )?)?;
        Ok(SpmOnLatents {
            spm,
            diffusion,
            schedule,
            reward_timestep: 0.0,
            noise_seed: 0,
        })
    }

    /// The decoded x̂₀ `[B, 3, H, W]` in [0, 1] (no graph) of noisy latents `x_t` at timesteps `t` (`[B]`).
    pub fn predicted_images(&self, x_t: &Tensor, t: &Tensor, prompts: &[&str]) -> Result<Tensor> {
        let m = &self.diffusion;
        let w = self.spm.config.guidance;
        let side = x_t.dim(2)? * m.vae_scale_factor();
        let cond = Conditioning::new(m, prompts, w, side)?;
        let x = x_t.to_dtype(DType::F32)?;
        let eps = guided_output(&m.unet, &x, t, &cond, w)?.detach();
        let x0 = self.schedule.pred_original_sample(&eps, &x, t)?;
        Ok(m.vae
            .decode_to_image01(&x0.to_dtype(m.dtype())?)?
            .to_dtype(DType::F32)?
            .detach())
    }

    /// The scores of clean images `[B, 3, H, W]` in [0, 1] at timestep `t`: at t = 0 the images themselves,
    /// else their latents noised with seeded noise (image `i`: seed `seed + i`) and the x̂₀ predicted from them.
    pub fn score_images_at(
        &self,
        images: &Tensor,
        prompts: &[&str],
        t: f64,
        seed: u64,
    ) -> Result<Tensor> {
        let dev = self.spm.clip.device().clone();
        let b = images.dim(0)?;
        let tt = Tensor::full(t as f32, b, &dev)?;
        if t <= 0.0 {
            return Ok(self.spm.score_images(images, prompts, &tt)?);
        }
        let z = diffpref_rewards::lrm::vae_latents(&self.diffusion, &images.to_device(&dev)?)?;
        let mut shape = z.dims().to_vec();
        shape[0] = 1;
        let noise = (0..b)
            .map(|i| diffpref_pipelines::pipeline::seeded_noise(seed + i as u64, &shape, &dev))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let noise = Tensor::cat(&noise, 0)?.to_dtype(DType::F32)?;
        let x_t = self.schedule.add_noise(&z, &noise, &tt)?;
        let x0 = self.predicted_images(&x_t, &tt, prompts)?;
        Ok(self.spm.score_images(&x0, prompts, &tt)?)
    }
}

impl Reward for SpmOnLatents {
    fn name(&self) -> &str {
        "spm"
    }

    fn score(&self, images: &Tensor, prompts: &[&str]) -> diffpref_rewards::Result<Tensor> {
        self.score_images_at(images, prompts, self.reward_timestep, self.noise_seed)
            .map_err(|e| diffpref_rewards::Error::msg(format!("{e:#}")))
    }
}

impl StepRewardModel for SpmOnLatents {
    fn diffusion(&self) -> &StableDiffusion {
        &self.diffusion
    }

    fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    fn score_noisy(&self, x_t: &Tensor, t: &Tensor, prompts: &[&str]) -> Result<Tensor> {
        let images = self.predicted_images(x_t, t, prompts)?;
        Ok(self.spm.score_images(&images, prompts, t)?)
    }

    fn shared_noise(&self) -> bool {
        true
    }

    fn metrics(&self) -> Result<Vec<(&'static str, f64)>> {
        Ok(vec![(
            "logit_scale",
            self.spm.scale()?.to_scalar::<f32>()?.ln() as f64,
        )])
    }

    fn trainable_vars(&self) -> Vec<(String, candle_core::Var)> {
        self.spm.trainable_vars()
    }

    fn save(&self, dir: &Path) -> Result<()> {
        Ok(self.spm.save(dir)?)
    }

    fn describe(&self) -> String {
        format!(
            "spm: {} on x0 of {} (guidance {})",
            self.spm.clip.source,
            self.spm.config.diffusion_model.display(),
            self.spm.config.guidance
        )
    }
}

/// Runs (or resumes) `train spm`.
pub fn train(cfg: &SpmConfig, stop: Option<StopFlag>) -> Result<PairRmSummary> {
    cfg.validate()?;
    let s = &cfg.spm;
    let mut inputs = Vec::new();
    if let Some(c) = &s.clip {
        inputs.push(("[spm] clip", c.clone()));
    }
    if let Some(t) = &s.tokenizer {
        inputs.push(("[spm] tokenizer", t.clone()));
    }
    let run = PairRmRun {
        name: "spm",
        model: &cfg.model,
        output_dir: cfg.output_dir(),
        seed: cfg.seed,
        device: &cfg.device,
        resume: cfg.resume,
        overwrite: cfg.overwrite,
        data: &cfg.data,
        pairs: cfg.pairs.as_ref(),
        optim: &cfg.optim,
        log: &cfg.log,
        eval: &cfg.eval,
        timestep_grid: s.timestep_grid,
        config: serde_json::to_value(cfg)?,
        inputs,
    };
    train_pair_rm(
        run,
        |diffusion: &Path, device: &Device| {
            let backbone = match (&s.clip, &s.scratch) {
                (Some(c), _) => SpmBackbone::Clip {
                    path: c.clone(),
                    tokenizer: s.tokenizer.clone(),
                },
                (None, Some(t)) => SpmBackbone::Scratch(t.clone()),
                (None, None) => unreachable!("validated"),
            };
            let spm = StepAwarePreferenceModel::new_trainable(
                &backbone,
                diffusion,
                s.guidance,
                Rng::derive(cfg.seed, "spm-init").next_u64(),
                device,
            )
            .with_context(|| match &s.clip {
                Some(c) => format!("[spm] clip = {}", c.display()),
                None => "[spm.scratch]".to_string(),
            })?;
            SpmOnLatents::new(spm, DType::F32)
        },
        stop,
    )
}
