//! `diffpref train <method>`.

use super::eval::print_comparison;
use crate::assets::{default_dpo_config, DEFAULT_DPO_PATH};
use crate::methods::pairwise::{train, DpoConfig};
use crate::train::checkpoint::StopFlag;
use anyhow::Result;
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
    /// pairs, with LoRA or full fine-tuning. With no arguments: a LoRA on the embedded shapes-world model
    /// and demo set, with the held-out reward before and after.
    Dpo(ConfigArgs),
}

/// `--config FILE.toml [--set key=value ...]`.
#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// TOML configuration (every field and its default: examples/dpo.toml). Without it: the embedded
    /// shapes-world default (assets/shapes/dpo.toml), with any --set applied on top.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config field, e.g. `--set optim.lr=1e-4 --set loss.kind=hinge` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

pub fn run(a: TrainArgs) -> Result<()> {
    match a.method {
        Method::Dpo(c) => {
            let cfg = match &c.config {
                Some(path) => DpoConfig::load(Some(path), &c.overrides)?,
                None => {
                    let cfg = default_dpo_config(&c.overrides)?;
                    eprintln!(
                        "no --config: the embedded default ({DEFAULT_DPO_PATH}): a DPO LoRA on {} with {}",
                        cfg.run.model,
                        cfg.data
                            .manifest
                            .as_ref()
                            .map(|m| m.display().to_string())
                            .unwrap_or_default()
                    );
                    cfg
                }
            };
            let stop = StopFlag::install()?;
            let s = train(&cfg, Some(stop))?;
            if s.interrupted {
                println!("interrupted; resume with the same command");
            }
            if let (Some(loss), Some(acc), Some(margin)) = (
                s.last_metric("loss"),
                s.last_metric("implicit_acc"),
                s.last_metric("reward_margin"),
            ) {
                println!(
                    "step {}: loss {loss:.4}, implicit accuracy {acc:.3}, reward margin {margin:.4}",
                    s.steps
                );
            }
            if let Some(e) = &s.eval {
                print_comparison(&e.reward, e.prompts, e.samples_per_prompt, &e.comparison);
                println!("report: {}", e.report.display());
                println!("before/after grid: {}", e.grid.display());
            }
            println!("weights: {}", s.weights.display());
            println!("metrics: {}", s.metrics.display());
            let curves = s.output_dir.join("curves.png");
            if curves.exists() {
                println!("curves: {}", curves.display());
            }
            Ok(())
        }
    }
}
