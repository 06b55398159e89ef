//! `diffpref convert`: a single-file Stable Diffusion checkpoint (original LDM key layout) to a diffusers folder,
//! or a diffusers folder to a single file. The key mapping is `diffpref_pipelines::single_file`.

use crate::output::{Input, OutputDir};
use anyhow::{bail, Context, Result};
use clap::Args;
use diffpref_pipelines::single_file::{
    default_config_dir, folder_to_ldm, is_single_file, write_folder,
};
use std::path::{Path, PathBuf};

const CONVERT: &str = "convert";

/// Arguments of `diffpref convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// A single-file checkpoint (`.safetensors`, LDM layout) to turn into a diffusers folder, or a diffusers
    /// folder to turn into a single file.
    #[arg(long)]
    pub model: PathBuf,
    /// Single file → folder: the diffusers config folder describing the checkpoint's architecture (configs,
    /// tokenizers, scheduler; weights are not read). Default: `<file stem>.config/` next to the file, else the
    /// standard SD 1.x / 2.x / SDXL configs, the family read from the keys (fetched from the hub once).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Single file → folder: the scheduler's prediction type, `epsilon` or `v_prediction` (SD 2.x 768-px
    /// models are v-prediction). Default: the config folder's.
    #[arg(long)]
    pub prediction_type: Option<String>,
    /// Folder → single file: the weight variant to read (e.g. fp16); the plain files are the fallback.
    #[arg(long)]
    pub variant: Option<String>,
    /// dtype of the written weights: f32, f16 or bf16. Default: as read.
    #[arg(long)]
    pub dtype: Option<String>,
    /// The folder (single file → folder) or `.safetensors` file (folder → single file) to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing `--out` this command did not write.
    #[arg(long)]
    pub overwrite: bool,
}

fn cast(
    tensors: &mut [(String, candle_core::Tensor)],
    dtype: Option<candle_core::DType>,
) -> Result<()> {
    if let Some(dt) = dtype {
        for (_, t) in tensors.iter_mut() {
            if t.dtype().is_float() {
                *t = t.to_dtype(dt)?;
            }
        }
    }
    Ok(())
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let dtype = a
        .dtype
        .as_deref()
        .map(super::common::parse_dtype)
        .transpose()?;
    if let Some(p) = &a.prediction_type {
        if !["epsilon", "v_prediction", "sample"].contains(&p.as_str()) {
            bail!("--prediction-type {p:?}: expected epsilon, v_prediction or sample");
        }
    }
    if is_single_file(&a.model) {
        to_folder(&a, dtype)
    } else if a.model.join("model_index.json").is_file() {
        if a.config.is_some() || a.prediction_type.is_some() {
            bail!(
                "--config and --prediction-type apply to a single file; --model {} is a folder",
                a.model.display()
            );
        }
        to_single_file(&a, dtype)
    } else {
        bail!(
            "--model {}: neither a single-file checkpoint (.safetensors) nor a diffusers folder (model_index.json)",
            a.model.display()
        )
    }
}

fn to_folder(a: &ConvertArgs, dtype: Option<candle_core::DType>) -> Result<()> {
    let config = match &a.config {
        Some(c) => c.clone(),
        None => default_config_dir(&a.model)?,
    };
    let inputs = [
        Input::new("--model file", &a.model),
        Input::new("--config folder", &config),
    ];
    OutputDir {
        path: &a.out,
        key: "--out",
        command: CONVERT,
        legacy: &[],
    }
    .check(&inputs, a.overwrite)?;
    let mut family = None;
    crate::io::write_dir_atomic(&a.out, |tmp| {
        crate::output::mark(tmp, CONVERT)?;
        family = Some(
            write_folder(&a.model, &config, a.prediction_type.as_deref(), tmp)
                .with_context(|| format!("converting {}", a.model.display()))?,
        );
        if dtype.is_some() {
            recast_folder(tmp, dtype)?;
        }
        Ok(())
    })?;
    eprintln!(
        "{:?} single file -> diffusers folder (configs from {})",
        family.expect("set"),
        config.display()
    );
    println!("{}", a.out.display());
    Ok(())
}

/// Rewrites every weight file of a freshly converted folder in `dtype`.
fn recast_folder(dir: &Path, dtype: Option<candle_core::DType>) -> Result<()> {
    for comp in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        let d = dir.join(comp);
        if !d.is_dir() {
            continue;
        }
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                let mut t = diffpref_pipelines::single_file::read_tensors(&p)?;
                cast(&mut t, dtype)?;
                crate::io::save_safetensors(&p, &t)?;
            }
        }
    }
    Ok(())
}

fn to_single_file(a: &ConvertArgs, dtype: Option<candle_core::DType>) -> Result<()> {
    if !a
        .out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
    {
        bail!(
            "--out {}: a single file must end in .safetensors",
            a.out.display()
        );
    }
    let inputs = [Input::new("--model folder", &a.model)];
    crate::output::check_output_file(&a.out, "--out", &inputs)?;
    if a.out.exists() && !a.overwrite {
        bail!(
            "--out {} exists; pass --overwrite to replace it",
            a.out.display()
        );
    }
    let (family, mut tensors) = folder_to_ldm(&a.model, a.variant.as_deref())
        .with_context(|| format!("--model {}", a.model.display()))?;
    cast(&mut tensors, dtype)?;
    crate::io::save_safetensors(&a.out, &tensors)?;
    eprintln!(
        "diffusers folder -> {family:?} single file ({} tensors)",
        tensors.len()
    );
    println!("{}", a.out.display());
    Ok(())
}
