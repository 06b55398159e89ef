//! The `diffpref` command line.

pub mod bench;
pub mod common;
pub mod convert;
pub mod data;
pub mod eval;
pub mod generate;
pub mod grid;
pub mod lora;
pub mod pretrain;
pub mod score;
pub mod train;
pub mod verify;

use clap::{Parser, Subcommand};

/// diffpref: align text-to-image diffusion models with human preferences.
#[derive(Parser, Debug)]
#[command(name = "diffpref", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Text-to-image: one PNG per prompt, optional per-step trace and x0 strips.
    Generate(generate::GenerateArgs),
    /// A labelled comparison grid: rows are prompts, columns models / guidance scales / seeds.
    Grid(grid::GridArgs),
    /// Check numerics against golden files on a device (exit status 1 on any failure).
    Verify(verify::VerifyArgs),
    /// Benchmarks (UNet forward/backward, pipeline seconds per step).
    Bench(bench::BenchArgs),
    /// Score images with a reward model (CLIP score, aesthetic, PickScore, HPS, ImageReward), or measure
    /// a reward's agreement with preference pairs (--pairs).
    Score(score::ScoreArgs),
    /// Held-out evaluation with a reward: mean with 95% CI, and with --lora the win rate and paired change
    /// against the base model on the same noise, plus diversity; JSON report and grid PNG.
    Eval(eval::EvalArgs),
    /// Single-file checkpoints (original SD layout, one .safetensors) to diffusers folders and back.
    Convert(convert::ConvertArgs),
    /// LoRA tools: `lora merge` bakes LoRA files into a copy of a model (`--single-file`: as one file).
    Lora(lora::LoraArgs),
    /// Preference fine-tuning: `train dpo [--config FILE.toml] [--set key=value ...]` (no arguments: the
    /// embedded shapes-world default).
    Train(train::TrainArgs),
    /// Shapes-world data: `data make-prefs` (synthetic preference pairs), `data render` (ground truth),
    /// `data prompts` (random captions).
    Data(data::DataArgs),
    /// Train a small SD-architecture model from scratch on the shapes world (VAE, then UNet) and write a
    /// diffusers folder: `pretrain --config FILE.toml [--set key=value ...]`.
    Pretrain(pretrain::PretrainArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Grid(a) => grid::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Score(a) => score::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Lora(a) => lora::run(a),
        Command::Train(a) => train::run(a),
        Command::Data(a) => data::run(a),
        Command::Pretrain(a) => pretrain::run(a),
    }
}
