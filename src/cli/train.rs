//! `diffpref train <method>`.

use super::eval::print_comparison;
use crate::assets::{
    default_adjoint_config, default_dpo_config, default_grpo_config, default_lpo_config,
    default_lrm_config, default_seppo_config, default_spm_config, default_spo_config,
    DEFAULT_ADJOINT_PATH, DEFAULT_DPO_PATH, DEFAULT_GRPO_PATH, DEFAULT_LPO_PATH, DEFAULT_LRM_PATH,
    DEFAULT_SEPPO_PATH, DEFAULT_SPM_PATH, DEFAULT_SPO_PATH,
};
use crate::engine::run::TrainSummary;
use crate::methods::adjoint::AdjointConfig;
use crate::methods::grpo::GrpoConfig;
use crate::methods::lpo::LpoConfig;
use crate::methods::lrm::LrmConfig;
use crate::methods::lrm::PairRmSummary;
use crate::methods::pairwise::DpoConfig;
use crate::methods::seppo::{SeppoConfig, WinnerSource};
use crate::methods::spm::SpmConfig;
use crate::methods::spo::{SpoConfig, SpoScorer};
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
    /// GRPO: group-relative policy optimisation on trajectories sampled during training, scored by any reward
    /// (or a weighted mix), LoRA or full. With no arguments: a LoRA on the embedded shapes-world model with the
    /// exact shapes reward, judged on held-out prompts before and after.
    Grpo(ConfigArgs),
    /// A latent reward model (LRM): a diffusion model's own UNet encoder scoring noisy latents, trained on
    /// preference pairs at random noise levels; reports pair accuracy per timestep band. With no arguments: on
    /// the shapes-world model, from pairs of its samples labelled by the ground truth.
    Lrm(ConfigArgs),
    /// Latent Preference Optimization: step-level preference optimisation on the model's own trajectories,
    /// K children per step scored by a latent reward model (`train lrm`), LoRA or full. With no arguments: a
    /// LoRA on the shapes-world model with the LRM `train lrm` writes, judged on held-out prompts.
    Lpo(ConfigArgs),
    /// A step-aware preference model (SPM, SPO's): a CLIP-family model with timestep conditioning scoring the
    /// decoded x0 prediction of a noisy step, trained on preference pairs at random noise levels; reports pair
    /// accuracy per timestep band. With no arguments: a new image tower for the shapes-world model, from pairs
    /// of its samples labelled by the ground truth.
    Spm(ConfigArgs),
    /// Step-by-step preference optimisation (SPO): step-level preference optimisation on the model's own
    /// trajectories, K children per step scored on their decoded x0 by a step-aware preference model (`train
    /// spm`), a random child continuing, LoRA or full. With no arguments: a LoRA on the shapes-world model with
    /// the SPM `train spm` writes, judged on held-out prompts.
    Spo(ConfigArgs),
    /// SePPO: winners (a preference set's chosen images, or the best of k samples under a reward) against
    /// fresh samples of a reference drawn at random from the run's own checkpoints, the anchor-based adaptive
    /// flipper deciding per pair whether the reference sample is a loser or a second positive; LoRA or full.
    /// With no arguments: a LoRA on the shapes-world model with the demo set's chosen images only, judged on
    /// held-out prompts.
    Seppo(ConfigArgs),
    /// Adjoint Matching: reward fine-tuning by stochastic optimal control — the control of memoryless (DDIM
    /// η = 1) trajectories regressed onto the lean adjoint of a differentiable reward (or a weighted mix),
    /// carried back by the base model's vector-Jacobian products; LoRA or full. With no arguments: a LoRA on
    /// the shapes-world model trained on the shapes reward's differentiable surrogate, judged by the exact
    /// reward on held-out prompts.
    Adjoint(ConfigArgs),
}

/// `--config FILE.toml [--set key=value ...] [--device D] [--dtype T]`.
#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// TOML configuration (every field and its default: examples/<method>.toml). Without it: the embedded
    /// shapes-world default (assets/shapes/<method>.toml), with any --set applied on top.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config field, e.g. `--set optim.lr=1e-4 --set loss.kind=hinge` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Where to compute (the config's `device`): cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// Model dtype (the config's `dtype`): f32, bf16 or f16.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Write into an `output_dir` that is not empty and was not written by this command (the config's
    /// `overwrite`).
    #[arg(long)]
    pub overwrite: bool,
}

impl ConfigArgs {
    /// The `--set` overrides with `--device` / `--dtype` first (a later `--set` wins).
    fn overrides(&self) -> Vec<String> {
        let mut o = Vec::new();
        if let Some(d) = &self.device {
            o.push(format!("device={d:?}"));
        }
        if let Some(d) = &self.dtype {
            o.push(format!("dtype={d:?}"));
        }
        if self.overwrite {
            o.push("overwrite=true".into());
        }
        o.extend(self.overrides.iter().cloned());
        o
    }
}

fn report(s: &TrainSummary) {
    if s.interrupted {
        println!("interrupted; resume with the same command");
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
    println!("wall time: {:.0} s", s.seconds);
}

pub fn run(a: TrainArgs) -> Result<()> {
    let stop = StopFlag::install()?;
    match a.method {
        Method::Dpo(c) => {
            let cfg = match &c.config {
                Some(path) => DpoConfig::load(Some(path), &c.overrides())?,
                None => {
                    let cfg = default_dpo_config(&c.overrides())?;
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
            let s = crate::methods::pairwise::train(&cfg, Some(stop))?;
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
            report(&s);
            Ok(())
        }
        Method::Grpo(c) => {
            let cfg = match &c.config {
                Some(path) => GrpoConfig::load(Some(path), &c.overrides())?,
                None => {
                    let cfg = default_grpo_config(&c.overrides())?;
                    eprintln!(
                        "no --config: the embedded default ({DEFAULT_GRPO_PATH}): a GRPO LoRA on {} with the {} reward",
                        cfg.run.model,
                        cfg.reward
                            .terms("[reward]")
                            .map(|t| t.iter().map(|t| format!("{:?}", t.kind)).collect::<Vec<_>>().join("+"))
                            .unwrap_or_default()
                    );
                    cfg
                }
            };
            let s = crate::methods::grpo::train(&cfg, Some(stop))?;
            if let (Some(loss), Some(r)) = (s.last_metric("loss"), s.last_metric("reward")) {
                println!(
                    "step {}: loss {loss:.5}, training reward {r:.4}, {} reward calls",
                    s.steps,
                    s.last_metric("reward_calls").unwrap_or(0.0)
                );
            }
            report(&s);
            Ok(())
        }
        Method::Lrm(c) => {
            let cfg = match &c.config {
                Some(path) => LrmConfig::load(Some(path), &c.overrides())?,
                None => {
                    let cfg = default_lrm_config(&c.overrides())?;
                    eprintln!(
                        "no --config: the embedded default ({DEFAULT_LRM_PATH}): an LRM on {}",
                        cfg.model
                    );
                    cfg
                }
            };
            let s = crate::methods::lrm::train(&cfg, Some(stop))?;
            print_pair_rm(&s, "lrm");
            Ok(())
        }
        Method::Spm(c) => {
            let cfg = match &c.config {
                Some(path) => SpmConfig::load(Some(path), &c.overrides())?,
                None => {
                    let cfg = default_spm_config(&c.overrides())?;
                    eprintln!(
                        "no --config: the embedded default ({DEFAULT_SPM_PATH}): an SPM for {}",
                        cfg.model
                    );
                    cfg
                }
            };
            let s = crate::methods::spm::train(&cfg, Some(stop))?;
            print_pair_rm(&s, "spm");
            Ok(())
        }
        Method::Spo(c) => {
            let cfg = match &c.config {
                Some(path) => SpoConfig::load(Some(path), &c.overrides())?,
                None => {
                    let cfg = default_spo_config(&c.overrides())?;
                    let spm = cfg.spo.spm.clone().unwrap_or_default();
                    if cfg.spo.scorer == SpoScorer::Spm
                        && !spm.join(diffpref_rewards::spm::CONFIG_FILE).exists()
                    {
                        anyhow::bail!(
                            "the default `train spo` uses the step-aware preference model at {}: train it first with `diffpref train spm` (no arguments), or give --set spo.spm=DIR (or --set spo.scorer=reward for the exact shapes reward as an oracle step scorer)",
                            spm.display()
                        );
                    }
                    let scorer = match cfg.spo.scorer {
                        SpoScorer::Spm => format!("the SPM {}", spm.display()),
                        SpoScorer::Reward => "[reward] on each child's x0".to_string(),
                    };
                    eprintln!(
                        "no --config: the embedded default ({DEFAULT_SPO_PATH}): an SPO LoRA on {} with {scorer}",
                        cfg.run.model
                    );
                    cfg
                }
            };
            let s = crate::methods::spo::train(&cfg, Some(stop))?;
            print_step_level(&s);
            Ok(())
        }
        Method::Seppo(c) => {
            let cfg = match &c.config {
                Some(path) => SeppoConfig::load(Some(path), &c.overrides())?,
                None => {
                    let cfg = default_seppo_config(&c.overrides())?;
                    let winners = match cfg.seppo.winners {
                        WinnerSource::Data => format!(
                            "the chosen images of {}",
                            cfg.data
                                .manifest
                                .as_ref()
                                .map(|m| m.display().to_string())
                                .unwrap_or_default()
                        ),
                        WinnerSource::BestOfK => format!("the best of {} samples", cfg.seppo.k),
                    };
                    eprintln!(
                        "no --config: the embedded default ({DEFAULT_SEPPO_PATH}): a SePPO LoRA on {} with {winners}",
                        cfg.run.model
                    );
                    cfg
                }
            };
            let s = crate::methods::seppo::train(&cfg, Some(stop))?;
            if let (Some(loss), Some(flip), Some(acc)) = (
                s.last_metric("loss"),
                s.last_metric("flip_rate"),
                s.last_metric("implicit_acc"),
            ) {
                println!(
                    "step {}: loss {loss:.4}, flip rate {flip:.3}, implicit accuracy {acc:.3}, {} reference samples",
                    s.steps,
                    s.last_metric("samples").unwrap_or(0.0)
                );
            }
            report(&s);
            Ok(())
        }
        Method::Adjoint(c) => {
            let cfg = match &c.config {
                Some(path) => AdjointConfig::load(Some(path), &c.overrides())?,
                None => {
                    let cfg = default_adjoint_config(&c.overrides())?;
                    eprintln!(
                        "no --config: the embedded default ({DEFAULT_ADJOINT_PATH}): an Adjoint Matching LoRA on {} \
                         with λ = {} times the {} reward",
                        cfg.run.model,
                        cfg.adjoint.reward_scale,
                        cfg.reward
                            .terms("[reward]")
                            .map(|t| t.iter().map(|t| format!("{:?}", t.kind)).collect::<Vec<_>>().join("+"))
                            .unwrap_or_default()
                    );
                    cfg
                }
            };
            let s = crate::methods::adjoint::train(&cfg, Some(stop))?;
            if let (Some(loss), Some(r)) = (s.last_metric("loss"), s.last_metric("reward")) {
                println!(
                    "step {}: loss {loss:.4}, training reward {r:.4}, {} reward calls",
                    s.steps,
                    s.last_metric("reward_calls").unwrap_or(0.0)
                );
            }
            report(&s);
            Ok(())
        }
        Method::Lpo(c) => {
            let cfg = match &c.config {
                Some(path) => LpoConfig::load(Some(path), &c.overrides())?,
                None => {
                    let cfg = default_lpo_config(&c.overrides())?;
                    let lrm = cfg.lpo.lrm.clone().unwrap_or_default();
                    if !lrm.join(diffpref_rewards::lrm::CONFIG_FILE).exists() {
                        anyhow::bail!(
                            "the default `train lpo` uses the latent reward model at {}: train it first with `diffpref train lrm` (no arguments), or give --set lpo.lrm=DIR",
                            lrm.display()
                        );
                    }
                    eprintln!(
                        "no --config: the embedded default ({DEFAULT_LPO_PATH}): an LPO LoRA on {} with the LRM {}",
                        cfg.run.model,
                        lrm.display()
                    );
                    cfg
                }
            };
            let s = crate::methods::lpo::train(&cfg, Some(stop))?;
            print_step_level(&s);
            Ok(())
        }
    }
}

/// What `train lrm` / `train spm` print: the held-out pair accuracy per band, before and after.
fn print_pair_rm(s: &PairRmSummary, name: &str) {
    if s.interrupted {
        println!("interrupted; resume with the same command");
    }
    if let Some(after) = &s.after {
        println!("held-out pair accuracy per timestep band (before -> after training):");
        for (i, a) in after.iter().enumerate() {
            let b = s.before.as_ref().and_then(|b| b.get(i));
            let truth = match (a.truth_accuracy, a.truth_ci) {
                (Some(x), Some(ci)) => {
                    format!("; vs ground truth {x:.3} [{:.3}, {:.3}]", ci[0], ci[1])
                }
                _ => String::new(),
            };
            println!(
                "  t in [{}, {}): {} -> {:.3} [{:.3}, {:.3}] ({} pairs){truth}",
                a.band[0],
                a.band[1],
                b.map(|b| format!("{:.3}", b.accuracy))
                    .unwrap_or_else(|| "-".into()),
                a.accuracy,
                a.ci[0],
                a.ci[1],
                a.pairs
            );
        }
    }
    println!("{name}: {}", s.weights.display());
    println!("wall time: {:.0} s", s.seconds);
}

/// What `train lpo` / `train spo` print: the last step's loss and step accuracy, then the run's report.
fn print_step_level(s: &TrainSummary) {
    if let (Some(loss), Some(acc)) = (s.last_metric("loss"), s.last_metric("step_acc")) {
        println!(
            "step {}: loss {loss:.4}, step accuracy {acc:.3}, {} tuples kept, {} scorer calls",
            s.steps,
            s.last_metric("tuples_kept").unwrap_or(0.0),
            s.last_metric("scorer_calls").unwrap_or(0.0)
        );
    }
    report(s);
}
