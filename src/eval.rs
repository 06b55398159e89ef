//! Held-out evaluation of a text-to-image model with a reward: the measurement behind `diffpref eval`, the
//! before/after report of `diffpref train dpo` and `diffpref bench align`.
//!
//! Sample `j` of prompt `i` starts from the initial noise of seed `derive(seed, "eval-{i}-{j}")`, whatever the
//! weights, so two models (a base and its fine-tune) are compared on equal noise and their rewards are paired.
//! With `r_b` and `r_m` the rewards of the base and the evaluated model on the same noise:
//!
//! * **mean reward** `r̄ ± t(0.975, n−1)·s/√n` (Student-t 95% interval over the n = prompts × samples images);
//! * **difference** `mean(r_m − r_b)` with the same paired interval: the improvement is beyond its confidence
//!   interval when the interval's lower end is above 0;
//! * **win rate** `(#{r_m > r_b} + ½·#{r_m = r_b}) / n` with its 95% Wilson interval;
//! * **diversity**: for every prompt with k ≥ 2 samples, the mean over its k(k−1)/2 pairs of the RMS pixel
//!   distance `sqrt(mean((x_a − x_b)²))` (pixels in [0, 1]), averaged over prompts. Mode collapse shows as a
//!   drop.

use crate::data::shapes::parse_caption;
use crate::imaging::{grid, images_to_tensor, tensor_to_images, GridOptions};
use crate::train::rng::Rng;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use diffpref_pipelines::loading::StableDiffusion;
use diffpref_pipelines::pipeline::{seeded_noise, GenerateOptions, Pipeline};
use diffpref_pipelines::schedulers::SchedulerKind;
use diffpref_rewards::metrics::{wilson_interval, MeanCi, Z95};
use diffpref_rewards::shapes::Breakdown;
use diffpref_rewards::Reward;
use image::RgbImage;
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The prompts of a text file, one per line (blank lines and lines starting with `#` skipped). With
/// `shapes_grammar`, every line must parse as a shapes caption; errors name the file and line.
pub fn read_prompts(path: &Path, shapes_grammar: bool) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading prompts {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if shapes_grammar && parse_caption(line).is_none() {
            bail!(
                "{} line {}: {line:?} is not a shapes caption (e.g. \"a red circle\", \"two blue squares\", \
                 \"a red circle above a blue square\")",
                path.display(),
                i + 1
            );
        }
        out.push(line.to_string());
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

/// How evaluation samples are drawn.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    /// Samples per prompt (different noise seeds).
    pub samples_per_prompt: usize,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale.
    pub guidance: f64,
    /// Sampler (default: the model's scheduler).
    pub scheduler: Option<SchedulerKind>,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Images per pipeline call.
    pub batch_size: usize,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions {
            samples_per_prompt: 4,
            steps: 20,
            guidance: 7.5,
            scheduler: None,
            seed: 0,
            batch_size: 16,
        }
    }
}

/// The seed of the initial noise of sample `j` of prompt `i`.
pub fn sample_seed(seed: u64, i: usize, j: usize) -> u64 {
    Rng::derive(seed, &format!("eval-{i}-{j}")).next_u64()
}

/// Scored samples, prompt-major: image `i·k + j` is sample `j` of prompt `i` (k samples per prompt).
#[derive(Clone, Debug)]
pub struct Samples {
    pub prompts: Vec<String>,
    pub samples_per_prompt: usize,
    pub images: Vec<RgbImage>,
    pub rewards: Vec<f64>,
}

impl Samples {
    /// The images of prompt `i`.
    pub fn of_prompt(&self, i: usize) -> &[RgbImage] {
        let k = self.samples_per_prompt;
        &self.images[i * k..(i + 1) * k]
    }

    /// Mean reward of prompt `i`.
    pub fn prompt_mean(&self, i: usize) -> f64 {
        let k = self.samples_per_prompt;
        self.rewards[i * k..(i + 1) * k].iter().sum::<f64>() / k as f64
    }
}

/// Samples every prompt `opts.samples_per_prompt` times from `model` and scores the 8-bit images with
/// `reward` (scored on the model's device). `progress`, when given, advances by one per image.
pub fn sample_and_score(
    model: &StableDiffusion,
    prompts: &[String],
    opts: &SampleOptions,
    reward: &dyn Reward,
    progress: Option<&ProgressBar>,
) -> Result<Samples> {
    ensure!(!prompts.is_empty(), "evaluation needs at least one prompt");
    ensure!(
        opts.samples_per_prompt >= 1,
        "evaluation needs at least one sample per prompt"
    );
    let pipe = Pipeline::new(model)?;
    let base = GenerateOptions {
        steps: opts.steps,
        guidance_scale: opts.guidance,
        seed: opts.seed,
        scheduler: opts.scheduler,
        ..Default::default()
    };
    let (lh, lw) = pipe.latent_size(&base)?;
    let c = model.unet.config().in_channels;
    let k = opts.samples_per_prompt;
    let jobs: Vec<(usize, usize)> = (0..prompts.len())
        .flat_map(|i| (0..k).map(move |j| (i, j)))
        .collect();
    let mut images = Vec::with_capacity(jobs.len());
    let mut rewards = Vec::with_capacity(jobs.len());
    for chunk in jobs.chunks(opts.batch_size.max(1)) {
        let batch_prompts: Vec<&str> = chunk.iter().map(|&(i, _)| prompts[i].as_str()).collect();
        let noise = chunk
            .iter()
            .map(|&(i, j)| {
                seeded_noise(sample_seed(opts.seed, i, j), &[1, c, lh, lw], &Device::Cpu)
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let out = pipe
            .generate(
                &batch_prompts,
                &[],
                &GenerateOptions {
                    init_latents: Some(Tensor::cat(&noise, 0)?),
                    ..base.clone()
                },
                None,
            )
            .with_context(|| format!("sampling {:?}", batch_prompts[0]))?;
        // Score the 8-bit images (what a user saves), not the float decoder output.
        let imgs = tensor_to_images(&out.images)?;
        let scores = reward
            .score(&images_to_tensor(&imgs, model.device())?, &batch_prompts)
            .with_context(|| format!("scoring with {}", reward.name()))?;
        let scores: Vec<f64> = scores
            .to_dtype(candle_core::DType::F64)?
            .to_device(&Device::Cpu)?
            .to_vec1()?;
        if let Some(pb) = progress {
            pb.inc(chunk.len() as u64);
        }
        images.extend(imgs);
        rewards.extend(scores);
    }
    Ok(Samples {
        prompts: prompts.to_vec(),
        samples_per_prompt: k,
        images,
        rewards,
    })
}

/// RMS distance of two images in [0, 1] pixel units.
fn rms_distance(a: &RgbImage, b: &RgbImage) -> f64 {
    let (pa, pb) = (a.as_raw(), b.as_raw());
    let n = pa.len().min(pb.len()).max(1);
    let ss: f64 = pa
        .iter()
        .zip(pb)
        .map(|(&x, &y)| {
            let d = (x as f64 - y as f64) / 255.0;
            d * d
        })
        .sum();
    (ss / n as f64).sqrt()
}

/// Mean over prompts of the mean pairwise RMS pixel distance between that prompt's samples (`None` with one
/// sample per prompt).
pub fn diversity(s: &Samples) -> Option<f64> {
    let k = s.samples_per_prompt;
    if k < 2 {
        return None;
    }
    let mut per_prompt = Vec::with_capacity(s.prompts.len());
    for i in 0..s.prompts.len() {
        let imgs = s.of_prompt(i);
        let mut sum = 0.0;
        let mut n = 0usize;
        for a in 0..k {
            for b in a + 1..k {
                sum += rms_distance(&imgs[a], &imgs[b]);
                n += 1;
            }
        }
        per_prompt.push(sum / n as f64);
    }
    Some(per_prompt.iter().sum::<f64>() / per_prompt.len() as f64)
}

/// Reward and diversity of one model's samples.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub reward: MeanCi,
    pub diversity: Option<f64>,
}

pub fn summarize(s: &Samples) -> Summary {
    Summary {
        reward: MeanCi::of(&s.rewards),
        diversity: diversity(s),
    }
}

/// A model against a base on the same prompts and noise.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Comparison {
    pub base: Summary,
    pub model: Summary,
    /// Paired `r_model − r_base` with its 95% interval.
    pub difference: MeanCi,
    /// `(wins + ties/2) / n`.
    pub win_rate: f64,
    /// 95% Wilson interval of the win rate.
    pub win_rate_ci95: (f64, f64),
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
}

impl Comparison {
    /// The improvement's 95% interval lies above zero.
    pub fn improved_beyond_ci(&self) -> bool {
        self.difference.lo() > 0.0
    }

    /// The JSON report: `fields` (settings), every figure of the comparison, `improved_beyond_ci` and the
    /// per-prompt means.
    pub fn report(
        &self,
        fields: serde_json::Value,
        per_prompt: Vec<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let mut out = match fields {
            serde_json::Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        if let serde_json::Value::Object(m) = serde_json::to_value(self)? {
            out.extend(m);
        }
        out.insert(
            "improved_beyond_ci".into(),
            self.improved_beyond_ci().into(),
        );
        out.insert("per_prompt".into(), per_prompt.into());
        Ok(serde_json::Value::Object(out))
    }

    /// The metrics-log values of the evaluated model.
    pub fn metrics(&self) -> [(&'static str, f64); 3] {
        [
            ("eval_reward", self.model.reward.mean),
            ("eval_ci95", self.model.reward.ci95),
            ("eval_win_rate", self.win_rate),
        ]
    }
}

/// One term of the shapes world's exact reward, compared between two sample sets (see [`shapes_terms`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TermChange {
    pub term: String,
    pub base: f64,
    pub model: f64,
    /// Paired `model − base` per sample with its 95% interval, over the samples the term applies to.
    pub change: MeanCi,
}

/// What moved: each term of the shapes world's exact reward (`reward = 0.8 · fidelity + 0.2 · aesthetic`,
/// `fidelity` from colour, shape, count and relation, `aesthetic` from size, centring and contrast; see
/// [`diffpref_rewards::shapes::ShapesReward`]) for two sample sets on the same shapes captions and noise,
/// paired per sample. `relation` counts only the samples of captions that state one. A method that raises the
/// reward through the aesthetic terms alone, or through one fidelity term at another's cost, shows it here.
pub fn shapes_terms(base: &Samples, model: &Samples) -> Result<Vec<TermChange>> {
    ensure!(
        base.prompts == model.prompts && base.samples_per_prompt == model.samples_per_prompt,
        "shapes_terms: the two sample sets have different prompts or sample counts"
    );
    let reward = diffpref_rewards::shapes::ShapesReward::new();
    let k = base.samples_per_prompt;
    let prompts: Vec<&str> = base
        .prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.as_str(), k))
        .collect();
    let terms = |s: &Samples| -> Result<Vec<Breakdown>> {
        reward
            .breakdown(&images_to_tensor(&s.images, &Device::Cpu)?, &prompts)
            .context("the shapes reward's terms")
    };
    let (b, m) = (terms(base)?, terms(model)?);
    Ok(paired_terms(b.iter().zip(&m))
        .into_iter()
        .map(|(name, pairs)| {
            let n = pairs.len() as f64;
            TermChange {
                term: name.to_string(),
                base: pairs.iter().map(|p| p.0).sum::<f64>() / n,
                model: pairs.iter().map(|p| p.1).sum::<f64>() / n,
                change: MeanCi::of(&pairs.iter().map(|p| p.1 - p.0).collect::<Vec<_>>()),
            }
        })
        .collect())
}

/// Per term of the shapes reward (in [`Breakdown::TERM_NAMES`] order), the `(first, second)` values of every
/// pair of breakdowns that has it (`relation` only where the prompt states one); a term no pair has is left out.
pub fn paired_terms<'a>(
    pairs: impl IntoIterator<Item = (&'a Breakdown, &'a Breakdown)>,
) -> Vec<(&'static str, Vec<(f64, f64)>)> {
    let rows: Vec<_> = pairs
        .into_iter()
        .map(|(x, y)| (x.terms(), y.terms()))
        .collect();
    Breakdown::TERM_NAMES
        .iter()
        .enumerate()
        .filter_map(|(i, &name)| {
            let v: Vec<(f64, f64)> = rows
                .iter()
                .filter_map(|(x, y)| Some((x[i].1? as f64, y[i].1? as f64)))
                .collect();
            (!v.is_empty()).then_some((name, v))
        })
        .collect()
}

/// Compares `model`'s samples with `base`'s (same prompts, same samples per prompt, same noise).
pub fn compare(base: &Samples, model: &Samples) -> Result<Comparison> {
    ensure!(
        base.prompts == model.prompts && base.samples_per_prompt == model.samples_per_prompt,
        "compare: the two sample sets have different prompts or sample counts"
    );
    let diffs: Vec<f64> = model
        .rewards
        .iter()
        .zip(&base.rewards)
        .map(|(m, b)| m - b)
        .collect();
    let wins = diffs.iter().filter(|d| **d > 0.0).count();
    let ties = diffs.iter().filter(|d| **d == 0.0).count();
    let n = diffs.len();
    let score = wins as f64 + 0.5 * ties as f64;
    Ok(Comparison {
        base: summarize(base),
        model: summarize(model),
        difference: MeanCi::of(&diffs),
        win_rate: score / n as f64,
        win_rate_ci95: wilson_interval(score, n as f64, Z95),
        wins,
        ties,
        losses: n - wins - ties,
    })
}

/// A grid with one row per prompt (the first `max_prompts`) and, per model, up to `max_samples` columns of
/// its samples; cells are upscaled to about 96 px.
pub fn comparison_grid(
    sets: &[(&str, &Samples)],
    max_prompts: usize,
    max_samples: usize,
) -> Result<RgbImage> {
    ensure!(!sets.is_empty(), "comparison_grid: no sample sets");
    let first = sets[0].1;
    let rows_n = first.prompts.len().min(max_prompts.max(1));
    let k = first.samples_per_prompt.min(max_samples.max(1));
    let mut col_labels = Vec::new();
    for (name, _) in sets {
        for j in 0..k {
            col_labels.push(format!("{name} #{}", j + 1));
        }
    }
    let mut rows = Vec::with_capacity(rows_n);
    let mut row_labels = Vec::with_capacity(rows_n);
    for i in 0..rows_n {
        let mut cells = Vec::new();
        let mut means = Vec::new();
        for (name, s) in sets {
            cells.extend(s.of_prompt(i)[..k].iter().cloned());
            means.push(format!("{name} {:.2}", s.prompt_mean(i)));
        }
        rows.push(cells);
        row_labels.push(format!("{} ({})", first.prompts[i], means.join(", ")));
    }
    let side = first.images.first().map(|i| i.width()).unwrap_or(96).max(1);
    grid(
        &rows,
        &row_labels,
        &col_labels,
        &GridOptions {
            scale: (96 / side).clamp(1, 8),
            font_px: 12.0,
            ..Default::default()
        },
    )
}

/// Per-prompt mean rewards, for JSON reports.
pub fn per_prompt(sets: &[(&str, &Samples)]) -> Vec<serde_json::Value> {
    let first = sets[0].1;
    (0..first.prompts.len())
        .map(|i| {
            let mut o = serde_json::Map::new();
            o.insert("prompt".into(), first.prompts[i].clone().into());
            for (name, s) in sets {
                o.insert((*name).to_string(), s.prompt_mean(i).into());
            }
            serde_json::Value::Object(o)
        })
        .collect()
}

/// `0.712 ± 0.031` (mean ± 95% half-width).
pub fn fmt_ci(m: &MeanCi) -> String {
    format!("{:.4} ± {:.4}", m.mean, m.ci95)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn flat(v: u8) -> RgbImage {
        RgbImage::from_pixel(4, 4, Rgb([v, v, v]))
    }

    fn samples(rewards: Vec<f64>, k: usize, images: Vec<RgbImage>) -> Samples {
        let n = rewards.len() / k;
        Samples {
            prompts: (0..n).map(|i| format!("p{i}")).collect(),
            samples_per_prompt: k,
            images,
            rewards,
        }
    }

    #[test]
    fn comparison_pairs_rewards_and_counts_ties_half() {
        let imgs = || (0..4).map(|i| flat(i * 60)).collect::<Vec<_>>();
        let base = samples(vec![0.5, 0.5, 0.2, 0.9], 2, imgs());
        let model = samples(vec![0.6, 0.5, 0.4, 0.8], 2, imgs());
        let c = compare(&base, &model).unwrap();
        assert_eq!((c.wins, c.ties, c.losses), (2, 1, 1));
        assert!((c.win_rate - 0.625).abs() < 1e-12);
        assert!((c.difference.mean - 0.05).abs() < 1e-12);
        assert!((c.base.reward.mean - 0.525).abs() < 1e-12);
        // A constant improvement has a zero-width interval and counts as beyond it.
        let up = samples(vec![0.6, 0.6, 0.3, 1.0], 2, imgs());
        let c = compare(&base, &up).unwrap();
        assert!(c.difference.ci95.abs() < 1e-12 && c.improved_beyond_ci());
        let other = samples(vec![0.5, 0.5], 1, vec![flat(0), flat(0)]);
        assert!(compare(&base, &other).is_err());
    }

    /// Ground-truth renders against blank images of the same captions: every term the renders satisfy rises,
    /// `reward` is the exact reward's mean, and `relation` counts only the captions that state one.
    #[test]
    fn shapes_terms_pair_each_term_per_sample() {
        let scenes = crate::data::shapes::random_scenes(3, 12, 2);
        let with_relation = scenes
            .iter()
            .filter(|s| s.spec().relation.is_some())
            .count();
        assert!(with_relation > 0 && with_relation < scenes.len());
        let prompts: Vec<String> = scenes.iter().map(|s| s.caption()).collect();
        let set = |images: Vec<RgbImage>| {
            let t = images_to_tensor(&images, &Device::Cpu).unwrap();
            let p: Vec<&str> = prompts.iter().map(|p| p.as_str()).collect();
            let r: Vec<f64> = diffpref_rewards::shapes::ShapesReward::new()
                .score_exact(&t, &p)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect();
            Samples {
                prompts: prompts.clone(),
                samples_per_prompt: 1,
                images,
                rewards: r,
            }
        };
        let blank = set(scenes
            .iter()
            .map(|s| RgbImage::from_pixel(32, 32, Rgb(s.background)))
            .collect());
        let drawn = set(scenes.iter().map(|s| s.render(32)).collect());
        let terms = shapes_terms(&blank, &drawn).unwrap();
        let names: Vec<&str> = terms.iter().map(|t| t.term.as_str()).collect();
        assert_eq!(
            names,
            [
                "colour",
                "shape",
                "count",
                "relation",
                "fidelity",
                "size",
                "centring",
                "contrast",
                "aesthetic",
                "reward"
            ]
        );
        let term = |n: &str| terms.iter().find(|t| t.term == n).unwrap();
        assert_eq!(term("relation").change.n, with_relation);
        assert_eq!(term("colour").change.n, scenes.len());
        for n in ["colour", "count", "fidelity", "reward"] {
            let t = term(n);
            assert!(t.model > t.base && t.change.mean > 0.0, "{n}: {t:?}");
            assert!((t.change.mean - (t.model - t.base)).abs() < 1e-9, "{n}");
        }
        let mean = |s: &Samples| s.rewards.iter().sum::<f64>() / s.rewards.len() as f64;
        assert!((term("reward").base - mean(&blank)).abs() < 1e-6);
        assert!((term("reward").model - mean(&drawn)).abs() < 1e-6);
        // A set against itself: no change in any term.
        assert!(shapes_terms(&drawn, &drawn)
            .unwrap()
            .iter()
            .all(|t| t.change.mean == 0.0));
    }

    #[test]
    fn diversity_is_mean_pairwise_rms_distance_per_prompt() {
        // Prompt 0: black, white (distance 1); prompt 1: two equal images (0).
        let s = samples(
            vec![0.0; 4],
            2,
            vec![flat(0), flat(255), flat(100), flat(100)],
        );
        assert!((diversity(&s).unwrap() - 0.5).abs() < 1e-12);
        let one = samples(vec![0.0; 2], 1, vec![flat(0), flat(255)]);
        assert!(diversity(&one).is_none());
    }

    #[test]
    fn prompt_files_name_the_bad_line() {
        let dir = std::env::temp_dir().join(format!("diffpref-eval-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("prompts.txt");
        std::fs::write(&p, "# held out\na red circle\n\na purple elephant\n").unwrap();
        let err = read_prompts(&p, true).unwrap_err().to_string();
        assert!(
            err.contains("line 4") && err.contains("prompts.txt"),
            "{err}"
        );
        assert_eq!(read_prompts(&p, false).unwrap().len(), 2);
        std::fs::remove_dir_all(&dir).ok();
    }
}
