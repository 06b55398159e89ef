//! `diffpref score`: scores images with a reward model, or measures how often a reward agrees with human
//! preference pairs.
//!
//! ```text
//! diffpref score --reward clip|aesthetic|pickscore|hps|imagereward|shapes [--weights PATH]
//!     (--images FILE|DIR ... (--prompt P | --prompts FILE) | --manifest FILE | --pairs FILE)
//!     [--clip PATH] [--tokenizer DIR] [--batch-size N] [--json] [--terms] [--device cpu|cuda[:N]] [--dtype f32|bf16|f16]
//! ```
//!
//! * `--weights`: the model folder (or weights file, or hub id). `clip` / `pickscore`: a transformers
//!   `CLIPModel` folder (`config.json` + `model.safetensors`; open_clip folders work too). `hps`: an open_clip
//!   folder (`open_clip_config.json` + `open_clip_model.safetensors`), or an HPSv2 checkpoint (`.pt`, its
//!   `state_dict` is read) without a config, which then gets open_clip's ViT-H-14 config. `aesthetic`: the
//!   head folder (`model.safetensors` or the original `.pth`, plus `config.json` with `input_size`), with
//!   `--clip PATH` naming the CLIP ViT-L/14 backbone folder. `imagereward`: the ImageReward folder.
//! * `shapes`: the shapes world's ground-truth reward (computed from pixels; no `--weights`), prompts must be
//!   shapes captions ("a red circle above a blue square").
//! * `--tokenizer DIR`: a CLIP tokenizer folder, for models that ship none (open_clip / HPSv2 checkpoints).
//! * `--images` takes files and folders (a folder contributes its PNG / JPEG files, sorted by name);
//!   `--prompt` applies to every image, `--prompts FILE` has one prompt per line (one per image).
//!   `--manifest FILE` is JSONL: `{"image": PATH, "prompt": P}` per line, paths relative to the manifest.
//! * `--pairs FILE` is JSONL: `{"prompt": P, "chosen": PATH, "rejected": PATH[, "label": L]}`, paths relative
//!   to the file; `label` is the probability that `chosen` is preferred (default 1; 0 = `rejected` is
//!   preferred; 0.5 = a tie, left out). Reports the accuracy (the reward ranks the preferred image higher;
//!   equal scores count as wrong) with its 95% Wilson interval.
//! * `--terms` (`shapes` only): every term of the exact reward per image; with `--pairs`, per term the
//!   preferred and the other image's means, the paired difference and how often the preferred image is higher
//!   (labels orient the pairs; ties left out) — what a preference set teaches.
//! * Images of different sizes are scored in separate batches (each model resizes them itself).

use super::common::ComputeArgs;
use crate::imaging::{images_to_tensor, load_image};
use crate::scoring::{load_reward_opt, RewardKind};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use diffpref_rewards::metrics::{pair_accuracy, PairAccuracy};
use diffpref_rewards::shapes::Breakdown;
use diffpref_rewards::Reward;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Arguments of `diffpref score`.
#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// Reward model.
    #[arg(long, value_enum)]
    pub reward: RewardKind,
    /// Model folder, weights file or hub id (for `aesthetic`: the head folder; see --clip). Not used by
    /// `shapes`.
    #[arg(long)]
    pub weights: Option<String>,
    /// `aesthetic` only: the CLIP backbone (a ViT-L/14 transformers CLIPModel folder for the LAION head).
    #[arg(long)]
    pub clip: Option<String>,
    /// CLIP tokenizer folder (tokenizer.json, or vocab.json + merges.txt) for models that ship none.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Image files and/or folders.
    #[arg(long, num_args = 1..)]
    pub images: Vec<PathBuf>,
    /// One prompt for every image.
    #[arg(long)]
    pub prompt: Option<String>,
    /// A text file with one prompt per line (one per image, in order).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// JSONL with {"image": PATH, "prompt": P} per line (paths relative to the file).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// JSONL preference pairs {"prompt", "chosen", "rejected"[, "label"]}: report the reward's accuracy.
    #[arg(long)]
    pub pairs: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// `shapes` only: every term of the exact reward (colour, shape, count, relation, fidelity, size, centring,
    /// contrast, aesthetic) per image; with --pairs, per term the preferred and the other image's means, their
    /// paired difference with its 95% interval and how often the preferred image scores higher: what the pairs
    /// of a preference set differ in.
    #[arg(long)]
    pub terms: bool,
    /// `lrm` / `spm` only: the timestep images are scored at (their clean latents noised with a seeded noise
    /// when T > 0; the SPM scores the x0 its diffusion model predicts from them); with --pairs, the accuracy at
    /// T alone instead of per timestep band.
    #[arg(long)]
    pub timestep: Option<u64>,
    /// `lrm` / `spm` with `--pairs` only: the timestep bands `lo:hi,lo:hi,...` (default 0:200,200:500,500:800,800:1000).
    #[arg(long)]
    pub bands: Option<String>,
    /// `lrm` / `spm` only: the seed of the noise (and, per band, of the timesteps).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

fn is_image_file(p: &Path) -> bool {
    matches!(
        p.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("png" | "jpg" | "jpeg")
    )
}

/// The image files named by `--images` (folders expanded to their PNG / JPEG files, sorted).
pub fn expand_images(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for a in args {
        if a.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(a)
                .with_context(|| format!("reading folder {}", a.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_image_file(p))
                .collect();
            files.sort();
            if files.is_empty() {
                bail!(
                    "--images {}: no PNG or JPEG files in this folder",
                    a.display()
                );
            }
            out.extend(files);
        } else if a.is_file() {
            out.push(a.clone());
        } else {
            bail!("--images {}: no such file or folder", a.display());
        }
    }
    Ok(out)
}

fn relative_to(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Non-empty lines of a JSONL file, parsed; errors name the file and line.
fn read_jsonl(path: &Path) -> Result<Vec<(usize, serde_json::Value)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        out.push((i + 1, v));
    }
    if out.is_empty() {
        bail!("{}: no entries", path.display());
    }
    Ok(out)
}

fn str_field(path: &Path, line: usize, v: &serde_json::Value, key: &str) -> Result<String> {
    v.get(key)
        .and_then(|x| x.as_str())
        .map(|s| s.to_string())
        .with_context(|| format!("{} line {line}: no string `{key}`", path.display()))
}

/// Runs `f` on the `(image, prompt)` items in batches of equally sized images (at most `batch_size` each);
/// returns `f`'s values in the items' order (an error if `f` returns fewer values than it was given images).
fn per_batch<T>(
    items: &[(PathBuf, String)],
    batch_size: usize,
    device: &Device,
    mut f: impl FnMut(&Tensor, &[&str]) -> Result<Vec<T>>,
) -> Result<Vec<T>> {
    let mut sizes: Vec<(u32, u32)> = Vec::new();
    let mut groups: HashMap<(u32, u32), Vec<usize>> = HashMap::new();
    for (i, (path, _)) in items.iter().enumerate() {
        let dims = image::image_dimensions(path)
            .with_context(|| format!("reading image {}", path.display()))?;
        if !groups.contains_key(&dims) {
            sizes.push(dims);
        }
        groups.entry(dims).or_default().push(i);
    }
    let mut out: Vec<Option<T>> = items.iter().map(|_| None).collect();
    for dims in sizes {
        for chunk in groups[&dims].chunks(batch_size.max(1)) {
            let imgs = chunk
                .iter()
                .map(|&i| load_image(&items[i].0))
                .collect::<Result<Vec<_>>>()?;
            let x = images_to_tensor(&imgs, device)?;
            let prompts: Vec<&str> = chunk.iter().map(|&i| items[i].1.as_str()).collect();
            let v = f(&x, &prompts)
                .with_context(|| format!("scoring {}", items[chunk[0]].0.display()))?;
            for (&i, v) in chunk.iter().zip(v) {
                out[i] = Some(v);
            }
        }
    }
    out.into_iter()
        .collect::<Option<Vec<T>>>()
        .context("the reward returned fewer values than it was given images")
}

/// Scores `(image, prompt)` items, batching images of equal size; returns one score per item.
pub fn score_items(
    reward: &dyn Reward,
    items: &[(PathBuf, String)],
    batch_size: usize,
    device: &Device,
) -> Result<Vec<f64>> {
    per_batch(items, batch_size, device, |x, prompts| {
        Ok(reward.score(x, prompts)?.to_dtype(DType::F64)?.to_vec1()?)
    })
}

/// The scores of `(image, prompt)` items and, with `--terms` (`shapes` only), each one's terms of the exact
/// reward; the scores are then the breakdowns' `reward` (what the shapes reward's `score` returns), so every
/// image is read and analysed once.
fn scores_and_terms(
    a: &ScoreArgs,
    reward: &dyn Reward,
    items: &[(PathBuf, String)],
    device: &Device,
) -> Result<(Vec<f64>, Option<Vec<Breakdown>>)> {
    if !a.terms {
        return Ok((score_items(reward, items, a.batch_size, device)?, None));
    }
    let shapes = diffpref_rewards::shapes::ShapesReward::new();
    let b = per_batch(items, a.batch_size, &Device::Cpu, |x, prompts| {
        Ok(shapes.breakdown(x, prompts)?)
    })?;
    Ok((b.iter().map(|b| b.reward as f64).collect(), Some(b)))
}

/// A breakdown as a JSON object `{term: value}` (`relation` null when the prompt states none).
fn terms_json(b: &Breakdown) -> serde_json::Value {
    serde_json::Value::Object(
        b.terms()
            .iter()
            .map(|(name, v)| (name.to_string(), serde_json::json!(v)))
            .collect(),
    )
}

/// Per term over preference pairs: the preferred and the other image's means, their paired difference and how
/// often the preferred image's term is higher / lower (`relation` over the pairs whose prompt states one).
#[derive(serde::Serialize)]
struct PairTerm {
    term: &'static str,
    preferred: f64,
    other: f64,
    difference: diffpref_rewards::metrics::MeanCi,
    preferred_higher: f64,
    preferred_lower: f64,
}

fn pair_terms(pairs: &[(&Breakdown, &Breakdown)]) -> Vec<PairTerm> {
    crate::eval::paired_terms(pairs.iter().copied())
        .into_iter()
        .map(|(term, v)| {
            let n = v.len() as f64;
            PairTerm {
                term,
                preferred: v.iter().map(|p| p.0).sum::<f64>() / n,
                other: v.iter().map(|p| p.1).sum::<f64>() / n,
                difference: diffpref_rewards::metrics::MeanCi::of(
                    &v.iter().map(|p| p.0 - p.1).collect::<Vec<_>>(),
                ),
                preferred_higher: v.iter().filter(|p| p.0 > p.1).count() as f64 / n,
                preferred_lower: v.iter().filter(|p| p.0 < p.1).count() as f64 / n,
            }
        })
        .collect()
}

/// The `(image, prompt)` items of a scoring run.
fn items(a: &ScoreArgs) -> Result<Vec<(PathBuf, String)>> {
    if let Some(m) = &a.manifest {
        if !a.images.is_empty() || a.prompt.is_some() || a.prompts.is_some() {
            bail!("--manifest names the images and prompts: do not combine it with --images / --prompt / --prompts");
        }
        return read_jsonl(m)?
            .into_iter()
            .map(|(line, v)| {
                let image = str_field(m, line, &v, "image")?;
                let prompt = match v.get("prompt") {
                    None | Some(serde_json::Value::Null) => String::new(),
                    Some(p) => p
                        .as_str()
                        .with_context(|| {
                            format!("{} line {line}: `prompt` is not a string", m.display())
                        })?
                        .to_string(),
                };
                Ok((relative_to(m, &image), prompt))
            })
            .collect();
    }
    if a.images.is_empty() {
        bail!("give the images: --images FILES|DIRS, --manifest FILE, or --pairs FILE");
    }
    let files = expand_images(&a.images)?;
    let prompts: Vec<String> = match (&a.prompt, &a.prompts) {
        (Some(_), Some(_)) => bail!("give --prompt or --prompts, not both"),
        (Some(p), None) => vec![p.clone(); files.len()],
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading --prompts {}", f.display()))?;
            let lines: Vec<String> = text.lines().map(|l| l.to_string()).collect();
            if lines.len() != files.len() {
                bail!(
                    "--prompts {}: {} prompts for {} images (one line per image, in order)",
                    f.display(),
                    lines.len(),
                    files.len()
                );
            }
            lines
        }
        (None, None) => {
            if a.reward != RewardKind::Aesthetic {
                bail!("--reward {:?} scores images against prompts: give --prompt, --prompts or --manifest", a.reward);
            }
            vec![String::new(); files.len()]
        }
    };
    Ok(files.into_iter().zip(prompts).collect())
}

#[derive(serde::Serialize)]
struct PairResult {
    prompt: String,
    chosen: String,
    rejected: String,
    label: f64,
    score_chosen: f64,
    score_rejected: f64,
}

fn run_pairs(a: &ScoreArgs, reward: &dyn Reward, device: &Device, file: &Path) -> Result<()> {
    if !a.images.is_empty() || a.prompt.is_some() || a.prompts.is_some() || a.manifest.is_some() {
        bail!("--pairs names the images and prompts: do not combine it with --images / --prompt / --prompts / --manifest");
    }
    let mut pairs = Vec::new();
    for (line, v) in read_jsonl(file)? {
        let prompt = str_field(file, line, &v, "prompt")?;
        let chosen = relative_to(file, &str_field(file, line, &v, "chosen")?);
        let rejected = relative_to(file, &str_field(file, line, &v, "rejected")?);
        let label = match v.get("label") {
            None | Some(serde_json::Value::Null) => 1.0,
            Some(serde_json::Value::Bool(b)) => {
                if *b {
                    1.0
                } else {
                    0.0
                }
            }
            Some(l) => l.as_f64().filter(|x| (0.0..=1.0).contains(x)).with_context(|| {
                format!(
                    "{} line {line}: `label` must be a number in [0, 1] (1: chosen preferred, 0: rejected, 0.5: tie)",
                    file.display()
                )
            })?,
        };
        pairs.push((prompt, chosen, rejected, label));
    }
    // Score each distinct (image, prompt) once.
    let mut index: HashMap<(PathBuf, String), usize> = HashMap::new();
    let mut items: Vec<(PathBuf, String)> = Vec::new();
    let mut slot = |p: &PathBuf, prompt: &String| -> usize {
        let key = (p.clone(), prompt.clone());
        *index.entry(key.clone()).or_insert_with(|| {
            items.push(key);
            items.len() - 1
        })
    };
    let slots: Vec<(usize, usize)> = pairs
        .iter()
        .map(|(prompt, c, r, _)| (slot(c, prompt), slot(r, prompt)))
        .collect();
    let (scores, breakdowns) = scores_and_terms(a, reward, &items, device)?;
    let results: Vec<PairResult> = pairs
        .iter()
        .zip(&slots)
        .map(|((prompt, c, r, label), &(ic, ir))| PairResult {
            prompt: prompt.clone(),
            chosen: c.display().to_string(),
            rejected: r.display().to_string(),
            label: *label,
            score_chosen: scores[ic],
            score_rejected: scores[ir],
        })
        .collect();
    let triples: Vec<(f64, f64, f64)> = results
        .iter()
        .map(|r| (r.score_chosen, r.score_rejected, r.label))
        .collect();
    let acc: PairAccuracy = pair_accuracy(&triples);
    let terms = breakdowns.map(|b| {
        let oriented: Vec<(&Breakdown, &Breakdown)> = pairs
            .iter()
            .zip(&slots)
            .filter(|((.., label), _)| *label != 0.5)
            .map(|((.., label), &(ic, ir))| {
                if *label > 0.5 {
                    (&b[ic], &b[ir])
                } else {
                    (&b[ir], &b[ic])
                }
            })
            .collect();
        pair_terms(&oriented)
    });
    if a.json {
        let mut out = serde_json::json!({
            "reward": reward.name(),
            "weights": a.weights,
            "pairs": acc.pairs,
            "correct": acc.correct,
            "accuracy": acc.accuracy,
            "ci95": [acc.ci95.0, acc.ci95.1],
            "ci_method": "wilson",
            "score_ties": acc.score_ties,
            "label_ties": acc.label_ties,
            "items": results,
        });
        if let Some(t) = &terms {
            out["terms"] = serde_json::to_value(t)?;
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for r in &results {
            println!(
                "{:>12.6} {:>12.6}  label {:.2}  {}  {}  {}",
                r.score_chosen, r.score_rejected, r.label, r.chosen, r.rejected, r.prompt
            );
        }
        println!(
            "{}: {} of {} pairs agree with the labels: accuracy {:.4}, 95% CI [{:.4}, {:.4}] (Wilson); {} score ties, {} label ties left out",
            reward.name(),
            acc.correct,
            acc.pairs,
            acc.accuracy,
            acc.ci95.0,
            acc.ci95.1,
            acc.score_ties,
            acc.label_ties
        );
        if let Some(t) = &terms {
            println!(
                "{:<10} {:>9} {:>9} {:>18} {:>8} {:>8}",
                "term", "preferred", "other", "difference", "higher", "lower"
            );
            for t in t {
                println!(
                    "{:<10} {:>9.4} {:>9.4} {:>+9.4} ± {:<6.4} {:>8.3} {:>8.3}",
                    t.term,
                    t.preferred,
                    t.other,
                    t.difference.mean,
                    t.difference.ci95,
                    t.preferred_higher,
                    t.preferred_lower
                );
            }
        }
    }
    Ok(())
}

/// `--bands lo:hi,...`.
fn parse_bands(s: &str) -> Result<Vec<[u64; 2]>> {
    s.split(',')
        .map(|b| {
            let (lo, hi) = b
                .split_once(':')
                .with_context(|| format!("--bands {s:?}: `{b}` is not lo:hi"))?;
            let (lo, hi): (u64, u64) = (
                lo.trim()
                    .parse()
                    .with_context(|| format!("--bands: `{lo}` is not a timestep"))?,
                hi.trim()
                    .parse()
                    .with_context(|| format!("--bands: `{hi}` is not a timestep"))?,
            );
            if lo >= hi {
                bail!("--bands: `{b}` needs lo < hi");
            }
            Ok([lo, hi])
        })
        .collect()
}

/// `score --reward lrm|spm --pairs FILE`: accuracy per timestep band (see [`crate::methods::lrm::evaluate`]).
fn run_step_pairs(
    a: &ScoreArgs,
    name: &str,
    model: &dyn crate::methods::lrm::StepRewardModel,
    file: &Path,
) -> Result<()> {
    let bands = match (&a.bands, a.timestep) {
        (Some(_), Some(_)) => bail!("give --timestep or --bands, not both"),
        (Some(b), None) => parse_bands(b)?,
        (None, Some(t)) => vec![[t, t + 1]],
        (None, None) => vec![[0, 200], [200, 500], [500, 800], [800, 1000]],
    };
    // The images' own size (stored latents, when the manifest names them, are used as they are).
    let first = read_jsonl(file)?;
    let (line, v) = &first[0];
    let img = relative_to(file, &str_field(file, *line, v, "chosen")?);
    let (w, _) = image::image_dimensions(&img)
        .with_context(|| format!("reading image {}", img.display()))?;
    let pcfg = crate::data::PreprocessConfig::new(w);
    let res = crate::methods::lrm::evaluate(
        model,
        file,
        &bands,
        a.seed,
        a.batch_size.max(1),
        &pcfg,
        true,
    )?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"reward": name, "weights": a.weights, "bands": res})
            )?
        );
    } else {
        for b in &res {
            let truth = match (b.truth_accuracy, b.truth_ci) {
                (Some(x), Some(ci)) => format!(
                    "; vs reward_chosen/reward_rejected {x:.4} [{:.4}, {:.4}] ({} pairs)",
                    ci[0], ci[1], b.truth_pairs
                ),
                _ => String::new(),
            };
            println!(
                "{name} t in [{}, {}): accuracy {:.4}, 95% CI [{:.4}, {:.4}] (Wilson, {} pairs){truth}",
                b.band[0], b.band[1], b.accuracy, b.ci[0], b.ci[1], b.pairs
            );
        }
    }
    Ok(())
}

pub fn run(a: ScoreArgs) -> Result<()> {
    let device = a.compute.device()?;
    let dtype = a.compute.dtype()?;
    if a.terms && a.reward != RewardKind::Shapes {
        bail!("--terms is for --reward shapes (the only reward here made of named terms)");
    }
    let stepwise = matches!(a.reward, RewardKind::Lrm | RewardKind::Spm);
    if !stepwise && (a.timestep.is_some() || a.bands.is_some()) {
        bail!("--timestep and --bands are for --reward lrm and --reward spm");
    }
    if a.reward == RewardKind::Lrm {
        let dir = a
            .weights
            .as_deref()
            .context("--reward lrm needs --weights (an LRM folder from `train lrm`)")?;
        let mut lrm =
            diffpref_rewards::lrm::LatentRewardModel::load(Path::new(dir), dtype, &device)
                .with_context(|| format!("--weights {dir}"))?;
        if let Some(p) = &a.pairs {
            return run_step_pairs(&a, "lrm", &lrm, p);
        }
        lrm.reward_timestep = a.timestep.unwrap_or(0) as f64;
        lrm.noise_seed = a.seed;
        return score_and_print(&a, &lrm, &device);
    }
    if a.reward == RewardKind::Spm && (a.pairs.is_some() || a.timestep.unwrap_or(0) > 0) {
        // Noisy steps: the SPM with the diffusion model that predicts its x0 inputs.
        let dir = a
            .weights
            .as_deref()
            .context("--reward spm needs --weights (an SPM folder from `train spm`)")?;
        let spm =
            diffpref_rewards::spm::StepAwarePreferenceModel::load(Path::new(dir), dtype, &device)
                .with_context(|| format!("--weights {dir}"))?;
        let mut m = crate::methods::spm::SpmOnLatents::new(spm, dtype)?;
        if let Some(p) = &a.pairs {
            return run_step_pairs(&a, "spm", &m, p);
        }
        m.reward_timestep = a.timestep.unwrap_or(0) as f64;
        m.noise_seed = a.seed;
        return score_and_print(&a, &m, &device);
    }
    let reward = load_reward_opt(
        a.reward,
        a.weights.as_deref(),
        a.clip.as_deref(),
        a.tokenizer.as_deref(),
        dtype,
        &device,
    )
    .context("--weights (the model folder, weights file or hub id)")?;
    if let Some(p) = &a.pairs {
        return run_pairs(&a, reward.as_ref(), &device, p);
    }
    score_and_print(&a, reward.as_ref(), &device)
}

fn score_and_print(a: &ScoreArgs, reward: &dyn Reward, device: &Device) -> Result<()> {
    let items = items(a)?;
    let (scores, breakdowns) = scores_and_terms(a, reward, &items, device)?;
    let terms: Vec<Option<&Breakdown>> = match &breakdowns {
        Some(b) => b.iter().map(Some).collect(),
        None => vec![None; items.len()],
    };
    let mean = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
    if a.json {
        let results: Vec<serde_json::Value> = items
            .iter()
            .zip(&scores)
            .zip(&terms)
            .map(|(((p, prompt), s), t)| {
                let mut r = serde_json::json!({"image": p.display().to_string(), "prompt": prompt, "score": s});
                if let Some(t) = t {
                    r["terms"] = terms_json(t);
                }
                r
            })
            .collect();
        let out = serde_json::json!({
            "reward": reward.name(),
            "weights": a.weights,
            "mean": mean,
            "results": results,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        if a.terms {
            let names: Vec<String> = Breakdown::TERM_NAMES
                .iter()
                .map(|n| format!("{n:>9}"))
                .collect();
            println!("{}  image  prompt", names.join(" "));
        }
        for (((p, prompt), s), t) in items.iter().zip(&scores).zip(&terms) {
            match t {
                Some(t) => {
                    let cells: Vec<String> = t
                        .terms()
                        .iter()
                        .map(|(_, v)| v.map_or(format!("{:>9}", "-"), |v| format!("{v:>9.4}")))
                        .collect();
                    println!("{}  {}  {prompt}", cells.join(" "), p.display());
                }
                None => println!("{s:>12.6}  {}  {prompt}", p.display()),
            }
        }
        println!(
            "{}: mean {mean:.6} over {} images",
            reward.name(),
            scores.len()
        );
    }
    Ok(())
}
