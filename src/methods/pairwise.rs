//! `diffpref train dpo`: Diffusion-DPO and the rest of its loss family ([`crate::methods::dpo`]) on preference
//! pairs (JSONL manifests or Pick-a-Pic parquet shards) or, for KTO, unpaired samples, as a [`Method`] of the
//! [training engine](crate::engine): LoRA or full fine-tuning, AdamW, LR schedules, clipping, accumulation,
//! EMA, resumable checkpoints, metrics, validation grids and held-out evaluation come from the engine.
//!
//! One micro-batch: `batch_size` pairs get one shared crop/flip, are encoded by the VAE (a fresh posterior
//! sample each time, as the official code; or the stored sampler latents the manifest names), each pair draws
//! one timestep `t ~ U{lo..hi−1}` and one noise `ε` shared by winner and loser, the policy (with graph) and the
//! reference (adapters off, or the frozen copy) predict on `[winners; losers]`, and the loss of
//! [`crate::methods::dpo::pair_loss`] is returned to the engine, which backpropagates it into the trainable
//! parameters only.
//!
//! Every random draw comes from two serialisable streams (`noise`: timesteps and noise; `data`: crops, flips,
//! caption dropout, VAE posterior samples) and the dataset position is saved with each checkpoint, so a resumed
//! CPU run ends with weights identical to an uninterrupted one.

use crate::data::cache::{encode_posteriors, ImageId};
use crate::data::preprocess::preprocess_image;
use crate::data::{
    load_manifest, load_unpaired_manifest, maybe_drop_caption, preprocess_pair, CachedLatent,
    DatasetPosition, LatentCache, ManifestOptions, PairDataset, PairSource, PickapicIndex,
    PickapicOptions, PreprocessConfig, SkipReport, TextEmbedCache, Transform, UnpairedSample,
};
use crate::engine::config::RunConfig;
use crate::engine::method::{Method, MicroStep, StartContext, StepContext};
use crate::engine::policy::Policy;
use crate::engine::run::{load_model, load_policy, run, TrainSummary};
use crate::methods::dpo::{
    kto_unpaired_loss, pair_errors, pair_loss, single_errors, DpoLossConfig, DpoStats, LossKind,
    PairBatch,
};
use crate::train::checkpoint::StopFlag;
use crate::train::lora::{LoadMode, LoraSet};
use crate::train::rng::Rng;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use diffpref_pipelines::loading::{resolve_model, LoadOptions, PromptEmbeds, StableDiffusion};
use diffpref_pipelines::models::unet::AddedCond;
use diffpref_pipelines::schedulers::{NoiseSchedule, SchedulerConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `[data]`: where the pairs come from and how images are prepared.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// JSONL manifest `{"prompt", "chosen", "rejected"[, "label"]}` (paths relative to it). Default: none.
    pub manifest: Option<PathBuf>,
    /// Pick-a-Pic v2 parquet shards (used when no manifest is given). Default: none.
    pub parquet: Vec<PathBuf>,
    /// Unpaired JSONL manifest `{"prompt", "image", "desirable"}` (paths relative to it) for
    /// `loss.kind = "kto"`: each image gets its own noise and timestep, as the Diffusion-KTO code. Default: none.
    pub unpaired_manifest: Option<PathBuf>,
    /// Training resolution in pixels (shorter side resized, then cropped square). Default 512.
    pub resolution: u32,
    /// Centre crop (else a random crop). Default true.
    pub center_crop: bool,
    /// Random horizontal flip, the same for both images of a pair. Default false.
    pub random_flip: bool,
    /// Probability of training a pair on the empty prompt (the official code uses 0.2). Default 0.
    pub caption_dropout: f64,
    /// Drop tie pairs (label 0.5), as the original. Default true; keep them for cDPO-style training.
    pub drop_ties: bool,
    /// Skip bad rows or images (counted in the log) instead of stopping. Default false.
    pub skip_bad: bool,
    /// Folder for cached VAE posteriors and text embeddings. Default: none (no caching).
    pub cache_dir: Option<PathBuf>,
    /// Shuffle the pairs every epoch. Default true.
    pub shuffle: bool,
    /// Which latent of the VAE posterior the images are trained as: `sample` (a fresh draw every step, as
    /// the official code and diffusers' scripts) or `mode` (the posterior mean, no draw). SD's VAE has a
    /// posterior std of ~1e-3 of the latent scale, so the two agree there; a VAE trained with a larger KL
    /// weight (such as the shapes world's, std ~0.5 of the latent spread) adds an independent draw to the
    /// winner and the loser that swamps their difference, and `mode` removes it. Default `sample`.
    pub vae_posterior: VaePosterior,
    /// Train on the stored sampler latents a manifest names (`chosen_latent`/`rejected_latent`, written by
    /// `data make-prefs`) instead of VAE encodings of the PNGs, when every pair of a batch has them. They are
    /// exactly what the model sampled; re-encoding an 8-bit decode does not give them back (see
    /// [`crate::data::latents`]). Needs `random_flip = false` and images at `resolution`. Default true.
    pub stored_latents: bool,
}

/// `[data] vae_posterior`: a posterior sample or its mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum VaePosterior {
    #[default]
    Sample,
    Mode,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            manifest: None,
            parquet: Vec::new(),
            unpaired_manifest: None,
            resolution: 512,
            center_crop: true,
            random_flip: false,
            caption_dropout: 0.0,
            drop_ties: true,
            skip_bad: false,
            cache_dir: None,
            shuffle: true,
            vae_posterior: VaePosterior::Sample,
            stored_latents: true,
        }
    }
}

/// A whole `diffpref train dpo` run: the shared run settings (model, output folder, device, `[lora]`,
/// `[optim]`, `[log]`, `[validation]`, `[eval]`; see [`RunConfig`]) and the method's `[loss]` and `[data]`.
/// See `examples/dpo.toml`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DpoConfig {
    #[serde(flatten)]
    pub run: RunConfig,
    pub loss: DpoLossConfig,
    pub data: DataConfig,
}

impl DpoConfig {
    /// Reads a TOML config (or starts from the defaults) and applies `--set key=value` overrides. Unknown keys
    /// are errors naming the key.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<DpoConfig> {
        crate::config::load_toml(path, overrides)
    }

    /// Parses a TOML configuration (`what` names it in errors) and applies `--set` overrides.
    pub fn from_toml(text: &str, what: &str, overrides: &[String]) -> Result<DpoConfig> {
        crate::config::from_toml(text, what, overrides)
    }

    /// The run folder (`output_dir`, default `runs/dpo`).
    pub fn output_dir(&self) -> PathBuf {
        self.run.output_dir("dpo")
    }

    pub fn validate(&self) -> Result<()> {
        self.run.validate()?;
        let sources = self.data.manifest.is_some() as usize
            + !self.data.parquet.is_empty() as usize
            + self.data.unpaired_manifest.is_some() as usize;
        ensure!(
            sources > 0,
            "[data] needs `manifest` (JSONL), `parquet` (Pick-a-Pic shards) or `unpaired_manifest` (KTO)"
        );
        if self.data.unpaired_manifest.is_some() {
            ensure!(
                sources == 1,
                "[data] `unpaired_manifest` cannot be combined with `manifest` or `parquet`"
            );
            ensure!(
                self.loss.kind == LossKind::Kto,
                "[data] `unpaired_manifest` needs loss.kind = \"kto\" (got {:?})",
                self.loss.kind
            );
            ensure!(
                self.loss.uncond_anchor == 0.0,
                "loss.uncond_anchor works on pairs; data.unpaired_manifest trains single images (set it to 0)"
            );
        }
        self.data.validate()?;
        self.loss.validate()
    }
}

impl DataConfig {
    /// The image settings: a resolution within limits, a caption dropout probability.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.resolution >= 8, "[data] resolution must be at least 8");
        let r = self.resolution as u64;
        diffpref_pipelines::limits::check_image_size("[data] resolution", r, r)?;
        ensure!(
            (0.0..=1.0).contains(&self.caption_dropout),
            "[data] caption_dropout must be in [0, 1]"
        );
        Ok(())
    }
}

/// A resumable cursor over unpaired (KTO) samples: epoch `e`'s order is a shuffle drawn from
/// `Rng::derive(seed, "kto-order/e")`.
pub(crate) struct UnpairedCursor {
    samples: Vec<UnpairedSample>,
    seed: u64,
    shuffle: bool,
    pos: DatasetPosition,
    order: Vec<usize>,
}

impl UnpairedCursor {
    fn order_for(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.samples.len()).collect();
        if self.shuffle {
            Rng::derive(self.seed, &format!("kto-order/{epoch}")).shuffle(&mut order);
        }
        order
    }

    fn seek(&mut self, pos: DatasetPosition) -> Result<()> {
        ensure!(
            pos.index <= self.samples.len(),
            "dataset position {}:{} is beyond the {} samples of an epoch (was the data changed since the \
             checkpoint?)",
            pos.epoch,
            pos.index,
            self.samples.len()
        );
        self.pos = pos;
        self.order = self.order_for(pos.epoch);
        Ok(())
    }

    fn next_batch(&mut self, n: usize) -> Vec<&UnpairedSample> {
        let mut idx = Vec::with_capacity(n);
        for _ in 0..n {
            if self.pos.index >= self.samples.len() {
                self.pos = DatasetPosition {
                    epoch: self.pos.epoch + 1,
                    index: 0,
                };
                self.order = self.order_for(self.pos.epoch);
            }
            idx.push(self.order[self.pos.index]);
            self.pos.index += 1;
        }
        idx.into_iter().map(|i| &self.samples[i]).collect()
    }
}

/// Where the training samples come from.
pub(crate) enum TrainData {
    Pairs(PairDataset),
    Unpaired(UnpairedCursor),
}

impl TrainData {
    pub(crate) fn position(&self) -> DatasetPosition {
        match self {
            TrainData::Pairs(d) => d.position(),
            TrainData::Unpaired(u) => u.pos,
        }
    }

    pub(crate) fn seek(&mut self, pos: DatasetPosition) -> Result<()> {
        match self {
            TrainData::Pairs(d) => d.seek(pos),
            TrainData::Unpaired(u) => u.seek(pos),
        }
    }

    /// Loads the data of `cfg` (`seed` orders it).
    pub(crate) fn load(data: &DataConfig, seed: u64) -> Result<(TrainData, SkipReport)> {
        if let Some(m) = &data.unpaired_manifest {
            let opts = ManifestOptions {
                drop_ties: false,
                check_images: true,
                skip_bad: data.skip_bad,
            };
            let (samples, report) = load_unpaired_manifest(m, &opts)?;
            ensure!(
                !samples.is_empty(),
                "no training samples in {}",
                m.display()
            );
            let mut cursor = UnpairedCursor {
                samples,
                seed,
                shuffle: data.shuffle,
                pos: DatasetPosition::default(),
                order: Vec::new(),
            };
            cursor.seek(DatasetPosition::default())?;
            return Ok((TrainData::Unpaired(cursor), report));
        }
        let (source, report) = if let Some(m) = &data.manifest {
            let opts = ManifestOptions {
                drop_ties: data.drop_ties,
                check_images: true,
                skip_bad: data.skip_bad,
            };
            let (pairs, report) = load_manifest(m, &opts)?;
            (PairSource::Manifest(pairs), report)
        } else {
            let opts = PickapicOptions {
                drop_ties: data.drop_ties,
                skip_bad: data.skip_bad,
                ..Default::default()
            };
            let (index, report) = PickapicIndex::open(&data.parquet, &opts)?;
            (PairSource::Pickapic(index), report)
        };
        let dataset = PairDataset::new(source, seed, data.shuffle);
        ensure!(
            !dataset.is_empty(),
            "no training pairs (after dropping ties and bad rows)"
        );
        Ok((TrainData::Pairs(dataset), report))
    }
}

/// The random streams and data position of a run (what a checkpoint must restore).
#[derive(Serialize, Deserialize)]
struct DpoState {
    noise_rng: Rng,
    data_rng: Rng,
    position: DatasetPosition,
}

/// Diffusion-DPO and its loss family as a [`Method`].
pub struct DpoMethod {
    model: StableDiffusion,
    schedule: NoiseSchedule,
    loss: DpoLossConfig,
    data_cfg: DataConfig,
    data: TrainData,
    skipped: SkipReport,
    pcfg: PreprocessConfig,
    latent_cache: Option<LatentCache>,
    text_cache: Option<TextEmbedCache>,
    noise_rng: Rng,
    data_rng: Rng,
    uncond: Option<PromptEmbeds>,
    t_band: (u64, u64),
    /// The latent size of a training image (square, `data.resolution` pixels) and the UNet's input channels,
    /// which stored latents must match.
    latent_side: usize,
    latent_channels: usize,
}

impl DpoMethod {
    /// The method on `model` (loaded from `model_dir`) with `cfg`'s loss and data.
    pub fn new(cfg: &DpoConfig, model: StableDiffusion, model_dir: &Path) -> Result<DpoMethod> {
        let sched_cfg = SchedulerConfig::from_file(&model.scheduler_config_path)?;
        let schedule = NoiseSchedule::new(&sched_cfg)?;
        let t_band = cfg
            .loss
            .timestep_band(sched_cfg.num_train_timesteps as u64)?;
        let (data, skipped) = TrainData::load(&cfg.data, cfg.run.seed)?;
        let pcfg = PreprocessConfig {
            center_crop: cfg.data.center_crop,
            random_flip: cfg.data.random_flip,
            ..PreprocessConfig::new(cfg.data.resolution)
        };
        let model_id = model_dir.display().to_string();
        let latent_cache = match &cfg.data.cache_dir {
            Some(d) => Some(LatentCache::new(d.join("latents"), &model_id)?),
            None => None,
        };
        let text_cache = match &cfg.data.cache_dir {
            Some(d) => Some(TextEmbedCache::new(d.join("text"), &model_id)?),
            None => None,
        };
        let uncond = if cfg.loss.uncond_anchor > 0.0 {
            Some(unconditional_embeds(&model)?)
        } else {
            None
        };
        Ok(DpoMethod {
            latent_side: cfg.data.resolution as usize / model.vae_scale_factor(),
            latent_channels: model.unet.config().in_channels,
            schedule,
            loss: cfg.loss.clone(),
            data_cfg: cfg.data.clone(),
            data,
            skipped,
            pcfg,
            latent_cache,
            text_cache,
            noise_rng: Rng::derive(cfg.run.seed, "noise"),
            data_rng: Rng::derive(cfg.run.seed, "data"),
            uncond,
            t_band,
            model,
        })
    }

    /// The prompts' embeddings (through the text cache when there is one).
    fn embed(&self, prompts: &[&str]) -> Result<PromptEmbeds> {
        embed_prompts(&self.model, self.text_cache.as_ref(), prompts)
    }

    /// One micro-batch of unpaired samples (KTO).
    fn unpaired_step(&mut self, policy: &Policy, bs: usize) -> Result<MicroStep> {
        let TrainData::Unpaired(u) = &mut self.data else {
            unreachable!("unpaired_step on pairs")
        };
        let samples: Vec<UnpairedSample> = u.next_batch(bs).into_iter().cloned().collect();
        let model = &self.model;
        let device = model.device().clone();
        let dtype = model.dtype();
        let n = samples.len();
        let mut raws = Vec::with_capacity(n);
        let mut pre = Vec::with_capacity(n);
        for x in &samples {
            let img = crate::imaging::load_image(&x.image)
                .with_context(|| format!("sample {}", x.source))?;
            pre.push(
                preprocess_image(&img, &self.pcfg, &mut self.data_rng)
                    .with_context(|| format!("sample {}", x.source))?,
            );
            raws.push(img);
        }
        let images: Vec<&Tensor> = pre.iter().map(|p| &p.0).collect();
        let images = Tensor::stack(&images, 0)?
            .to_device(&device)?
            .to_dtype(dtype)?;
        let ids: Vec<(ImageId, &Transform)> = raws
            .iter()
            .zip(&pre)
            .map(|(img, pp)| (ImageId::Bytes(img.as_raw()), &pp.1))
            .collect();
        let latents = training_latents(
            model,
            self.latent_cache.as_ref(),
            &images,
            &ids,
            self.data_cfg.vae_posterior,
            &mut self.data_rng,
        )?;
        let prompts: Vec<&str> = samples
            .iter()
            .map(|x| {
                maybe_drop_caption(&x.prompt, self.data_cfg.caption_dropout, &mut self.data_rng)
            })
            .collect();
        let embeds = self.embed(&prompts)?;
        let transforms: Vec<&Transform> = pre.iter().map(|x| &x.1).collect();
        let added = sdxl_added_cond(model, &embeds, &transforms, dtype)?;
        let (t, noise) =
            draw_timesteps_and_noise(&mut self.noise_rng, self.t_band, latents.dims(), &device)?;
        let (m, r) = single_errors(
            &model.unet,
            policy.reference().as_ref(),
            &self.schedule,
            &latents,
            &noise,
            &t,
            &embeds.hidden_states.detach(),
            added.as_ref(),
        )?;
        let r = r.context("loss `kto` needs reference predictions")?;
        let desirable: Vec<bool> = samples.iter().map(|x| x.desirable).collect();
        let (loss, stats) = kto_unpaired_loss(&self.loss, &m, &r, &desirable)?;
        Ok(MicroStep {
            loss,
            metrics: stats_metrics(&stats),
            units: n,
            about: format!(
                "samples {}",
                samples
                    .iter()
                    .map(|x| x.source.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }

    /// One micro-batch of pairs.
    fn pairs_step(&mut self, policy: &Policy, bs: usize) -> Result<MicroStep> {
        let TrainData::Pairs(dataset) = &mut self.data else {
            unreachable!("pairs_step on unpaired data")
        };
        let pairs = dataset.next_batch(bs)?;
        let model = &self.model;
        let device = model.device().clone();
        let dtype = model.dtype();
        let mut pre = Vec::with_capacity(pairs.len());
        for p in &pairs {
            pre.push(
                preprocess_pair(&p.chosen, &p.rejected, &self.pcfg, &mut self.data_rng)
                    .with_context(|| format!("pair {}", p.source))?,
            );
        }
        let stored = stored_pair_latents(
            self.data_cfg.stored_latents,
            &pairs,
            self.latent_channels,
            self.latent_side,
            self.data_cfg.random_flip,
        )?;
        let latents =
            match stored {
                Some(z) => z.to_device(&device)?.to_dtype(dtype)?,
                None => {
                    let images: Vec<&Tensor> = pre
                        .iter()
                        .map(|p| &p.chosen)
                        .chain(pre.iter().map(|p| &p.rejected))
                        .collect();
                    let images = Tensor::stack(&images, 0)?
                        .to_device(&device)?
                        .to_dtype(dtype)?;
                    let ids: Vec<(ImageId, &Transform)> =
                        pairs
                            .iter()
                            .zip(&pre)
                            .map(|(x, pp)| (ImageId::Bytes(x.chosen.as_raw()), &pp.transform))
                            .chain(pairs.iter().zip(&pre).map(|(x, pp)| {
                                (ImageId::Bytes(x.rejected.as_raw()), &pp.transform)
                            }))
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
        let p = pairs.len();
        let (lw, ll) = (latents.narrow(0, 0, p)?, latents.narrow(0, p, p)?);
        let prompts: Vec<&str> = pairs
            .iter()
            .map(|x| {
                maybe_drop_caption(&x.prompt, self.data_cfg.caption_dropout, &mut self.data_rng)
            })
            .collect();
        let embeds = self.embed(&prompts)?;
        let transforms: Vec<&Transform> = pre.iter().map(|x| &x.transform).collect();
        let added = sdxl_added_cond(model, &embeds, &transforms, dtype)?;
        let (t, noise) =
            draw_timesteps_and_noise(&mut self.noise_rng, self.t_band, lw.dims(), &device)?;
        let labels = Tensor::from_vec(
            pairs.iter().map(|x| x.label).collect::<Vec<f32>>(),
            p,
            &device,
        )?;
        let batch = PairBatch {
            latents_w: &lw,
            latents_l: &ll,
            noise: &noise,
            timesteps: &t,
            encoder_hidden_states: &embeds.hidden_states.detach(),
            added: added.as_ref(),
            uncond: self.uncond.as_ref(),
        };
        let reference = policy
            .reference()
            .filter(|_| self.loss.kind.needs_reference());
        let errors = pair_errors(
            &model.unet,
            reference.as_ref(),
            &self.schedule,
            self.loss.timestep_weighting,
            &batch,
        )?;
        let (loss, stats) = pair_loss(&self.loss, &errors, Some(&labels))?;
        Ok(MicroStep {
            loss,
            metrics: stats_metrics(&stats),
            units: p,
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
}

/// The logged figures of a batch's statistics (in `metrics.jsonl` order, after `loss`).
fn stats_metrics(s: &DpoStats) -> Vec<(&'static str, f64)> {
    vec![
        ("implicit_acc", s.implicit_acc),
        ("reward_margin", s.margin),
        ("reward_chosen", s.reward_chosen),
        ("reward_rejected", s.reward_rejected),
        ("model_mse_w", s.model_mse_w),
        ("model_mse_l", s.model_mse_l),
        ("ref_mse_w", s.ref_mse_w),
        ("ref_mse_l", s.ref_mse_l),
        ("uncond_drift", s.uncond_drift),
    ]
}

impl Method for DpoMethod {
    fn name(&self) -> &str {
        "dpo"
    }

    fn unit(&self) -> &str {
        match self.data {
            TrainData::Pairs(_) => "pairs",
            TrainData::Unpaired(_) => "samples",
        }
    }

    fn headline_metric(&self) -> Option<&'static str> {
        Some("implicit_acc")
    }

    fn on_start(&mut self, ctx: StartContext<'_>) -> Result<()> {
        if self.skipped.count > 0 {
            eprintln!("skipped {} bad rows", self.skipped.count);
            ctx.metrics.write(
                &serde_json::json!({"step": ctx.start_step, "skipped_rows": self.skipped.count}),
            )?;
        }
        Ok(())
    }

    fn micro_step(&mut self, ctx: &StepContext<'_>) -> Result<MicroStep> {
        match self.data {
            TrainData::Pairs(_) => self.pairs_step(ctx.policy, ctx.batch_size),
            TrainData::Unpaired(_) => self.unpaired_step(ctx.policy, ctx.batch_size),
        }
    }

    fn state(&self) -> Result<serde_json::Value> {
        Ok(serde_json::to_value(DpoState {
            noise_rng: self.noise_rng.clone(),
            data_rng: self.data_rng.clone(),
            position: self.data.position(),
        })?)
    }

    fn load_state(&mut self, state: serde_json::Value) -> Result<()> {
        let s: DpoState = serde_json::from_value(state)?;
        self.noise_rng = s.noise_rng;
        self.data_rng = s.data_rng;
        self.data.seek(s.position)
    }

    fn model(&mut self) -> Option<&mut StableDiffusion> {
        Some(&mut self.model)
    }
}

/// Runs (or resumes) a `train dpo` run. `stop` (e.g. from Ctrl-C) makes it save a checkpoint and return early.
pub fn train(cfg: &DpoConfig, stop: Option<StopFlag>) -> Result<TrainSummary> {
    cfg.validate()?;
    let d = &cfg.data;
    let mut inputs = Vec::new();
    for (what, m) in [
        ("[data] manifest", &d.manifest),
        ("[data] unpaired_manifest", &d.unpaired_manifest),
    ] {
        if let Some(m) = m {
            inputs.push(crate::output::Input::new(what, m));
        }
    }
    for p in &d.parquet {
        inputs.push(crate::output::Input::new("[data] parquet file", p));
    }
    cfg.run
        .check_output(&cfg.output_dir(), "train dpo", &inputs)?;
    let (mut model, model_dir) = load_model(&cfg.run)?;
    let policy = load_policy(&cfg.run, &mut model, &model_dir)?;
    let mut method = DpoMethod::new(cfg, model, &model_dir)?;
    run(
        &cfg.run,
        &cfg.output_dir(),
        &model_dir,
        &policy,
        &mut method,
        serde_json::to_value(cfg)?,
        stop,
    )
}

/// The prompts' embeddings, through `cache` when there is one.
pub(crate) fn embed_prompts(
    model: &StableDiffusion,
    cache: Option<&TextEmbedCache>,
    prompts: &[&str],
) -> Result<PromptEmbeds> {
    match cache {
        Some(c) => c.get_or_compute_many(prompts, model.device(), |missing| {
            Ok(model.encode_prompts(missing)?)
        }),
        None => Ok(model.encode_prompts(prompts)?),
    }
}

/// SDXL micro-conditioning for a training batch: the pooled text embeddings and, per sample, the time ids of
/// the crop actually applied. `None` for UNets without `text_time`.
pub(crate) fn sdxl_added_cond(
    model: &StableDiffusion,
    embeds: &PromptEmbeds,
    transforms: &[&Transform],
    dtype: DType,
) -> Result<Option<AddedCond>> {
    if !model.unet.config().uses_text_time() {
        return Ok(None);
    }
    let ids: Vec<f32> = transforms
        .iter()
        .flat_map(|t| t.sdxl_time_ids().map(|v| v as f32))
        .collect();
    Ok(Some(AddedCond {
        text_embeds: embeds
            .pooled
            .clone()
            .context("SDXL training needs pooled text embeddings")?,
        time_ids: Tensor::from_vec(ids, (transforms.len(), 6), model.device())?.to_dtype(dtype)?,
    }))
}

/// The empty prompt's conditioning `[1, T, D]` as the sampler's unconditional branch sees it (zeros where the
/// model forces them), for the unconditional anchor.
pub(crate) fn unconditional_embeds(model: &StableDiffusion) -> Result<PromptEmbeds> {
    let e = model.encode_prompts(&[""])?;
    Ok(if model.force_zeros_for_empty_prompt {
        e.zeros_like()?
    } else {
        e
    })
}

/// The stored sampler latents of a batch, `[chosen…; rejected…]` (`[2P, C, side, side]`, f32 on the CPU), when
/// `use_stored` (`data.stored_latents`) is on and every pair has them; `None` when it is off or no pair has them
/// (then the images are encoded). Each must be `[channels, side, side]`, the latent of a training image at
/// `data.resolution`.
pub(crate) fn stored_pair_latents(
    use_stored: bool,
    pairs: &[crate::data::PairImages],
    channels: usize,
    side: usize,
    random_flip: bool,
) -> Result<Option<Tensor>> {
    let with = pairs.iter().filter(|p| p.latents.is_some()).count();
    if !use_stored || with == 0 {
        return Ok(None);
    }
    if random_flip {
        bail!(
            "the pairs name stored latents (e.g. {}), which cannot be flipped: set data.random_flip = false, \
             or data.stored_latents = false to encode the PNGs instead",
            pairs[0].source
        );
    }
    if with != pairs.len() {
        let missing: Vec<&str> = pairs
            .iter()
            .filter(|p| p.latents.is_none())
            .map(|p| p.source.as_str())
            .collect();
        bail!(
            "some pairs name stored latents and some do not (without: {}); give every pair \
             chosen_latent/rejected_latent, or set data.stored_latents = false",
            missing.join(", ")
        );
    }
    let mut all = Vec::with_capacity(2 * pairs.len());
    for (which, rejected) in [("chosen", false), ("rejected", true)] {
        for p in pairs {
            let (c, r) = p.latents.as_ref().expect("checked above");
            let z = if rejected { r } else { c };
            let (zc, zh, zw) = z.dims3()?;
            if zc != channels {
                bail!(
                    "{}: the stored {which} latent has {zc} channels, the UNet takes {channels}",
                    p.source
                );
            }
            if (zh, zw) != (side, side) {
                bail!(
                    "{}: the stored {which} latent is {zh}x{zw} but images at data.resolution have \
                     {side}x{side} latents (set data.resolution to the size the pairs were sampled at, or \
                     data.stored_latents = false)",
                    p.source
                );
            }
            all.push(z.clone());
        }
    }
    Ok(Some(Tensor::stack(&all, 0)?))
}

/// Scaled VAE latents of `images` (`[B, 3, H, W]`, image `i` identified by `ids[i]` for the cache): the
/// posteriors come from `cache` (computing the misses in one VAE call) or straight from the VAE, then a
/// posterior sample (noise from `rng`) or the mode, per `[data] vae_posterior`. Detached.
pub(crate) fn training_latents(
    model: &StableDiffusion,
    cache: Option<&LatentCache>,
    images: &Tensor,
    ids: &[(ImageId, &Transform)],
    posterior: VaePosterior,
    rng: &mut Rng,
) -> Result<Tensor> {
    let device = images.device();
    let posteriors = match cache {
        Some(cache) => {
            let keys = ids
                .iter()
                .map(|(id, tr)| cache.key(*id, tr))
                .collect::<Result<Vec<_>>>()?;
            let got = cache.get_or_compute_many(&keys, device, |missing| {
                let idx: Vec<u32> = missing.iter().map(|&i| i as u32).collect();
                let idx = Tensor::new(idx.as_slice(), device)?;
                encode_posteriors(&model.vae, &images.index_select(&idx, 0)?)
            })?;
            CachedLatent::stack(&got, device)?
        }
        None => model.vae.encode(images)?,
    };
    let z = match posterior {
        VaePosterior::Sample => {
            let noise = rng.normal_tensor(posteriors.mean.dims(), device)?;
            posteriors.sample(Some(&noise.to_dtype(posteriors.mean.dtype())?))?
        }
        VaePosterior::Mode => posteriors.mean,
    };
    Ok(model.vae.scale_latents(&z)?.detach())
}

/// One uniform integer timestep from the band `[lo, hi)` ([`DpoLossConfig::timestep_band`]).
fn draw_timestep(rng: &mut Rng, (lo, hi): (u64, u64)) -> i64 {
    (lo + rng.below(hi - lo)) as i64
}

/// One timestep per sample from `band`, then the noise of `shape` (in that order from the stream, so resumed
/// runs draw the same numbers).
pub(crate) fn draw_timesteps_and_noise(
    rng: &mut Rng,
    band: (u64, u64),
    shape: &[usize],
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let n = shape[0];
    let t: Vec<i64> = (0..n).map(|_| draw_timestep(rng, band)).collect();
    let t = Tensor::from_vec(t, n, device)?;
    let noise = rng.normal_tensor(shape, device)?;
    Ok((t, noise))
}

/// Mean statistics of batches (sums of `pairs`).
fn mean_stats(v: &[DpoStats]) -> DpoStats {
    let n = v.len().max(1) as f64;
    let m = |f: fn(&DpoStats) -> f64| v.iter().map(f).sum::<f64>() / n;
    DpoStats {
        loss: m(|s| s.loss),
        implicit_acc: m(|s| s.implicit_acc),
        reward_chosen: m(|s| s.reward_chosen),
        reward_rejected: m(|s| s.reward_rejected),
        margin: m(|s| s.margin),
        model_mse_w: m(|s| s.model_mse_w),
        model_mse_l: m(|s| s.model_mse_l),
        ref_mse_w: m(|s| s.ref_mse_w),
        ref_mse_l: m(|s| s.ref_mse_l),
        uncond_drift: m(|s| s.uncond_drift),
        pairs: v.iter().map(|s| s.pairs).sum(),
    }
}

/// Mean DPO statistics of a model (optionally with a trained LoRA, at scale 1) on every pair of `cfg`'s data
/// (its stored latents when the manifest names them and `data.stored_latents` is on, else the VAE posterior
/// modes of its images), `draws` times each, with fixed noise and timesteps drawn from `seed` — the same draws
/// for any weights, so a trained LoRA and the base model are compared on equal terms. The reference is the base
/// model; `uncond_drift` is how far the weights moved the unconditional prediction on the winners.
pub fn evaluate_pairs(
    cfg: &DpoConfig,
    lora: Option<&Path>,
    seed: u64,
    draws: usize,
) -> Result<DpoStats> {
    let device = cfg.run.device.device()?;
    let dtype = cfg.run.dtype.dtype();
    let model_dir = resolve_model(&cfg.run.model, cfg.run.variant.as_deref())?;
    let model = StableDiffusion::load(
        &model_dir,
        &LoadOptions {
            dtype,
            device: device.clone(),
            variant: cfg.run.variant.clone(),
        },
    )?;
    let schedule = NoiseSchedule::new(&SchedulerConfig::from_file(&model.scheduler_config_path)?)?;
    let t_band = cfg
        .loss
        .timestep_band(schedule.alphas_cumprod().len() as u64)?;
    // The weights evaluated, and the base model as their reference.
    let policy = match lora {
        Some(p) => Policy::frozen_lora(LoraSet::load(
            &model.unet,
            p,
            LoadMode::Frozen { scale: 1.0 },
        )?),
        None => Policy::with_frozen_reference(Vec::new(), model.unet.clone()),
    };
    let manifest = cfg
        .data
        .manifest
        .as_ref()
        .context("evaluate_pairs needs a manifest")?;
    let opts = ManifestOptions {
        drop_ties: cfg.data.drop_ties,
        check_images: true,
        skip_bad: cfg.data.skip_bad,
    };
    let (pairs, _) = load_manifest(manifest, &opts)?;
    let mut dataset = PairDataset::new(PairSource::Manifest(pairs), seed, false);
    let pcfg = PreprocessConfig {
        center_crop: true,
        random_flip: false,
        ..PreprocessConfig::new(cfg.data.resolution)
    };
    let mut rng = Rng::derive(seed, "evaluate");
    let latent_side = cfg.data.resolution as usize / model.vae_scale_factor();
    let latent_channels = model.unet.config().in_channels;
    let uncond = unconditional_embeds(&model)?;
    let mut all = Vec::new();
    for _ in 0..dataset.len() * draws.max(1) {
        let pair = dataset.next_batch(1)?.remove(0);
        let stored = stored_pair_latents(
            cfg.data.stored_latents,
            std::slice::from_ref(&pair),
            latent_channels,
            latent_side,
            false,
        )?;
        let latents = match stored {
            Some(z) => z.to_device(&device)?.to_dtype(dtype)?,
            None => {
                let pre = preprocess_pair(&pair.chosen, &pair.rejected, &pcfg, &mut rng)?;
                let images = Tensor::stack(&[&pre.chosen, &pre.rejected], 0)?
                    .to_device(&device)?
                    .to_dtype(dtype)?;
                model
                    .vae
                    .scale_latents(&model.vae.encode(&images)?.mode())?
            }
        };
        let embeds = model.encode_prompts(&[pair.prompt.as_str()])?;
        let added = model.added_cond(
            &embeds,
            cfg.data.resolution as usize,
            cfg.data.resolution as usize,
        )?;
        let t = Tensor::new(&[draw_timestep(&mut rng, t_band)], &device)?;
        let mut shape = vec![1];
        shape.extend_from_slice(&latents.dims()[1..]);
        let noise = rng.normal_tensor(&shape, &device)?;
        let batch = PairBatch {
            latents_w: &latents.narrow(0, 0, 1)?,
            latents_l: &latents.narrow(0, 1, 1)?,
            noise: &noise,
            timesteps: &t,
            encoder_hidden_states: &embeds.hidden_states,
            added: added.as_ref(),
            uncond: Some(&uncond),
        };
        let errors = pair_errors(
            &model.unet,
            policy.reference().as_ref(),
            &schedule,
            cfg.loss.timestep_weighting,
            &batch,
        )?;
        all.push(pair_loss(&cfg.loss, &errors, None)?.1);
    }
    Ok(mean_stats(&all))
}
