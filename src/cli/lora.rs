//! `diffpref lora`: LoRA file tools. `lora merge` writes a full model folder whose UNet has the LoRAs merged
//! into its weights, loadable by `diffpref generate` and by diffusers.

use crate::output::{Input, OutputDir};
use crate::train::lora::{lora_specs, merge_into_unet_weights_variant};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use diffpref_pipelines::loading::resolve_model;
use std::path::{Path, PathBuf};

const MERGE: &str = "lora merge";

/// Arguments of `diffpref lora`.
#[derive(Args, Debug)]
pub struct LoraArgs {
    #[command(subcommand)]
    pub command: LoraCommand,
}

#[derive(Subcommand, Debug)]
pub enum LoraCommand {
    /// Merge LoRA files into a copy of a model: unet weights W + scale·B·A, other components linked or copied.
    Merge(MergeArgs),
}

/// Arguments of `diffpref lora merge`.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Model: a diffusers folder, a single-file checkpoint (`.safetensors`, original SD layout) or a hub id.
    #[arg(long)]
    pub model: String,
    /// LoRA file (PEFT/diffusers or kohya safetensors); repeat to merge several.
    #[arg(long = "lora", required = true)]
    pub loras: Vec<PathBuf>,
    /// LoRA strength: one for all files, or one per --lora in order (default 1).
    #[arg(long = "lora-scale", allow_negative_numbers = true)]
    pub lora_scales: Vec<f64>,
    /// Weight variant of the unet to read (e.g. fp16); the merged unet is written as the plain file.
    #[arg(long)]
    pub variant: Option<String>,
    /// Output model folder (new, empty, or an earlier `lora merge` output, which is replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace `--out` even when it is a non-empty folder `lora merge` did not write.
    #[arg(long)]
    pub overwrite: bool,
    /// Write `--out` as one `.safetensors` file in the original Stable Diffusion (LDM) key layout, the
    /// single-file format of A1111/ComfyUI/kohya, instead of a diffusers folder.
    #[arg(long)]
    pub single_file: bool,
}

pub fn run(a: LoraArgs) -> Result<()> {
    match a.command {
        LoraCommand::Merge(m) => merge(m),
    }
}

/// Hard-links `src` (symlinks resolved) to `dst`, or copies it when linking is not possible.
fn link_or_copy(src: &Path, dst: &Path) -> Result<()> {
    let real = src
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", src.display()))?;
    if std::fs::hard_link(&real, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(&real, dst)
        .with_context(|| format!("cannot copy {} to {}", real.display(), dst.display()))?;
    Ok(())
}

fn link_or_copy_tree(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).with_context(|| format!("cannot create {}", dst.display()))?;
    for entry in std::fs::read_dir(src).with_context(|| format!("cannot read {}", src.display()))? {
        let entry = entry.with_context(|| format!("cannot read {}", src.display()))?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        if from.is_dir() {
            link_or_copy_tree(&from, &to)?;
        } else {
            link_or_copy(&from, &to)?;
        }
    }
    Ok(())
}

/// `model` with `specs` merged into its UNet, written into the folder `dst` (other components linked or copied);
/// the number of merged layers.
fn write_merged(
    model: &Path,
    variant: Option<&str>,
    specs: &[(PathBuf, f64)],
    dst: &Path,
) -> Result<usize> {
    for entry in
        std::fs::read_dir(model).with_context(|| format!("cannot read {}", model.display()))?
    {
        let entry = entry.with_context(|| format!("cannot read {}", model.display()))?;
        if entry.file_name() == "unet" {
            continue;
        }
        let from = entry.path();
        let to = dst.join(entry.file_name());
        if from.is_dir() {
            link_or_copy_tree(&from, &to)?;
        } else {
            link_or_copy(&from, &to)?;
        }
    }
    let summary =
        merge_into_unet_weights_variant(&model.join("unet"), variant, specs, &dst.join("unet"))?;
    Ok(summary.merged_layers.len())
}

fn merge(a: MergeArgs) -> Result<()> {
    let specs = lora_specs(&a.loras, &a.lora_scales)?;
    let model = resolve_model(&a.model, a.variant.as_deref())
        .with_context(|| format!("--model {}", a.model))?;
    if !model.join("unet").is_dir() {
        bail!(
            "--model {}: no unet/ folder in {}",
            a.model,
            model.display()
        );
    }
    let spec = Path::new(&a.model);
    let mut inputs = vec![
        Input::new("--model folder", &model),
        Input::new("--model", spec),
    ];
    inputs.extend(a.loras.iter().map(|l| Input::new("--lora file", l)));
    if a.single_file {
        crate::output::check_output_file(&a.out, "--out", &inputs)?;
        if a.out.exists() && !a.overwrite {
            bail!(
                "--out {} exists; pass --overwrite to replace it",
                a.out.display()
            );
        }
    } else {
        OutputDir {
            path: &a.out,
            key: "--out",
            command: MERGE,
            legacy: &[],
        }
        .check(&inputs, a.overwrite)?;
    }
    let mut merged = 0;
    if a.single_file {
        // The merged folder in a scratch folder next to --out, then one file in the original layout.
        let parent = match a.out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let scratch = tempfile::Builder::new()
            .prefix(".diffpref-merge-")
            .tempdir_in(&parent)
            .with_context(|| format!("creating a scratch folder in {}", parent.display()))?;
        merged = write_merged(&model, a.variant.as_deref(), &specs, scratch.path())?;
        let (family, tensors) =
            diffpref_pipelines::single_file::folder_to_ldm(scratch.path(), a.variant.as_deref())
                .with_context(|| format!("--model {}: writing the single-file layout", a.model))?;
        crate::io::save_safetensors(&a.out, &tensors)?;
        eprintln!(
            "wrote a single-file {family:?} checkpoint ({} tensors)",
            tensors.len()
        );
    } else {
        crate::io::write_dir_atomic(&a.out, |tmp| {
            crate::output::mark(tmp, MERGE)?;
            merged = write_merged(&model, a.variant.as_deref(), &specs, tmp)?;
            Ok(())
        })?;
    }
    eprintln!(
        "merged {} LoRA file(s) into {merged} unet layers",
        specs.len()
    );
    println!("{}", a.out.display());
    Ok(())
}
