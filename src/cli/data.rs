//! `diffpref data`: synthetic data for the shapes world.
//!
//! ```text
//! diffpref data make-prefs --model DIR --prompts FILE --pairs N --out DIR [--temperature T] [--seed S]
//!     [--candidates 2] [--steps 20] [--guidance 7.5] [--scheduler NAME] [--batch-size 4] [--device ...] [--dtype ...]
//! diffpref data render (--prompts FILE | --random N) --out DIR [--size 64] [--seed S] [--max-objects 3]
//! diffpref data prompts --count N --out FILE [--seed S] [--max-objects 3] [--exclude FILE ...]
//! ```
//!
//! * `make-prefs` samples `--candidates` images (default two) per pair from a model (pair i uses prompt i mod
//!   the number of prompts, and noise seeds derived from `--seed`, i and the candidate), scores them with the
//!   shapes ground-truth reward ([`ShapesReward`]), keeps the best and the worst (in sampling order) and
//!   labels the pair by a Bradley–Terry draw: the first image is preferred with
//!   probability `σ((r_a − r_b) / T)`, drawn from a seeded stream. It writes `img/NNNNN-a.png`,
//!   `img/NNNNN-b.png`, their sampler latents `img/NNNNN-{a,b}.latent.safetensors` (what `train dpo` trains
//!   on, see [`crate::data::latents`]) and `manifest.jsonl`, one line per pair: `{"prompt", "chosen",
//!   "rejected", "chosen_latent", "rejected_latent", "reward_chosen", "reward_rejected", "p_chosen"}` (paths relative to
//!   the manifest; `train dpo` and `score --pairs` read it). Every file is written atomically; the same
//!   arguments give the same files.
//! * `render` draws the ground truth: one scene per caption of `--prompts` (or `--random N` random scenes),
//!   `NNNNN.png` plus `manifest.jsonl` with `{"image", "prompt"}` per line (the `score --manifest` format).
//! * `prompts` draws distinct random captions, none of those in the `--exclude` files (how the demo set's
//!   training prompts and the held-out prompts in `assets/shapes/` were made).

use super::common::ComputeArgs;
use super::generate::{load_model, parse_scheduler, progress};
use crate::data::latents::save_latent;
use crate::data::shapes::{parse_caption, random_spec, Scene};
use crate::imaging::{images_to_tensor, save_png, tensor_to_images};
use crate::io::{write_atomic, write_dir_atomic};
use crate::output::{check_output_file, mark, Input, OutputDir};
use crate::train::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, Subcommand};
use diffpref_pipelines::pipeline::{seeded_noise, GenerateOptions, Pipeline};
use diffpref_rewards::shapes::ShapesReward;
use diffpref_rewards::Reward;
use std::path::{Path, PathBuf};

/// Arguments of `diffpref data`.
#[derive(Args, Debug)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Synthetic preference pairs: two samples per prompt from a model, labelled by a Bradley–Terry draw on
    /// the shapes ground-truth reward.
    MakePrefs(MakePrefsArgs),
    /// Ground-truth renders of shapes captions (or of random scenes), with a manifest.
    Render(RenderArgs),
    /// Distinct random shapes captions (e.g. a training list and a held-out list that excludes it).
    Prompts(PromptsArgs),
}

/// Arguments of `diffpref data prompts`.
#[derive(Args, Debug)]
pub struct PromptsArgs {
    /// Number of distinct captions.
    #[arg(long)]
    pub count: usize,
    /// Output text file (one caption per line).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most objects in a scene (1 to 3).
    #[arg(long, default_value_t = 3)]
    pub max_objects: usize,
    /// Prompt files whose captions must not be drawn (repeatable).
    #[arg(long)]
    pub exclude: Vec<PathBuf>,
}

/// Arguments of `diffpref data make-prefs`.
#[derive(Args, Debug)]
pub struct MakePrefsArgs {
    /// Model folder (diffusers layout) or hub id.
    #[arg(long)]
    pub model: String,
    /// Text file with one shapes caption per line (blank lines and lines starting with # are skipped).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Number of pairs (prompts are used round robin).
    #[arg(long)]
    pub pairs: usize,
    /// Output folder (img/ and manifest.jsonl), written whole: an earlier set there is replaced.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace `--out` even when it is a non-empty folder `data make-prefs` did not write.
    #[arg(long)]
    pub overwrite: bool,
    /// Bradley–Terry temperature T: P(first preferred) = sigmoid((r1 - r2) / T).
    #[arg(long, default_value_t = 0.05)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5, allow_negative_numbers = true)]
    pub guidance: f64,
    /// Sampler: ddim, ddpm, euler, euler-a, dpmpp-2m (default: the model's scheduler).
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Pairs sampled per pipeline call (each pair is `--candidates` images of the batch).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Images sampled per pair; the pair is the best and the worst of them by the reward (then labelled by
    /// the Bradley–Terry draw, as always). 2 = two independent samples. Larger values widen the reward gaps,
    /// like the best-vs-worst binarisation of scored candidates (UltraFeedback, RLAIF).
    #[arg(long, default_value_t = 2)]
    pub candidates: usize,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// Arguments of `diffpref data render`.
#[derive(Args, Debug)]
pub struct RenderArgs {
    /// Text file with one shapes caption per line.
    #[arg(long, conflicts_with = "random")]
    pub prompts: Option<PathBuf>,
    /// Render this many random scenes instead.
    #[arg(long)]
    pub random: Option<usize>,
    /// Output folder (NNNNN.png and manifest.jsonl), written whole: an earlier render there is replaced.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace `--out` even when it is a non-empty folder `data render` did not write.
    #[arg(long)]
    pub overwrite: bool,
    /// Image side in pixels.
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most objects in a random scene (1 to 3).
    #[arg(long, default_value_t = 3)]
    pub max_objects: usize,
}

const MAKE_PREFS: &str = "data make-prefs";
const RENDER: &str = "data render";

/// The guard of a data command's `--out` folder (an earlier set of the same command is recognised by its
/// marker).
fn out_dir<'a>(out: &'a Path, command: &'a str) -> OutputDir<'a> {
    OutputDir {
        path: out,
        key: "--out",
        command,
        legacy: &[],
    }
}

pub fn run(a: DataArgs) -> Result<()> {
    match a.command {
        DataCommand::MakePrefs(a) => make_prefs(a),
        DataCommand::Render(a) => render(a),
        DataCommand::Prompts(a) => prompts(a),
    }
}

/// The captions of a prompts file (blank and `#` lines skipped), each checked against the shapes grammar.
pub fn read_captions(path: &Path) -> Result<Vec<String>> {
    crate::eval::read_prompts(path, true).context("--prompts")
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The Bradley–Terry probability that the first of two images is preferred.
pub fn preference_probability(r_first: f64, r_second: f64, temperature: f64) -> f64 {
    sigmoid((r_first - r_second) / temperature)
}

/// The indices of the best and the worst of `scores` (first occurrence of each), in index order; two
/// distinct indices when there are at least two scores.
fn best_and_worst(scores: &[f32]) -> (usize, usize) {
    let mut best = 0;
    let mut worst = 0;
    for (j, &r) in scores.iter().enumerate() {
        if r > scores[best] {
            best = j;
        }
        if r < scores[worst] {
            worst = j;
        }
    }
    if best == worst {
        // All equal: any two differ only by noise.
        (0, 1)
    } else {
        (best.min(worst), best.max(worst))
    }
}

/// The noise seed of candidate image `j` of pair `i`.
fn image_seed(seed: u64, i: usize, j: usize) -> u64 {
    Rng::derive(seed, &format!("make-prefs-image-{i}-{j}")).next_u64()
}

fn make_prefs(a: MakePrefsArgs) -> Result<()> {
    if a.pairs == 0 {
        bail!("--pairs must be at least 1");
    }
    if !(2..=256).contains(&a.candidates) {
        bail!("--candidates must be 2 to 256 (got {})", a.candidates);
    }
    if a.batch_size > 4096 {
        bail!("--batch-size must be at most 4096 (got {})", a.batch_size);
    }
    let k_c = a.candidates;
    if !(a.temperature > 0.0 && a.temperature.is_finite()) {
        bail!(
            "--temperature must be a positive number (got {})",
            a.temperature
        );
    }
    super::generate::check_sampling(a.steps, &[a.guidance], 0.0, None, None)?;
    let captions = read_captions(&a.prompts)?;
    let scheduler = parse_scheduler(&a.scheduler)?;
    out_dir(&a.out, MAKE_PREFS).check(
        &[
            Input::new("--model folder", Path::new(&a.model)),
            Input::new("--prompts file", &a.prompts),
        ],
        a.overwrite,
    )?;
    let model = load_model(&a.model, None, &a.compute)?;
    let pipe = Pipeline::new(&model)?;
    let reward = ShapesReward::new();
    let base = GenerateOptions {
        steps: a.steps,
        guidance_scale: a.guidance,
        seed: a.seed,
        scheduler,
        ..Default::default()
    };
    let (lh, lw) = pipe.latent_size(&base)?;
    let c = model.unet.config().in_channels;
    let (mut sum_r, mut agree) = (0f64, 0usize);
    write_dir_atomic(&a.out, |dir| {
        mark(dir, MAKE_PREFS)?;
        let img_dir = dir.join("img");
        std::fs::create_dir_all(&img_dir)
            .with_context(|| format!("cannot create {}", img_dir.display()))?;
        let mut labels = Rng::derive(a.seed, "make-prefs-labels");
        let mut lines = Vec::with_capacity(a.pairs);
        let pb = progress(a.pairs, "pairs");
        let bs = a.batch_size.max(1);
        let mut start = 0;
        while start < a.pairs {
            let n = bs.min(a.pairs - start);
            let mut prompts: Vec<&str> = Vec::with_capacity(k_c * n);
            let mut noise = Vec::with_capacity(k_c * n);
            for i in start..start + n {
                let p = captions[i % captions.len()].as_str();
                for j in 0..k_c {
                    prompts.push(p);
                    noise.push(seeded_noise(
                        image_seed(a.seed, i, j),
                        &[1, c, lh, lw],
                        &Device::Cpu,
                    )?);
                }
            }
            let opts = GenerateOptions {
                init_latents: Some(Tensor::cat(&noise, 0)?),
                ..base.clone()
            };
            let out = pipe
                .generate(&prompts, &[], &opts, None)
                .with_context(|| format!("sampling pairs {start}..{}", start + n))?;
            // Score the 8-bit images that are written, so the manifest's rewards are those of the files.
            let images = tensor_to_images(&out.images)?;
            let scores: Vec<f32> = reward
                .score(&images_to_tensor(&images, &Device::Cpu)?, &prompts)?
                .to_vec1()?;
            for k in 0..n {
                let i = start + k;
                let group = &scores[k_c * k..k_c * (k + 1)];
                let (ja, jb) = best_and_worst(group);
                let (ra, rb) = (group[ja] as f64, group[jb] as f64);
                let names = [format!("img/{i:05}-a.png"), format!("img/{i:05}-b.png")];
                let latent_names = [
                    format!("img/{i:05}-a.latent.safetensors"),
                    format!("img/{i:05}-b.latent.safetensors"),
                ];
                for ((name, latent_name), j) in names.iter().zip(&latent_names).zip([ja, jb]) {
                    save_png(&images[k_c * k + j], dir.join(name))?;
                    save_latent(&dir.join(latent_name), &out.latents.get(k_c * k + j)?)?;
                }
                let p_a = preference_probability(ra, rb, a.temperature);
                let a_wins = labels.uniform() < p_a;
                let (w, l) = if a_wins { (0, 1) } else { (1, 0) };
                let (chosen, rejected) = (&names[w], &names[l]);
                let (rc, rr) = ([ra, rb][w], [ra, rb][l]);
                let pc = if a_wins { p_a } else { 1.0 - p_a };
                sum_r += ra + rb;
                if rc > rr {
                    agree += 1;
                }
                lines.push(serde_json::to_string(&serde_json::json!({
                    "prompt": prompts[k_c * k],
                    "chosen": chosen,
                    "rejected": rejected,
                    "chosen_latent": latent_names[w],
                    "rejected_latent": latent_names[l],
                    "reward_chosen": rc,
                    "reward_rejected": rr,
                    "p_chosen": pc,
                }))?);
                pb.inc(1);
            }
            start += n;
        }
        pb.finish_and_clear();
        let mut text = lines.join("\n");
        text.push('\n');
        write_atomic(&dir.join("manifest.jsonl"), text.as_bytes())?;
        Ok(())
    })?;
    println!(
        "{} pairs in {}: mean reward {:.4}; the chosen image has the higher reward in {} ({:.1}%)",
        a.pairs,
        a.out.join("manifest.jsonl").display(),
        sum_r / (2 * a.pairs) as f64,
        agree,
        100.0 * agree as f64 / a.pairs as f64
    );
    Ok(())
}

fn prompts(a: PromptsArgs) -> Result<()> {
    if a.count == 0 {
        bail!("--count must be at least 1");
    }
    if !(1..=3).contains(&a.max_objects) {
        bail!("--max-objects must be 1, 2 or 3 (got {})", a.max_objects);
    }
    let excluded: Vec<Input> = a
        .exclude
        .iter()
        .map(|f| Input::new("--exclude file", f))
        .collect();
    check_output_file(&a.out, "--out", &excluded)?;
    let mut taken = std::collections::HashSet::new();
    for f in &a.exclude {
        taken.extend(crate::eval::read_prompts(f, false).context("--exclude")?);
    }
    let mut rng = Rng::derive(a.seed, "prompts");
    let mut out = Vec::with_capacity(a.count);
    let mut misses = 0usize;
    while out.len() < a.count {
        let caption = random_spec(&mut rng, a.max_objects).caption();
        if taken.insert(caption.clone()) {
            out.push(caption);
            misses = 0;
        } else {
            misses += 1;
            if misses > 100_000 {
                bail!(
                    "only {} distinct captions could be drawn (with --max-objects {} and the excluded files)",
                    out.len(),
                    a.max_objects
                );
            }
        }
    }
    let mut text = out.join("\n");
    text.push('\n');
    write_atomic(&a.out, text.as_bytes())?;
    println!("{} captions in {}", out.len(), a.out.display());
    Ok(())
}

fn render(a: RenderArgs) -> Result<()> {
    if a.size < 8 {
        bail!("--size must be at least 8");
    }
    diffpref_pipelines::limits::check_image_size("--size", a.size as u64, a.size as u64)?;
    // (spec, the caption as given); random scenes get their canonical caption.
    let specs: Vec<_> = match (&a.prompts, a.random) {
        (Some(p), None) => read_captions(p)?
            .into_iter()
            .map(|c| (parse_caption(&c).expect("checked"), Some(c)))
            .collect(),
        (None, Some(n)) if n == 0 || n > 1_000_000 => {
            bail!("--random must be 1 to 1000000 scenes (got {n})")
        }
        (None, Some(n)) => {
            let mut rng = Rng::derive(a.seed, "render-specs");
            (0..n)
                .map(|_| (random_spec(&mut rng, a.max_objects), None))
                .collect()
        }
        _ => bail!("give --prompts FILE or --random N"),
    };
    let mut inputs = Vec::new();
    if let Some(p) = &a.prompts {
        inputs.push(Input::new("--prompts file", p));
    }
    out_dir(&a.out, RENDER).check(&inputs, a.overwrite)?;
    write_dir_atomic(&a.out, |dir| {
        mark(dir, RENDER)?;
        let mut lines = Vec::with_capacity(specs.len());
        for (i, (spec, given)) in specs.iter().enumerate() {
            let mut rng = Rng::derive(a.seed, &format!("render-{i}"));
            let scene = Scene::from_spec(spec, &mut rng);
            let name = format!("{i:05}.png");
            save_png(&scene.render(a.size), dir.join(&name))?;
            let prompt = given.clone().unwrap_or_else(|| scene.caption());
            lines.push(serde_json::to_string(
                &serde_json::json!({"image": name, "prompt": prompt}),
            )?);
        }
        let mut text = lines.join("\n");
        text.push('\n');
        write_atomic(&dir.join("manifest.jsonl"), text.as_bytes())
    })?;
    println!(
        "{} images and {}",
        specs.len(),
        a.out.join("manifest.jsonl").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_and_worst_in_index_order() {
        assert_eq!(best_and_worst(&[0.2, 0.7]), (0, 1));
        assert_eq!(best_and_worst(&[0.7, 0.2]), (0, 1));
        assert_eq!(best_and_worst(&[0.5, 0.9, 0.1, 0.4]), (1, 2));
        assert_eq!(best_and_worst(&[0.1, 0.5, 0.4, 0.9]), (0, 3));
        assert_eq!(best_and_worst(&[0.3, 0.3, 0.3]), (0, 1));
    }

    #[test]
    fn bradley_terry_probability() {
        assert!((preference_probability(0.5, 0.5, 0.05) - 0.5).abs() < 1e-12);
        let p = preference_probability(0.6, 0.5, 0.05);
        assert!((p - 1.0 / (1.0 + (-2.0f64).exp())).abs() < 1e-12);
        assert!((p + preference_probability(0.5, 0.6, 0.05) - 1.0).abs() < 1e-12);
    }
}
