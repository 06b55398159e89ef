//! `diffpref train <method>`.

use crate::train::checkpoint::StopFlag;
use crate::train::pairwise::{train, TrainConfig};
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// Arguments of `diffpref train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(subcommand)]
    pub method: Method,
}

#[derive(Subcommand, Debug)]
pub enum Method {
    /// Diffusion-DPO and its loss family (hinge, IPO, cDPO, robust, SimPO, MaPO, KTO, SFT) on preference
    /// pairs, with LoRA or full fine-tuning.
    Dpo(ConfigArgs),
}

/// `--config FILE.toml [--set key=value ...]`.
#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// TOML configuration (every field and its default: examples/dpo.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config field, e.g. `--set optim.lr=1e-4 --set loss.kind=hinge` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

pub fn run(a: TrainArgs) -> Result<()> {
    match a.method {
        Method::Dpo(c) => {
            if c.config.is_none() && c.overrides.is_empty() {
                bail!("diffpref train dpo needs --config FILE.toml (see examples/dpo.toml) or --set key=value overrides");
            }
            let cfg = TrainConfig::load(c.config.as_deref(), &c.overrides)?;
            let stop = StopFlag::install()?;
            let s = train(&cfg, Some(stop))?;
            if s.interrupted {
                println!("interrupted; resume with the same command");
            }
            if let Some(l) = &s.last {
                println!(
                    "step {}: loss {:.4}, implicit accuracy {:.3}, reward margin {:.4}",
                    s.steps, l.loss, l.implicit_acc, l.margin
                );
            }
            println!("weights: {}", s.weights.display());
            println!("metrics: {}", s.metrics.display());
            Ok(())
        }
    }
}
