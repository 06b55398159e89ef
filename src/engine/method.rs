//! The seam between the [training loop](super::trainer) and a method: the [`Method`] trait.

use crate::engine::policy::Policy;
use crate::train::metrics::{MetricsWriter, TrainProgress};
use anyhow::Result;
use candle_core::Tensor;
use diffpref_pipelines::loading::StableDiffusion;
use std::path::Path;

/// Where the loop is, handed to every call of a [`Method`].
pub struct StepContext<'a> {
    /// The optimizer step being computed (0-based: step `step + 1` is logged).
    pub step: u64,
    /// The micro-batch within the step (0-based; `grad_accum` of them).
    pub micro: usize,
    pub grad_accum: usize,
    /// Micro-batch size (`optim.batch_size`).
    pub batch_size: usize,
    pub max_steps: u64,
    pub policy: &'a Policy,
    pub progress: &'a TrainProgress,
}

/// What one micro-batch produced.
pub struct MicroStep {
    /// The scalar loss (f32), differentiable into the policy's trainable weights. The trainer divides it by
    /// `grad_accum` before the backward pass.
    pub loss: Tensor,
    /// Named figures of this micro-batch (averaged over the step's micro-batches in `metrics.jsonl`).
    pub metrics: Vec<(&'static str, f64)>,
    /// Samples this micro-batch trained on (for the `<unit>_per_s` throughput).
    pub units: usize,
    /// What was trained on, for the error message of a non-finite loss (e.g. "pairs 3, 17").
    pub about: String,
}

/// What the run has at its start (after a resume).
pub struct StartContext<'a> {
    pub start_step: u64,
    pub metrics: &'a mut MetricsWriter,
    pub progress: &'a TrainProgress,
}

/// A training method: one micro-batch to a loss and metrics. The [trainer](super::trainer) owns the loop
/// (accumulation, clipping, AdamW, schedule, EMA, checkpoints, metrics, progress, Ctrl-C); a method owns its
/// data, its random streams and whatever it samples, and saves them with [`state`](Method::state) so a resumed
/// run continues bit-identically.
pub trait Method {
    /// The name of the method (`dpo`, `grpo`, ...), for messages.
    fn name(&self) -> &str;

    /// What `units` counts (`pairs`, `trajectories`, `images`): the throughput metric is `<unit>_per_s`.
    fn unit(&self) -> &str {
        "samples"
    }

    /// The metric shown next to the loss in the progress bar and plotted in `curves.png` (e.g. `implicit_acc`).
    fn headline_metric(&self) -> Option<&'static str> {
        None
    }

    /// Called once before the first step (after a resume): log notes, print the plan.
    fn on_start(&mut self, _ctx: StartContext<'_>) -> Result<()> {
        Ok(())
    }

    /// Called before the micro-batches of each optimizer step (an online method samples here); returns named
    /// figures logged with the step.
    fn before_step(&mut self, _ctx: &StepContext<'_>) -> Result<Vec<(&'static str, f64)>> {
        Ok(Vec::new())
    }

    /// One micro-batch.
    fn micro_step(&mut self, ctx: &StepContext<'_>) -> Result<MicroStep>;

    /// Called after the optimizer step; returns named figures logged with the step.
    fn after_step(&mut self, _ctx: &StepContext<'_>) -> Result<Vec<(&'static str, f64)>> {
        Ok(Vec::new())
    }

    /// The method's resumable state (random streams, data position, buffers), saved in each checkpoint's
    /// `state.json`.
    fn state(&self) -> Result<serde_json::Value>;

    /// Restores [`state`](Method::state) from a checkpoint.
    fn load_state(&mut self, state: serde_json::Value) -> Result<()>;

    /// Extra files of the method in a checkpoint folder (written before `state.json`).
    fn save_files(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }

    /// Reads what [`save_files`](Method::save_files) wrote, on resume.
    fn load_files(&mut self, _dir: &Path) -> Result<()> {
        Ok(())
    }

    /// Figures of the whole run for the report (`eval.json`), e.g. the reward calls of an online method.
    fn report(&self) -> serde_json::Value {
        serde_json::json!({})
    }

    /// The text-to-image model the validation and evaluation hooks sample (methods without one: `None`).
    fn model(&mut self) -> Option<&mut StableDiffusion> {
        None
    }
}
