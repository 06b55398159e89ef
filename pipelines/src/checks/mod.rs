//! Parity checks against golden files, dispatched on the file's `kind` metadata. The same code backs the
//! parity tests and `diffpref verify` (which runs them on any device).

use crate::golden::{Comparison, Golden};
use crate::Result;
use candle_core::{DType, Device};
use std::path::PathBuf;

mod models;
mod scheduler;
mod text;
pub mod vae;

/// Where and how to run a check.
#[derive(Clone, Debug)]
pub struct CheckContext {
    /// The model folder (diffusers layout) for model checks; `None` for checks that need none.
    pub model_dir: Option<PathBuf>,
    pub device: Device,
    /// Compute dtype of the models (goldens are f32; other dtypes need a looser `tolerance_scale`).
    pub dtype: DType,
    /// Multiplies every tolerance (1 for f32).
    pub tolerance_scale: f64,
}

impl CheckContext {
    pub fn cpu(model_dir: Option<PathBuf>) -> Self {
        CheckContext {
            model_dir,
            device: Device::Cpu,
            dtype: DType::F32,
            tolerance_scale: 1.0,
        }
    }

    pub(crate) fn model_dir(&self, golden: &Golden) -> Result<&std::path::Path> {
        self.model_dir.as_deref().ok_or_else(|| {
            crate::Error::msg(format!(
                "{}: check `{}` needs a model folder (--model DIR)",
                golden.path.display(),
                golden.kind().unwrap_or("?")
            ))
        })
    }
}

/// Runs the check named by the golden's `kind`. `Ok(None)` when this crate does not know the kind (reward
/// models and training losses are checked by the crates that own them).
pub fn run(golden: &Golden, ctx: &CheckContext) -> Result<Option<Vec<Comparison>>> {
    let kind = golden.kind().unwrap_or("");
    let out = match kind {
        "tokenizer" => text::check_tokenizer(golden, ctx)?,
        "text_encoder" => text::check_text_encoder(golden, ctx)?,
        "scheduler" => scheduler::check_scheduler(golden, ctx)?,
        "scheduler_common" => scheduler::check_common(golden, ctx)?,
        "scheduler_timesteps" => scheduler::check_timesteps(golden, ctx)?,
        "ddim_logprob" => scheduler::check_ddim_logprob(golden, ctx)?,
        "unet" => models::check_unet(golden, ctx)?,
        "vae" => vae::check_vae(golden, ctx)?,
        "pipeline" => models::check_pipeline(golden, ctx)?,
        _ => return Ok(None),
    };
    Ok(Some(out))
}
