//! `diffpref train lrm`: trains a latent reward model ([`LatentRewardModel`], Zhang et al. 2025, §3.1–3.2) on
//! preference pairs at random noise levels, with the Bradley–Terry loss as a two-way cross-entropy with soft
//! labels (PickScore's pair loss, the LRM code's):
//!
//! ```text
//! t ~ U(timesteps)                 one per pair, shared by its two images (the paper: t ~ U(0, T); the code:
//!                                  the 20-point DDIM grid {1, 51, …, 951} — `timestep_grid = 20`)
//! x_t^i = √ᾱ_t x_0^i + √(1−ᾱ_t) ε^i   independent noise per image
//! Δ = S(p, x_t^w, t) − S(p, x_t^l, t)
//! ℓ = −[y log σ(Δ) + (1 − y) log σ(−Δ)]   y: the label (1 = chosen preferred; 0.5 = tie)
//! ```
//!
//! (`−log softmax(s)_w = −log σ(s_w − s_l)`; the per-prompt example weighting of the code is not used: every
//! pair weighs the same.) The clean latents are the manifest's stored sampler latents when it names them, else
//! the VAE posterior modes of the images.
//!
//! **Data.** `[data]` is `train dpo`'s (a JSONL manifest or Pick-a-Pic parquet). In the shapes world, `[pairs]`
//! makes the training pairs first (`data make-prefs` into `<output_dir>/pairs`: samples of the backbone labelled
//! by a Bradley–Terry draw on the ground-truth reward), and `[eval] make` the held-out pairs
//! (`<output_dir>/eval-pairs`). (The paper's Multi-Preference Consistent Filtering of Pick-a-Pic by three
//! external rewards' gaps is not built in: filter the manifest before training.)
//!
//! **Evaluation.** Pair accuracy per timestep band ([`evaluate`]): each held-out pair is noised at a timestep
//! drawn uniformly from each band (fixed draws from `[eval] seed`, the same for any weights) and counted right
//! when the chosen image scores higher; with the ground truth (`reward_chosen`/`reward_rejected` in the
//! manifest) also against it. Before and after training, in `lrm_eval.json`, with Wilson 95% intervals.
//!
//! The trained LRM is written to `<output_dir>/lrm` (see [`diffpref_rewards::lrm`]), loadable by `score
//! --reward lrm --weights DIR` and by `train lpo`.

use crate::config::DeviceSpec;
use crate::data::prefs::{make_prefs, MakePrefsOptions};
use crate::data::{load_manifest, preprocess_pair, ManifestOptions, PairImages, PreprocessConfig};
use crate::engine::config::{LogConfig, OptimConfig};
use crate::engine::hooks::Hooks;
use crate::engine::method::{Method, MicroStep, StartContext, StepContext};
use crate::engine::policy::Policy;
use crate::engine::trainer::{train as run_loop, TrainerSettings};
use crate::io::write_dir_atomic;
use crate::methods::pairwise::{DataConfig, TrainData};
use crate::output::{Input, OutputDir};
use crate::train::checkpoint::StopFlag;
use crate::train::rng::Rng;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use diffpref_pipelines::loading::StableDiffusion;
use diffpref_pipelines::schedulers::NoiseSchedule;
use diffpref_rewards::lrm::{LatentRewardModel, Trainable};
use diffpref_rewards::metrics::{wilson_interval, Z95};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `[lrm]`: the model and how it is trained.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LrmSection {
    /// VFE guidance `gs` on the pooled mid feature (1 = off). Default 7.5 (the paper).
    pub guidance_scale: f64,
    /// Train the UNet (down and mid blocks). Default true.
    pub train_unet: bool,
    /// Train the text encoder(s). Default true (the paper).
    pub train_text_encoder: bool,
    /// Training timesteps: 0 = uniform over all integers [0, T); S > 0 = the S-point grid {1, 1 + T/S, …}
    /// (the LRM code's 20-point DDIM grid). Default 0.
    pub timestep_grid: usize,
}

impl Default for LrmSection {
    fn default() -> Self {
        LrmSection {
            guidance_scale: 7.5,
            train_unet: true,
            train_text_encoder: true,
            timestep_grid: 0,
        }
    }
}

/// Pairs made from the backbone's own samples, labelled by the shapes world's ground truth (`data make-prefs`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MakePairsConfig {
    /// Prompts, one per line (shapes captions). Required.
    pub prompts: Option<PathBuf>,
    /// Number of pairs. Default 1000.
    pub pairs: usize,
    /// Samples per pair; the pair is the best and the worst. Default 4.
    pub candidates: usize,
    /// Sampling steps and guidance. Default 10 and 7.5.
    pub steps: usize,
    pub guidance: f64,
    /// Bradley–Terry temperature of the labels. Default 0.05.
    pub temperature: f64,
    /// Seed of the noise and the labels. Default 0.
    pub seed: u64,
    /// Pairs per sampling batch. Default 16.
    pub batch_size: usize,
    /// Every two of a prompt's candidates make a pair (`pairs` then counts sampled groups, each giving
    /// candidates choose 2 pairs), instead of the best and the worst. Default false.
    pub all_pairs: bool,
    /// samples: the model's own samples (above) | renders: ground-truth renders of each caption against a
    /// render of a one-edit corruption of it (hard negatives; no sampling, so thousands of pairs are cheap;
    /// `candidates`, `steps`, `guidance`, `temperature`, `all_pairs` unused). Default samples.
    pub source: PairsSource,
}

/// Where `[pairs]` come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PairsSource {
    #[default]
    Samples,
    Renders,
}

impl Default for MakePairsConfig {
    fn default() -> Self {
        MakePairsConfig {
            prompts: None,
            pairs: 1000,
            candidates: 4,
            steps: 10,
            guidance: 7.5,
            temperature: 0.05,
            seed: 0,
            batch_size: 16,
            all_pairs: false,
            source: PairsSource::Samples,
        }
    }
}

impl MakePairsConfig {
    fn validate(&self, section: &str) -> Result<()> {
        ensure!(self.prompts.is_some(), "{section} prompts is required");
        ensure!(
            (1..=1_000_000).contains(&self.pairs),
            "{section} pairs must be 1 to 1000000 (got {})",
            self.pairs
        );
        ensure!(
            (2..=256).contains(&self.candidates),
            "{section} candidates must be 2 to 256 (got {})",
            self.candidates
        );
        ensure!(
            (1..=1000).contains(&self.steps),
            "{section} steps must be 1 to 1000 (got {})",
            self.steps
        );
        ensure!(
            self.guidance.is_finite(),
            "{section} guidance must be finite"
        );
        ensure!(
            self.temperature.is_finite() && self.temperature > 0.0,
            "{section} temperature must be positive (got {})",
            self.temperature
        );
        ensure!(
            (1..=4096).contains(&self.batch_size),
            "{section} batch_size must be 1 to 4096 (got {})",
            self.batch_size
        );
        Ok(())
    }

    fn options(&self) -> MakePrefsOptions {
        MakePrefsOptions {
            pairs: self.pairs,
            candidates: self.candidates,
            temperature: self.temperature,
            seed: self.seed,
            steps: self.steps,
            guidance: self.guidance,
            scheduler: None,
            batch_size: self.batch_size,
            all_pairs: self.all_pairs,
        }
    }
}

/// `[eval]`: held-out pair accuracy per timestep band.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LrmEvalConfig {
    /// Held-out pairs (JSONL manifest). Default: none (then `make`, or no evaluation).
    pub manifest: Option<PathBuf>,
    /// Make the held-out pairs (into `<output_dir>/eval-pairs`) as `[pairs]` does.
    pub make: Option<MakePairsConfig>,
    /// Timestep bands `[lo, hi)`. Default [0, 200), [200, 500), [500, 800), [800, 1000).
    pub bands: Vec<[u64; 2]>,
    /// Seed of the evaluation's timesteps and noise. Default 0.
    pub seed: u64,
    /// Pairs scored per batch. Default 64.
    pub batch_size: usize,
}

impl Default for LrmEvalConfig {
    fn default() -> Self {
        LrmEvalConfig {
            manifest: None,
            make: None,
            bands: vec![[0, 200], [200, 500], [500, 800], [800, 1000]],
            seed: 0,
            batch_size: 64,
        }
    }
}

/// A whole `diffpref train lrm` run. See `examples/lrm.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LrmConfig {
    /// The backbone: a diffusers model folder. Required.
    pub model: String,
    /// Run folder (checkpoints, metrics, `lrm/`, `lrm_eval.json`). Default `runs/lrm`.
    pub output_dir: Option<PathBuf>,
    pub seed: u64,
    pub device: DeviceSpec,
    /// Continue from the latest checkpoint. Default true.
    pub resume: bool,
    /// Write into a non-empty `output_dir` not written by `train lrm`. Default false.
    pub overwrite: bool,
    pub lrm: LrmSection,
    pub data: DataConfig,
    /// Make the training pairs first (shapes world). Default: none (use `[data]`).
    pub pairs: Option<MakePairsConfig>,
    pub optim: OptimConfig,
    pub log: LogConfig,
    pub eval: LrmEvalConfig,
}

impl Default for LrmConfig {
    fn default() -> Self {
        LrmConfig {
            model: String::new(),
            output_dir: None,
            seed: 0,
            device: DeviceSpec::Cpu,
            resume: true,
            overwrite: false,
            lrm: LrmSection::default(),
            data: DataConfig::default(),
            pairs: None,
            optim: OptimConfig::default(),
            log: LogConfig::default(),
            eval: LrmEvalConfig::default(),
        }
    }
}

impl LrmConfig {
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<LrmConfig> {
        crate::config::load_toml(path, overrides)
    }

    pub fn from_toml(text: &str, what: &str, overrides: &[String]) -> Result<LrmConfig> {
        crate::config::from_toml(text, what, overrides)
    }

    pub fn output_dir(&self) -> PathBuf {
        self.output_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs/lrm"))
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.model.is_empty(),
            "`model` (the backbone's model folder) is required"
        );
        let l = &self.lrm;
        ensure!(
            l.guidance_scale.is_finite() && l.guidance_scale >= 0.0,
            "[lrm] guidance_scale must be finite and >= 0 (got {})",
            l.guidance_scale
        );
        ensure!(
            l.timestep_grid <= 1000,
            "[lrm] timestep_grid must be 0 (uniform) or a grid of at most 1000 points (got {})",
            l.timestep_grid
        );
        validate_pair_sources(&self.optim, &self.data, self.pairs.as_ref(), &self.eval)
    }
}

/// Checks the optimizer, the training pairs and the evaluation of `train lrm` / `train spm`.
pub(crate) fn validate_pair_sources(
    optim: &OptimConfig,
    data: &DataConfig,
    pairs: Option<&MakePairsConfig>,
    eval: &LrmEvalConfig,
) -> Result<()> {
    optim.validate()?;
    ensure!(
        data.unpaired_manifest.is_none(),
        "[data] unpaired_manifest: a step reward model trains on pairs (give [data] manifest or parquet)"
    );
    match pairs {
        Some(p) => {
            p.validate("[pairs]")?;
            ensure!(
                data.manifest.is_none() && data.parquet.is_empty(),
                "[pairs] makes the training pairs: remove [data] manifest / parquet, or [pairs]"
            );
        }
        None => ensure!(
            data.manifest.is_some() || !data.parquet.is_empty(),
            "no training pairs: set [data] manifest (or parquet), or [pairs] to make them"
        ),
    }
    if let Some(m) = &eval.make {
        m.validate("[eval.make]")?;
        ensure!(
            eval.manifest.is_none(),
            "[eval] give either manifest or make, not both"
        );
    }
    for (i, [lo, hi]) in eval.bands.iter().enumerate() {
        ensure!(lo < hi, "[eval] bands[{i}] = [{lo}, {hi}] needs lo < hi");
    }
    ensure!(
        (1..=4096).contains(&eval.batch_size),
        "[eval] batch_size must be 1 to 4096"
    );
    Ok(())
}

/// The Bradley–Terry cross-entropy of the module docs, mean over pairs, for score gaps `Δ` `[N]` and labels
/// `y` `[N]` (f32), and the share of pairs ranked as labelled (`Δ > 0` where `y > ½`, `Δ < 0` where `y < ½`).
pub fn bt_loss(delta: &Tensor, y: &Tensor) -> Result<(Tensor, f64)> {
    // −[y log σ(Δ) + (1 − y) log σ(−Δ)] = softplus(−Δ) + (1 − y) Δ
    let softplus = |x: &Tensor| -> Result<Tensor> {
        // log(1 + e^x) = max(x, 0) + log(1 + e^−|x|)
        Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
    };
    let loss = (softplus(&delta.neg()?)? + ((1.0 - y)? * delta)?)?.mean_all()?;
    let d: Vec<f32> = delta.to_vec1()?;
    let yv: Vec<f32> = y.to_vec1()?;
    let (mut right, mut n) = (0usize, 0usize);
    for (d, y) in d.iter().zip(&yv) {
        if *y != 0.5 {
            n += 1;
            if (*d > 0.0) == (*y > 0.5) {
                right += 1;
            }
        }
    }
    Ok((loss, right as f64 / n.max(1) as f64))
}

/// The training timesteps of `timestep_grid = s` for a schedule of `t_max` steps.
pub(crate) fn draw_t(rng: &mut Rng, grid: usize, t_max: u64) -> u64 {
    if grid == 0 {
        rng.below(t_max)
    } else {
        let stride = (t_max / grid as u64).max(1);
        (1 + stride * rng.below(grid as u64)).min(t_max - 1)
    }
}

/// A reward model of noisy diffusion steps trained on preference pairs: the LRM (on the noisy latents) and
/// the SPM ([`crate::methods::spm`], on the decoded prediction x̂₀). `train lrm` and `train spm` share the
/// data, the loss, the loop and the evaluation through it.
pub trait StepRewardModel {
    /// The diffusion model whose VAE gives the pairs' clean latents.
    fn diffusion(&self) -> &StableDiffusion;
    /// The noise schedule of the training timesteps.
    fn schedule(&self) -> &NoiseSchedule;
    /// Scores `[B]` (f32) of noisy latents `x_t` at timesteps `t` (`[B]`).
    fn score_noisy(&self, x_t: &Tensor, t: &Tensor, prompts: &[&str]) -> Result<Tensor>;
    /// Whether the two images of a pair share their noise (the SPM code) or draw their own (the LRM code).
    fn shared_noise(&self) -> bool;
    /// Figures logged with every step.
    fn metrics(&self) -> Result<Vec<(&'static str, f64)>> {
        Ok(Vec::new())
    }
    /// What is trained.
    fn trainable_vars(&self) -> Vec<(String, candle_core::Var)>;
    /// Writes the trained model folder (into an existing `dir`).
    fn save(&self, dir: &Path) -> Result<()>;
    /// One line for the log.
    fn describe(&self) -> String;
}

impl StepRewardModel for LatentRewardModel {
    fn diffusion(&self) -> &StableDiffusion {
        &self.model
    }

    fn schedule(&self) -> &NoiseSchedule {
        LatentRewardModel::schedule(self)
    }

    fn score_noisy(&self, x_t: &Tensor, t: &Tensor, prompts: &[&str]) -> Result<Tensor> {
        Ok(self.score_latents(x_t, t, prompts)?)
    }

    fn shared_noise(&self) -> bool {
        false
    }

    fn metrics(&self) -> Result<Vec<(&'static str, f64)>> {
        Ok(vec![("temperature", self.temperature()?)])
    }

    fn trainable_vars(&self) -> Vec<(String, candle_core::Var)> {
        LatentRewardModel::trainable_vars(self)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        Ok(LatentRewardModel::save(self, dir)?)
    }

    fn describe(&self) -> String {
        format!(
            "lrm: VFE guidance {}, backbone {}",
            self.config.guidance_scale,
            self.config.backbone.display()
        )
    }
}

/// Clean latents `[chosen…; rejected…]` of pairs (stored sampler latents when every pair has them and `stored`,
/// else the VAE modes of the preprocessed images).
fn pair_latents(
    m: &StableDiffusion,
    pairs: &[PairImages],
    pcfg: &PreprocessConfig,
    stored: bool,
    rng: &mut Rng,
) -> Result<Tensor> {
    let side = pcfg.resolution as usize / m.vae_scale_factor();
    if let Some(z) = crate::methods::pairwise::stored_pair_latents(
        stored,
        pairs,
        m.unet.config().in_channels,
        side,
        pcfg.random_flip,
    )? {
        return Ok(z.to_device(m.device())?);
    }
    let mut imgs = Vec::with_capacity(2 * pairs.len());
    let mut rej = Vec::with_capacity(pairs.len());
    for p in pairs {
        let pp = preprocess_pair(&p.chosen, &p.rejected, pcfg, rng)
            .with_context(|| format!("pair {}", p.source))?;
        imgs.push(pp.chosen);
        rej.push(pp.rejected);
    }
    imgs.extend(rej);
    // preprocess gives [-1, 1]; the encoder takes [0, 1].
    let x = ((Tensor::stack(&imgs, 0)?.to_device(m.device())? + 1.0)? * 0.5)?;
    Ok(diffpref_rewards::lrm::vae_latents(m, &x)?.detach())
}

/// Scores of pairs noised at per-pair timesteps `t` (`[P]`; the noise shared by a pair's images or not, as the
/// model says): returns `Δ = s_w − s_l`.
fn pair_gaps(
    m: &dyn StepRewardModel,
    z: &Tensor,
    prompts: &[&str],
    t: &[u64],
    rng: &mut Rng,
) -> Result<Tensor> {
    let p = prompts.len();
    let dev = z.device().clone();
    let noise = if m.shared_noise() {
        let mut half = z.dims().to_vec();
        half[0] = p;
        let n = rng.normal_tensor(&half, &dev)?;
        Tensor::cat(&[&n, &n], 0)?
    } else {
        rng.normal_tensor(z.dims(), &dev)?
    };
    let tt: Vec<f32> = t.iter().chain(t.iter()).map(|&x| x as f32).collect();
    let tt = Tensor::from_vec(tt, 2 * p, &dev)?;
    let x_t = m
        .schedule()
        .add_noise(&z.to_dtype(DType::F32)?, &noise, &tt)?;
    let both: Vec<&str> = prompts.iter().chain(prompts.iter()).copied().collect();
    let s = m.score_noisy(&x_t, &tt, &both)?;
    Ok((s.narrow(0, 0, p)? - s.narrow(0, p, p)?)?)
}

/// Accuracy of a step reward model on held-out pairs in one timestep band.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BandAccuracy {
    pub band: [u64; 2],
    /// Pairs with a definite label.
    pub pairs: usize,
    /// Share ranked as labelled, and its Wilson 95% interval.
    pub accuracy: f64,
    pub ci: [f64; 2],
    /// Share ranked as the ground truth ranks them (pairs with `reward_chosen` ≠ `reward_rejected`).
    pub truth_pairs: usize,
    pub truth_accuracy: Option<f64>,
    pub truth_ci: Option<[f64; 2]>,
}

/// The ground-truth rewards of a manifest's lines (`reward_chosen`, `reward_rejected`), by `"file:line"` source.
fn truth_of(manifest: &Path) -> Result<std::collections::HashMap<String, (f64, f64)>> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("cannot read {}", manifest.display()))?;
    let mut out = std::collections::HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(c), Some(r)) = (
            v.get("reward_chosen").and_then(|x| x.as_f64()),
            v.get("reward_rejected").and_then(|x| x.as_f64()),
        ) {
            out.insert(format!("{}:{}", manifest.display(), i + 1), (c, r));
        }
    }
    Ok(out)
}

/// Pair accuracy per band (see the module docs) of `m` on the pairs of `manifest`.
pub fn evaluate(
    m: &dyn StepRewardModel,
    manifest: &Path,
    bands: &[[u64; 2]],
    seed: u64,
    batch_size: usize,
    pcfg: &PreprocessConfig,
    stored: bool,
) -> Result<Vec<BandAccuracy>> {
    let opts = ManifestOptions {
        drop_ties: true,
        check_images: true,
        skip_bad: false,
    };
    let (pairs, _) = load_manifest(manifest, &opts)?;
    ensure!(!pairs.is_empty(), "{}: no pairs", manifest.display());
    let truth = truth_of(manifest)?;
    let t_max = m.schedule().num_train_timesteps() as u64;
    let mut dataset =
        crate::data::PairDataset::new(crate::data::PairSource::Manifest(pairs), 0, false);
    // The pairs' clean latents, prompts and ground truth, read once for every band.
    let mut img_rng = Rng::derive(seed, "lrm-eval-images");
    let mut batches = Vec::new();
    let mut start = 0;
    while start < dataset.len() {
        let k = batch_size.min(dataset.len() - start);
        let batch = (start..start + k)
            .map(|i| dataset.load(i))
            .collect::<Result<Vec<_>>>()?;
        let z = pair_latents(m.diffusion(), &batch, pcfg, stored, &mut img_rng)?;
        let prompts: Vec<String> = batch.iter().map(|p| p.prompt.clone()).collect();
        let truths: Vec<Option<(f64, f64)>> = batch
            .iter()
            .map(|p| truth.get(&p.source).copied())
            .collect();
        batches.push((z, prompts, truths));
        start += k;
    }
    let mut out = Vec::with_capacity(bands.len());
    for &[lo, hi] in bands {
        let hi = hi.min(t_max);
        ensure!(
            lo < hi,
            "[eval] band [{lo}, {hi}) lies outside the schedule"
        );
        let mut rng = Rng::derive(seed, &format!("lrm-eval-{lo}-{hi}"));
        let (mut right, mut n, mut t_right, mut t_n) = (0usize, 0usize, 0usize, 0usize);
        for (z, prompts, truths) in &batches {
            let prompts: Vec<&str> = prompts.iter().map(|p| p.as_str()).collect();
            let t: Vec<u64> = (0..prompts.len())
                .map(|_| lo + rng.below(hi - lo))
                .collect();
            let d: Vec<f32> = pair_gaps(m, z, &prompts, &t, &mut rng)?
                .detach()
                .to_vec1()?;
            for (truth, d) in truths.iter().zip(d) {
                n += 1;
                if d > 0.0 {
                    right += 1;
                }
                if let Some((c, r)) = truth {
                    if c != r {
                        t_n += 1;
                        if (d > 0.0) == (c > r) {
                            t_right += 1;
                        }
                    }
                }
            }
        }
        let (a, b) = wilson_interval(right as f64, n as f64, Z95);
        let truth_ci = (t_n > 0).then(|| {
            let (a, b) = wilson_interval(t_right as f64, t_n as f64, Z95);
            [a, b]
        });
        out.push(BandAccuracy {
            band: [lo, hi],
            pairs: n,
            accuracy: right as f64 / n.max(1) as f64,
            ci: [a, b],
            truth_pairs: t_n,
            truth_accuracy: (t_n > 0).then(|| t_right as f64 / t_n as f64),
            truth_ci,
        });
    }
    Ok(out)
}

#[derive(Serialize, Deserialize)]
struct PairRmState {
    noise_rng: Rng,
    data_rng: Rng,
    position: crate::data::DatasetPosition,
}

/// Training a [`StepRewardModel`] on pairs as a [`Method`] (`train lrm`, `train spm`).
pub struct PairRmMethod<M: StepRewardModel> {
    pub model: M,
    name: &'static str,
    data: TrainData,
    pcfg: PreprocessConfig,
    stored: bool,
    grid: usize,
    noise_rng: Rng,
    data_rng: Rng,
}

impl<M: StepRewardModel> PairRmMethod<M> {
    fn new(run: &PairRmRun<'_>, model: M, data: &DataConfig) -> Result<Self> {
        let (data_src, _) = TrainData::load(data, run.seed)?;
        Ok(PairRmMethod {
            model,
            name: run.name,
            data: data_src,
            pcfg: PreprocessConfig {
                center_crop: data.center_crop,
                random_flip: data.random_flip,
                ..PreprocessConfig::new(data.resolution)
            },
            stored: data.stored_latents,
            grid: run.timestep_grid,
            noise_rng: Rng::derive(run.seed, &format!("{}-noise", run.name)),
            data_rng: Rng::derive(run.seed, &format!("{}-data", run.name)),
        })
    }
}

impl<M: StepRewardModel> Method for PairRmMethod<M> {
    fn name(&self) -> &str {
        self.name
    }

    fn unit(&self) -> &str {
        "pairs"
    }

    fn headline_metric(&self) -> Option<&'static str> {
        Some("accuracy")
    }

    fn micro_step(&mut self, ctx: &StepContext<'_>) -> Result<MicroStep> {
        let TrainData::Pairs(dataset) = &mut self.data else {
            bail!("a step reward model trains on pairs");
        };
        let pairs = dataset.next_batch(ctx.batch_size)?;
        let z = pair_latents(
            self.model.diffusion(),
            &pairs,
            &self.pcfg,
            self.stored,
            &mut self.data_rng,
        )?;
        let t_max = self.model.schedule().num_train_timesteps() as u64;
        let t: Vec<u64> = (0..pairs.len())
            .map(|_| draw_t(&mut self.noise_rng, self.grid, t_max))
            .collect();
        let prompts: Vec<&str> = pairs.iter().map(|p| p.prompt.as_str()).collect();
        let delta = pair_gaps(&self.model, &z, &prompts, &t, &mut self.noise_rng)?;
        let y = Tensor::from_vec(
            pairs.iter().map(|p| p.label).collect::<Vec<f32>>(),
            pairs.len(),
            delta.device(),
        )?;
        let (loss, acc) = bt_loss(&delta, &y)?;
        let mut metrics = vec![("accuracy", acc)];
        metrics.extend(self.model.metrics()?);
        metrics.push((
            "gap_abs",
            delta.abs()?.mean_all()?.to_scalar::<f32>()? as f64,
        ));
        Ok(MicroStep {
            loss,
            metrics,
            units: pairs.len(),
            about: format!(
                "pairs {}",
                pairs
                    .iter()
                    .map(|p| p.source.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }

    fn on_start(&mut self, ctx: StartContext<'_>) -> Result<()> {
        ctx.progress.println(format!(
            "{} training pairs; {}",
            match &self.data {
                TrainData::Pairs(d) => d.len(),
                _ => 0,
            },
            self.model.describe()
        ));
        Ok(())
    }

    fn state(&self) -> Result<serde_json::Value> {
        Ok(serde_json::to_value(PairRmState {
            noise_rng: self.noise_rng.clone(),
            data_rng: self.data_rng.clone(),
            position: self.data.position(),
        })?)
    }

    fn load_state(&mut self, state: serde_json::Value) -> Result<()> {
        let s: PairRmState = serde_json::from_value(state)?;
        self.noise_rng = s.noise_rng;
        self.data_rng = s.data_rng;
        self.data.seek(s.position)
    }
}

/// What `train lrm` / `train spm` produced.
#[derive(Clone, Debug)]
pub struct PairRmSummary {
    pub steps: u64,
    pub output_dir: PathBuf,
    /// The trained model folder.
    pub weights: PathBuf,
    pub interrupted: bool,
    /// Held-out accuracy per band before and after training.
    pub before: Option<Vec<BandAccuracy>>,
    pub after: Option<Vec<BandAccuracy>>,
    pub seconds: f64,
}

/// Makes `<out>/<name>` with `cfg`'s pairs unless a finished set is there.
fn ensure_pairs(
    backbone: &Path,
    device: &Device,
    cfg: &MakePairsConfig,
    dir: &Path,
    progress: bool,
) -> Result<()> {
    if dir.join("manifest.jsonl").exists() {
        return Ok(());
    }
    let prompts_file = cfg.prompts.as_ref().context("prompts")?;
    let captions = crate::eval::read_prompts(prompts_file, true)
        .with_context(|| format!("{}", prompts_file.display()))?;
    let model = diffpref_pipelines::loading::StableDiffusion::load(
        backbone,
        &diffpref_pipelines::loading::LoadOptions {
            dtype: DType::F32,
            device: device.clone(),
            variant: None,
        },
    )?;
    if cfg.source == PairsSource::Renders {
        let (lh, _) =
            diffpref_pipelines::pipeline::Pipeline::new(&model)?.latent_size(&Default::default())?;
        let size = (lh * model.vae_scale_factor()) as u32;
        return write_dir_atomic(dir, |d| {
            let s = crate::data::prefs::render_prefs(&captions, cfg.pairs, cfg.seed, size, d)?;
            eprintln!(
                "rendered {} pairs in {} (a caption's render against a one-edit corruption's)",
                s.pairs,
                dir.display()
            );
            Ok(())
        });
    }
    let pb = if progress {
        Some(crate::train::metrics::count_bar(cfg.pairs, "pairs"))
    } else {
        None
    };
    write_dir_atomic(dir, |d| {
        let s = make_prefs(&model, &captions, &cfg.options(), d, &|| {
            if let Some(p) = &pb {
                p.inc(1)
            }
        })?;
        eprintln!(
            "made {} pairs in {} (the chosen image has the higher ground-truth reward in {:.1}%)",
            s.pairs,
            dir.display(),
            100.0 * s.agree as f64 / s.pairs.max(1) as f64
        );
        Ok(())
    })?;
    if let Some(p) = pb {
        p.finish_and_clear();
    }
    Ok(())
}

pub(crate) fn print_bands(what: &str, bands: &[BandAccuracy]) {
    for b in bands {
        let truth = match (b.truth_accuracy, b.truth_ci) {
            (Some(a), Some(ci)) => format!(
                "; vs ground truth {a:.3} [{:.3}, {:.3}] ({} pairs)",
                ci[0], ci[1], b.truth_pairs
            ),
            _ => String::new(),
        };
        eprintln!(
            "  {what} t in [{}, {}): accuracy {:.3} [{:.3}, {:.3}] ({} pairs){truth}",
            b.band[0], b.band[1], b.accuracy, b.ci[0], b.ci[1], b.pairs
        );
    }
}

/// The settings `train lrm` and `train spm` share (borrowed from either config).
pub(crate) struct PairRmRun<'a> {
    /// The method's name (`lrm`, `spm`): the command, the model folder, the evaluation file.
    pub name: &'static str,
    pub model: &'a str,
    pub output_dir: PathBuf,
    pub seed: u64,
    pub device: &'a DeviceSpec,
    pub resume: bool,
    pub overwrite: bool,
    pub data: &'a DataConfig,
    pub pairs: Option<&'a MakePairsConfig>,
    pub optim: &'a OptimConfig,
    pub log: &'a LogConfig,
    pub eval: &'a LrmEvalConfig,
    pub timestep_grid: usize,
    /// The whole config (saved with the checkpoints).
    pub config: serde_json::Value,
    /// Other inputs the run reads (never written over).
    pub inputs: Vec<(&'static str, PathBuf)>,
}

impl PairRmRun<'_> {
    fn train_manifest(&self) -> Option<PathBuf> {
        match &self.pairs {
            Some(_) => Some(self.output_dir.join("pairs/manifest.jsonl")),
            None => self.data.manifest.clone(),
        }
    }

    fn eval_manifest(&self) -> Option<PathBuf> {
        match &self.eval.make {
            Some(_) => Some(self.output_dir.join("eval-pairs/manifest.jsonl")),
            None => self.eval.manifest.clone(),
        }
    }
}

/// Runs (or resumes) a pair-trained step reward model: makes the pairs, evaluates before, trains, writes the
/// model to `<output_dir>/<name>`, evaluates after. `build` makes the model from the resolved diffusion model
/// folder.
pub(crate) fn train_pair_rm<M: StepRewardModel>(
    run: PairRmRun<'_>,
    build: impl FnOnce(&Path, &Device) -> Result<M>,
    stop: Option<StopFlag>,
) -> Result<PairRmSummary> {
    let t0 = Instant::now();
    let out = run.output_dir.clone();
    let backbone = diffpref_pipelines::loading::resolve_model(run.model, None)
        .with_context(|| format!("model {}", run.model))?;
    let command = format!("train {}", run.name);
    let guard = OutputDir {
        path: &out,
        key: "output_dir",
        command: &command,
        legacy: &[],
    };
    let mut inputs = vec![Input::new("model", &backbone)];
    if let Some(m) = &run.data.manifest {
        inputs.push(Input::new("[data] manifest", m));
    }
    if let Some(m) = &run.eval.manifest {
        inputs.push(Input::new("[eval] manifest", m));
    }
    let prompt_files: Vec<PathBuf> = run
        .pairs
        .iter()
        .copied()
        .chain(run.eval.make.iter())
        .filter_map(|p| p.prompts.clone())
        .collect();
    for p in &prompt_files {
        inputs.push(Input::new("prompts file", p));
    }
    for (what, p) in &run.inputs {
        inputs.push(Input::new(what, p));
    }
    guard.check(&inputs, run.overwrite)?;
    guard.create()?;
    let device = run.device.device()?;
    let progress = run.log.progress;
    if let Some(p) = run.pairs {
        ensure_pairs(&backbone, &device, p, &out.join("pairs"), progress)?;
    }
    if let Some(p) = &run.eval.make {
        ensure_pairs(&backbone, &device, p, &out.join("eval-pairs"), progress)?;
    }
    let mut data = run.data.clone();
    data.manifest = run.train_manifest();
    let model = build(&backbone, &device)?;
    let pcfg = PreprocessConfig {
        center_crop: data.center_crop,
        random_flip: false,
        ..PreprocessConfig::new(data.resolution)
    };
    let eval_manifest = run.eval_manifest();
    let eval_json = out.join(format!("{}_eval.json", run.name));
    let ev = &run.eval;
    let before = match &eval_manifest {
        Some(m) => {
            // The untrained model's accuracy is kept from the first run of this folder.
            let prev: Option<serde_json::Value> = std::fs::read_to_string(&eval_json)
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok());
            match prev.and_then(|v| serde_json::from_value(v["before"].clone()).ok()) {
                Some(b) => Some(b),
                None => {
                    let b = evaluate(
                        &model,
                        m,
                        &ev.bands,
                        ev.seed,
                        ev.batch_size,
                        &pcfg,
                        data.stored_latents,
                    )?;
                    print_bands("before", &b);
                    crate::io::write_atomic(
                        &eval_json,
                        serde_json::to_string_pretty(&serde_json::json!({ "before": b }))?
                            .as_bytes(),
                    )?;
                    Some(b)
                }
            }
        }
        None => None,
    };
    let policy = Policy::without_reference(model.trainable_vars());
    let mut method = PairRmMethod::new(&run, model, &data)?;
    let settings = TrainerSettings {
        optim: run.optim.clone(),
        log: run.log.clone(),
        output_dir: out.clone(),
        resume: run.resume,
        checkpoints: true,
        config: run.config.clone(),
    };
    let outcome = run_loop(&settings, &policy, &mut method, &mut Hooks::none(), stop)?;
    let weights = out.join(run.name);
    write_dir_atomic(&weights, |d| method.model.save(d))?;
    let after = match (&eval_manifest, outcome.interrupted) {
        (Some(m), false) => {
            let a = evaluate(
                &method.model,
                m,
                &ev.bands,
                ev.seed,
                ev.batch_size,
                &pcfg,
                data.stored_latents,
            )?;
            print_bands("after", &a);
            crate::io::write_atomic(
                &eval_json,
                serde_json::to_string_pretty(&serde_json::json!({
                    "before": before,
                    "after": a,
                    "steps": outcome.steps,
                    "train_seconds": t0.elapsed().as_secs_f64(),
                }))?
                .as_bytes(),
            )?;
            Some(a)
        }
        _ => None,
    };
    Ok(PairRmSummary {
        steps: outcome.steps,
        output_dir: out,
        weights,
        interrupted: outcome.interrupted,
        before,
        after,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Runs (or resumes) `train lrm`.
pub fn train(cfg: &LrmConfig, stop: Option<StopFlag>) -> Result<PairRmSummary> {
    cfg.validate()?;
    let run = PairRmRun {
        name: "lrm",
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
        timestep_grid: cfg.lrm.timestep_grid,
        config: serde_json::to_value(cfg)?,
        inputs: Vec::new(),
    };
    let l = &cfg.lrm;
    train_pair_rm(
        run,
        |backbone, device| {
            Ok(LatentRewardModel::new_trainable(
                backbone,
                l.guidance_scale,
                Trainable {
                    unet: l.train_unet,
                    text_encoders: l.train_text_encoder,
                },
                Rng::derive(cfg.seed, "lrm-init").next_u64(),
                device,
            )?)
        },
        stop,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bt_loss_matches_hand_computed_values_and_gradient() {
        let d = &Device::Cpu;
        let delta = Tensor::new(&[1.0f32, -2.0, 0.5], d).unwrap();
        let y = Tensor::new(&[1.0f32, 1.0, 0.5], d).unwrap();
        let (loss, acc) = bt_loss(&delta, &y).unwrap();
        let sp = |x: f64| (1.0 + x.exp()).ln();
        // y = 1: softplus(−Δ); y = ½: ½ softplus(−Δ) + ½ softplus(Δ).
        let want = (sp(-1.0) + sp(2.0) + 0.5 * sp(-0.5) + 0.5 * sp(0.5)) / 3.0;
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        assert!((acc - 0.5).abs() < 1e-12, "ties do not count: {acc}");
        // dℓ/dΔ = σ(Δ) − y, over N.
        let v = candle_core::Var::from_tensor(&delta).unwrap();
        let (l, _) = bt_loss(v.as_tensor(), &y).unwrap();
        let g = l
            .backward()
            .unwrap()
            .get(v.as_tensor())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let s = |x: f64| 1.0 / (1.0 + (-x).exp());
        for (got, want) in g.iter().zip([s(1.0) - 1.0, s(-2.0) - 1.0, s(0.5) - 0.5]) {
            assert!((*got as f64 - want / 3.0).abs() < 1e-6, "{g:?}");
        }
        // Large gaps stay finite.
        let big = Tensor::new(&[200.0f32, -200.0], d).unwrap();
        let (l, _) = bt_loss(&big, &Tensor::new(&[1.0f32, 1.0], d).unwrap()).unwrap();
        assert!((l.to_scalar::<f32>().unwrap() - 100.0).abs() < 1e-3);
    }

    #[test]
    fn timestep_grid_is_the_ddim_grid() {
        let mut rng = Rng::derive(0, "t");
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            seen.insert(draw_t(&mut rng, 20, 1000));
        }
        let want: std::collections::BTreeSet<u64> = (0..20).map(|k| 1 + 50 * k).collect();
        assert_eq!(seen, want);
        assert!((0..100).all(|_| draw_t(&mut rng, 0, 1000) < 1000));
    }
}
