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
    /// Write `run_dir` / `output_dir` into non-empty folders `pretrain` did not write (the config's
    /// `overwrite`).
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(a: PretrainArgs) -> Result<()> {
    if a.config.is_none() && a.overrides.is_empty() {
        bail!("diffpref pretrain needs --config FILE.toml (see examples/pretrain-shapes.toml) or --set key=value overrides");
    }
    let mut overrides = a.overrides.clone();
    if a.overwrite {
        overrides.push("overwrite=true".into());
    }
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
