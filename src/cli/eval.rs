//! `diffpref eval`: held-out reward of a model (optionally with a LoRA, then compared with the base model on the
//! same initial noise).
//!
//! ```text
//! diffpref eval --model DIR [--lora FILE ...] [--lora-scale S] --prompts FILE [--reward shapes] [--weights P]
//!     [--samples 4] [--seed 0] [--steps 20] [--guidance 7.5] [--scheduler NAME] [--batch-size 16]
//!     [--out runs/eval] [--json] [--device ...] [--dtype ...]
//! ```
//!
//! Prints the mean reward with its 95% interval, and with `--lora` the base model's, the paired difference
//! with its interval, the win rate against the base (Wilson interval) and the diversity of both (see
//! [`crate::eval`] for the definitions). Writes `OUT/eval.json` (every figure, per-prompt means and the
//! settings) and `OUT/grid.png` (rows: prompts; columns: samples of the base, then of the LoRA model).

use super::common::ComputeArgs;
use super::generate::{load_model, parse_scheduler, progress};
use crate::eval::{
    compare, comparison_grid, fmt_ci, per_prompt, read_prompts, sample_and_score, summarize,
    SampleOptions, Samples,
};
use crate::imaging::save_png;
use crate::io::write_atomic;
use crate::output::{Input, OutputDir};
use crate::scoring::{load_reward_opt, RewardKind};
use crate::train::lora::{attach_lora_files, lora_specs};
use anyhow::{bail, Context, Result};
use clap::Args;
use diffpref_rewards::Reward;
use std::path::{Path, PathBuf};

/// Which reward scores the samples (`--reward`, `--weights`, `--clip`, `--tokenizer`).
#[derive(Args, Clone, Debug)]
pub struct RewardArgs {
    /// Reward model.
    #[arg(long, value_enum, default_value = "shapes")]
    pub reward: RewardKind,
    /// Reward weights (folder, file or hub id); not used by `shapes`.
    #[arg(long = "weights")]
    pub reward_weights: Option<String>,
    /// `aesthetic` only: the CLIP backbone folder.
    #[arg(long = "clip")]
    pub reward_clip: Option<String>,
    /// CLIP tokenizer folder for reward models that ship none.
    #[arg(long = "reward-tokenizer")]
    pub reward_tokenizer: Option<PathBuf>,
}

impl RewardArgs {
    pub fn load(&self, compute: &ComputeArgs) -> Result<Box<dyn Reward>> {
        load_reward_opt(
            self.reward,
            self.reward_weights.as_deref(),
            self.reward_clip.as_deref(),
            self.reward_tokenizer.as_deref(),
            compute.dtype()?,
            &compute.device()?,
        )
        .context("--weights")
    }
}

/// Arguments of `diffpref eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model: a diffusers folder, a single-file checkpoint (`.safetensors`, original SD layout) or a hub id.
    #[arg(long)]
    pub model: String,
    /// LoRA file(s) to evaluate against the base model (repeat to stack).
    #[arg(long = "lora")]
    pub loras: Vec<PathBuf>,
    /// LoRA strength: one for all, or one per --lora.
    #[arg(long = "lora-scale", allow_negative_numbers = true)]
    pub lora_scales: Vec<f64>,
    /// Text file with one prompt per line (shapes captions for --reward shapes).
    #[arg(long)]
    pub prompts: PathBuf,
    #[command(flatten)]
    pub reward: RewardArgs,
    /// Samples per prompt.
    #[arg(long, default_value_t = 4)]
    pub samples: usize,
    /// Seed of the initial noise (the same noise for base and LoRA).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5, allow_negative_numbers = true)]
    pub guidance: f64,
    /// Sampler: ddim, ddpm, euler, euler-a, dpmpp-2m (default: the model's scheduler).
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Images per pipeline call.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Prompts shown in the grid.
    #[arg(long, default_value_t = 12)]
    pub grid_prompts: usize,
    /// Output folder (eval.json, grid.png).
    #[arg(long, default_value = "runs/eval")]
    pub out: PathBuf,
    /// Write into `--out` even when it is a non-empty folder `eval` did not write.
    #[arg(long)]
    pub overwrite: bool,
    /// Print the JSON report instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Weight variant to prefer (e.g. fp16).
    #[arg(long)]
    pub variant: Option<String>,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

pub fn run(a: EvalArgs) -> Result<()> {
    if a.samples == 0 {
        bail!("--samples must be at least 1");
    }
    if !(1..=4096).contains(&a.batch_size) {
        bail!("--batch-size must be 1 to 4096 (got {})", a.batch_size);
    }
    super::generate::check_sampling(a.steps, &[a.guidance], 0.0, None, None)?;
    let prompts = read_prompts(&a.prompts, a.reward.reward.is_shapes()).context("--prompts")?;
    let mut inputs = vec![
        Input::new("--model folder", Path::new(&a.model)),
        Input::new("--prompts file", &a.prompts),
    ];
    inputs.extend(a.loras.iter().map(|l| Input::new("--lora file", l)));
    let out_dir = OutputDir {
        path: &a.out,
        key: "--out",
        command: "eval",
        legacy: &["eval.json"],
    };
    out_dir.check(&inputs, a.overwrite)?;
    let specs = lora_specs(&a.loras, &a.lora_scales)?;
    let reward = a.reward.load(&a.compute)?;
    let model = load_model(&a.model, a.variant.as_deref(), &a.compute)?;
    let sets = attach_lora_files(&model.unet, &specs)?;
    let opts = SampleOptions {
        samples_per_prompt: a.samples,
        steps: a.steps,
        guidance: a.guidance,
        scheduler: parse_scheduler(&a.scheduler)?,
        seed: a.seed,
        batch_size: a.batch_size,
    };
    let n = prompts.len() * a.samples;
    let pb = progress(n * if sets.is_empty() { 1 } else { 2 }, "samples");
    let sample = |enabled: bool| -> Result<Samples> {
        for s in &sets {
            s.set_enabled(enabled);
        }
        sample_and_score(&model, &prompts, &opts, reward.as_ref(), Some(&pb))
    };
    let base = sample(false)?;
    let tuned = if sets.is_empty() {
        None
    } else {
        Some(sample(true)?)
    };
    pb.finish_and_clear();

    let settings = serde_json::json!({
        "model": a.model,
        "loras": specs.iter().map(|(f, s)| serde_json::json!({"file": f, "scale": s})).collect::<Vec<_>>(),
        "prompts_file": a.prompts,
        "prompts": prompts.len(),
        "samples_per_prompt": a.samples,
        "reward": reward.name(),
        "seed": a.seed,
        "steps": a.steps,
        "guidance": a.guidance,
        "scheduler": a.scheduler,
    });
    let (report, grid) = match &tuned {
        None => {
            let s = summarize(&base);
            let report = serde_json::json!({
                "settings": settings,
                "model": s,
                "per_prompt": per_prompt(&[("model", &base)]),
            });
            if !a.json {
                println!(
                    "{} on {} prompts x {} samples: mean reward {} (95% CI){}",
                    reward.name(),
                    prompts.len(),
                    a.samples,
                    fmt_ci(&s.reward),
                    s.diversity
                        .map(|d| format!(", diversity {d:.4}"))
                        .unwrap_or_default()
                );
            }
            (
                report,
                comparison_grid(&[("model", &base)], a.grid_prompts, 4)?,
            )
        }
        Some(t) => {
            let c = compare(&base, t)?;
            let mut fields = serde_json::json!({ "settings": settings });
            let terms = if a.reward.reward.is_shapes() {
                let terms = crate::eval::shapes_terms(&base, t)?;
                fields["terms"] = serde_json::to_value(&terms)?;
                terms
            } else {
                Vec::new()
            };
            let report = c.report(fields, per_prompt(&[("base", &base), ("lora", t)]))?;
            if !a.json {
                print_comparison(reward.name(), prompts.len(), a.samples, &c);
                if !terms.is_empty() {
                    println!("  the exact reward's terms, base -> tuned (paired change ± 95% CI):");
                    for t in &terms {
                        println!(
                            "    {:<10} {:.4} -> {:.4} ({:+.4} ± {:.4})",
                            t.term, t.base, t.model, t.change.mean, t.change.ci95
                        );
                    }
                }
            }
            (
                report,
                comparison_grid(&[("base", &base), ("lora", t)], a.grid_prompts, 4)?,
            )
        }
    };
    out_dir.create()?;
    write_outputs(&a.out, &report, &grid)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "report: {}\ngrid: {}",
            a.out.join("eval.json").display(),
            a.out.join("grid.png").display()
        );
    }
    Ok(())
}

/// `eval.json` and `grid.png` in `out`, each written atomically.
pub fn write_outputs(out: &Path, report: &serde_json::Value, grid: &image::RgbImage) -> Result<()> {
    write_atomic(
        &out.join("eval.json"),
        serde_json::to_string_pretty(report)?.as_bytes(),
    )?;
    save_png(grid, out.join("grid.png"))
}

/// The before/after table of a comparison.
pub fn print_comparison(reward: &str, prompts: usize, samples: usize, c: &crate::eval::Comparison) {
    let div = |d: Option<f64>| d.map(|d| format!("{d:.4}")).unwrap_or_else(|| "-".into());
    println!(
        "{reward} reward on {prompts} held-out prompts x {samples} samples (same noise), mean ± 95% CI:"
    );
    println!(
        "  base   {}   diversity {}",
        fmt_ci(&c.base.reward),
        div(c.base.diversity)
    );
    println!(
        "  tuned  {}   diversity {}",
        fmt_ci(&c.model.reward),
        div(c.model.diversity)
    );
    println!(
        "  change {:+.4} ± {:.4} ({}), win rate {:.3} [{:.3}, {:.3}] ({} wins, {} ties, {} losses)",
        c.difference.mean,
        c.difference.ci95,
        if c.improved_beyond_ci() {
            "beyond the CI"
        } else if c.difference.mean + c.difference.ci95 < 0.0 {
            "worse, beyond the CI"
        } else {
            "zero within the CI"
        },
        c.win_rate,
        c.win_rate_ci95.0,
        c.win_rate_ci95.1,
        c.wins,
        c.ties,
        c.losses
    );
}
