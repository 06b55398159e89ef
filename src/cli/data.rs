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
use crate::data::shapes::{fresh_captions, parse_caption, random_spec, Scene};
use crate::imaging::save_png;
use crate::io::{write_atomic, write_dir_atomic};
use crate::output::{check_output_file, mark, Input, OutputDir};
use crate::train::rng::Rng;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
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
    /// Model: a diffusers folder, a single-file checkpoint (`.safetensors`, original SD layout) or a hub id.
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
    /// Every two of a prompt's candidates make a pair (candidates choose 2 per prompt; `--pairs` counts the
    /// sampled groups), instead of the best and the worst.
    #[arg(long)]
    pub all_pairs: bool,
    /// Hard negatives without sampling: each caption's ground-truth render (chosen) against the render of a
    /// one-edit corruption of it (rejected), at the model's image size (the model is only read for it).
    #[arg(long, conflicts_with_all = ["all_pairs"])]
    pub renders: bool,
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
    let opts = crate::data::prefs::MakePrefsOptions {
        pairs: a.pairs,
        candidates: a.candidates,
        temperature: a.temperature,
        seed: a.seed,
        steps: a.steps,
        guidance: a.guidance,
        scheduler,
        batch_size: a.batch_size,
        all_pairs: a.all_pairs,
    };
    let mut summary = None;
    write_dir_atomic(&a.out, |dir| {
        mark(dir, MAKE_PREFS)?;
        if a.renders {
            let (lh, _) = diffpref_pipelines::pipeline::Pipeline::new(&model)?
                .latent_size(&Default::default())?;
            let size = (lh * model.vae_scale_factor()) as u32;
            summary = Some(crate::data::prefs::render_prefs(
                &captions, a.pairs, a.seed, size, dir,
            )?);
            return Ok(());
        }
        let pb = progress(a.pairs, "pairs");
        summary = Some(crate::data::prefs::make_prefs(
            &model,
            &captions,
            &opts,
            dir,
            &|| pb.inc(1),
        )?);
        pb.finish_and_clear();
        Ok(())
    })?;
    let summary = summary.context("make-prefs wrote nothing")?;
    println!(
        "{} pairs in {}: mean reward {:.4}; the chosen image has the higher reward in {} ({:.1}%)",
        summary.pairs,
        a.out.join("manifest.jsonl").display(),
        summary.mean_reward,
        summary.agree,
        100.0 * summary.agree as f64 / summary.pairs as f64
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
    let out = fresh_captions(a.seed, a.count, a.max_objects, &mut taken)
        .map_err(|e| anyhow::anyhow!("{e} (--max-objects {}, --exclude files)", a.max_objects))?;
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
