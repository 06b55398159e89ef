//! `diffpref verify`: runs golden parity checks on the chosen device and dtype.

use super::common::ComputeArgs;
use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Args;
use diffpref_pipelines::checks::{self, CheckContext};
use diffpref_pipelines::golden::{Comparison, Golden};
use diffpref_pipelines::loading::resolve_model;
use diffpref_pipelines::tokenizer::ClipTokenizer;
use std::path::{Path, PathBuf};

/// Arguments of `diffpref verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Model folder for model checks (tokenizer, text_encoder, unet, vae, pipeline), or a bare tokenizer
    /// folder for a tokenizer golden.
    #[arg(long)]
    pub model: Option<String>,
    /// Golden files (safetensors with a `kind` in their metadata).
    #[arg(required = true)]
    pub goldens: Vec<PathBuf>,
    /// Multiply every tolerance (default: 1 for f32, 500 for f16, 4000 for bf16; see README).
    #[arg(long, allow_negative_numbers = true)]
    pub tolerance_scale: Option<f64>,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// Default tolerance multipliers for reduced precision: the goldens' tolerances are about 10x the
/// f32-vs-f64 error; f16 keeps ~11 mantissa bits (vs 24), bf16 ~8.
pub fn default_tolerance_scale(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 500.0,
        DType::BF16 => 4000.0,
        _ => 1.0,
    }
}

/// Runs one golden; `Err` when its kind is unknown or the check cannot run.
pub fn run_one(g: &Golden, ctx: &CheckContext) -> Result<Vec<Comparison>> {
    if let Some(r) = checks::run(g, ctx)? {
        return Ok(r);
    }
    match diffpref_rewards::checks::run(g, ctx)? {
        Some(r) => Ok(r),
        None => match g.kind() {
            Some("dpo_loss") => crate::methods::dpo::check_golden(g, ctx),
            Some(k) => bail!(
                "{}: no check for kind `{k}` in this build",
                g.path.display()
            ),
            None => bail!(
                "{}: no `kind` in the metadata (weights, not a check?)",
                g.path.display()
            ),
        },
    }
}

pub fn run(a: VerifyArgs) -> Result<()> {
    let device = a.compute.device()?;
    let dtype = a.compute.dtype()?;
    let model_dir = match &a.model {
        // A bare tokenizer folder is enough for a tokenizer golden.
        Some(m)
            if !Path::new(m).join("model_index.json").exists()
                && ClipTokenizer::is_tokenizer_dir(Path::new(m)) =>
        {
            Some(PathBuf::from(m))
        }
        Some(m) => Some(resolve_model(m, None).with_context(|| format!("--model {m}"))?),
        None => None,
    };
    if let Some(s) = a.tolerance_scale {
        if !(s.is_finite() && s > 0.0) {
            bail!("--tolerance-scale must be a positive number (got {s}): a scale <= 0 or NaN would pass or fail every check blindly");
        }
    }
    let ctx = CheckContext {
        model_dir,
        device,
        dtype,
        tolerance_scale: a
            .tolerance_scale
            .unwrap_or_else(|| default_tolerance_scale(dtype)),
    };
    println!(
        "device {} dtype {:?} tolerance x{}",
        a.compute.device, dtype, ctx.tolerance_scale
    );
    let (mut passed, mut failed, mut errors, mut skipped) = (0usize, 0usize, 0usize, 0usize);
    for path in &a.goldens {
        let g = match Golden::load(path) {
            Ok(g) => g,
            Err(e) => {
                println!("ERROR  {}: {e}", path.display());
                errors += 1;
                continue;
            }
        };
        if g.kind().is_none() {
            println!(
                "-- {}: skipped (no `kind` in its metadata: a weights file, not a check)",
                path.display()
            );
            skipped += 1;
            continue;
        }
        println!("== {} ({})", path.display(), g.kind().unwrap_or("?"));
        match run_one(&g, &ctx) {
            Ok(res) => {
                for c in &res {
                    println!("  {c}");
                    if c.passed {
                        passed += 1
                    } else {
                        failed += 1
                    }
                }
            }
            Err(e) => {
                println!("  ERROR  {e:#}");
                errors += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed, {errors} errors");
    if failed + errors > 0 {
        bail!(
            "verification failed: {failed} tensors out of tolerance, {errors} checks could not run"
        );
    }
    if passed == 0 {
        bail!(
            "verification checked nothing: no tensor was compared ({skipped} of {} files were not golden checks)",
            a.goldens.len()
        );
    }
    Ok(())
}
