//! `diffpref pretrain --config FILE.toml [--set key=value ...]`: a small SD-architecture model from scratch on
//! the shapes world (see [`crate::train::pretrain`] and `examples/pretrain-shapes.toml`).

use crate::train::checkpoint::StopFlag;
use crate::train::pretrain::{pretrain, PretrainConfig};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

/// Arguments of `diffpref pretrain`.
#[derive(Args, Debug)]
pub struct PretrainArgs {
    /// TOML configuration (every field and its default: examples/pretrain-shapes.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config field, e.g. `--set unet_train.steps=100` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Where to compute (the config's `device`): cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// dtype of the written model (the config's `save_dtype`): f32, f16 or bf16; training itself is f32.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Write `run_dir` / `output_dir` into non-empty folders `pretrain` did not write (the config's
    /// `overwrite`).
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(a: PretrainArgs) -> Result<()> {
    if a.config.is_none() && a.overrides.is_empty() {
        bail!("diffpref pretrain needs --config FILE.toml (see examples/pretrain-shapes.toml) or --set key=value overrides");
    }
    // --device / --dtype first: a later --set wins.
    let mut overrides = Vec::new();
    if let Some(d) = &a.device {
        overrides.push(format!("device={d:?}"));
    }
    if let Some(d) = &a.dtype {
        overrides.push(format!("save_dtype={d:?}"));
    }
    if a.overwrite {
        overrides.push("overwrite=true".into());
    }
    overrides.extend(a.overrides.iter().cloned());
    let cfg = PretrainConfig::load(a.config.as_deref(), &overrides)?;
    let stop = StopFlag::install()?;
    let s = pretrain(&cfg, Some(stop))?;
    if let Some(sf) = s.scaling_factor {
        println!("vae scaling factor: {sf:.5}");
    }
    if let Some(l) = s.vae_loss {
        println!("vae: last loss {l:.5}");
    }
    if let Some(l) = s.unet_loss {
        println!("unet: last loss {l:.5}");
    }
    if s.interrupted {
        println!("interrupted; resume with the same command");
    } else {
        println!("model: {}", s.output_dir.display());
    }
    println!("run: {}", s.run_dir.display());
    Ok(())
}
