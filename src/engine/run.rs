//! A whole training command on a text-to-image model, the same for every method: load the model and the
//! policy ([`load_model`]), run the [loop](super::trainer) with the `[validation]` and `[eval]` hooks, write
//! the trained weights, the final held-out evaluation and `curves.png` ([`run`]).

use crate::engine::config::RunConfig;
use crate::engine::hooks::{EvalOutcome, Evaluation, Hooks, Validation};
use crate::engine::method::Method;
use crate::engine::policy::Policy;
use crate::engine::trainer::{train, RunOutcome, TrainerSettings};
use crate::train::checkpoint::StopFlag;
use crate::train::metrics::{plot_curves, read_metrics, series, MetricsWriter};
use anyhow::{Context, Result};
use diffpref_pipelines::loading::{resolve_model, LoadOptions, StableDiffusion};
use std::path::{Path, PathBuf};

/// What a training command produced.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// Optimizer steps done.
    pub steps: u64,
    pub output_dir: PathBuf,
    /// The trained LoRA (`pytorch_lora_weights.safetensors`) or the fine-tuned `unet/` folder.
    pub weights: PathBuf,
    pub metrics: PathBuf,
    /// The logged figures of the last step run (`loss` first).
    pub last: Vec<(String, f64)>,
    /// True when stopped early by Ctrl-C (a checkpoint was saved).
    pub interrupted: bool,
    /// Held-out reward after vs before training (when `[eval] prompts` is set and the run finished).
    pub eval: Option<EvalOutcome>,
    /// Wall-clock seconds of the whole command.
    pub seconds: f64,
}

impl TrainSummary {
    /// A figure of the last step.
    pub fn last_metric(&self, name: &str) -> Option<f64> {
        self.last.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }
}

/// Loads `run.model` (resolved to a folder) on `run.device` in `run.dtype`.
pub fn load_model(run: &RunConfig) -> Result<(StableDiffusion, PathBuf)> {
    let device = run.device.device().context("`device`")?;
    let model_dir = resolve_model(&run.model, run.variant.as_deref())
        .with_context(|| format!("model {}", run.model))?;
    let model = StableDiffusion::load(
        &model_dir,
        &LoadOptions {
            dtype: run.dtype.dtype(),
            device,
            variant: run.variant.clone(),
        },
    )
    .with_context(|| format!("loading {}", model_dir.display()))?;
    Ok((model, model_dir))
}

/// The policy of `run.mode` on `model` (LoRA adapters, or a trainable copy of the UNet).
pub fn load_policy(
    run: &RunConfig,
    model: &mut StableDiffusion,
    model_dir: &Path,
) -> Result<Policy> {
    let policy = Policy::for_mode(
        run.mode,
        model,
        model_dir,
        run.variant.as_deref(),
        &run.lora,
        run.seed,
    )?;
    model
        .unet
        .set_gradient_checkpointing(run.gradient_checkpointing);
    Ok(policy)
}

/// A whole training command of a method that owns its model: checks `out` against the command's `inputs`
/// (never written over), loads the model and the policy, builds the method with `new_method(model, model_dir)`
/// and [`run`]s it. `config` is the whole configuration (stored in every checkpoint).
pub fn train_method<M: Method>(
    run_cfg: &RunConfig,
    out: &Path,
    command: &str,
    inputs: &[crate::output::Input<'_>],
    config: serde_json::Value,
    stop: Option<StopFlag>,
    new_method: impl FnOnce(StableDiffusion, &Path) -> Result<M>,
) -> Result<TrainSummary> {
    run_cfg.check_output(out, command, inputs)?;
    let (mut model, model_dir) = load_model(run_cfg)?;
    let policy = load_policy(run_cfg, &mut model, &model_dir)?;
    let mut method = new_method(model, &model_dir)?;
    run(run_cfg, out, &model_dir, &policy, &mut method, config, stop)
}

/// Runs `method` (whose [`Method::model`] is the model `policy` trains) under `run`'s settings into `out`, then
/// writes the weights (the EMA ones when kept), the final held-out evaluation (`eval.json`,
/// `before_after.png`; skipped when interrupted) and `curves.png` (loss, the method's headline figure, the
/// held-out reward). `config` is the whole configuration, stored in every checkpoint; the method's
/// [`Method::report`] and the wall time go into `eval.json`.
pub fn run(
    run: &RunConfig,
    out: &Path,
    model_dir: &Path,
    policy: &Policy,
    method: &mut dyn Method,
    config: serde_json::Value,
    stop: Option<StopFlag>,
) -> Result<TrainSummary> {
    let t0 = std::time::Instant::now();
    let command = format!("train {}", method.name());
    run.output_guard(out, &command).create()?;
    let device = run.device.device()?;
    let mut hooks = Hooks {
        evaluation: Evaluation::new(&run.eval, &device, run.log.progress)?,
        validation: Validation::new(&run.validation, out),
    };
    let settings = TrainerSettings {
        optim: run.optim.clone(),
        log: run.log.clone(),
        output_dir: out.to_path_buf(),
        resume: run.resume,
        checkpoints: true,
        config,
    };
    let outcome: RunOutcome = train(&settings, policy, method, &mut hooks, stop)?;
    let weights = policy.export(out, run.log.lora_format, model_dir)?;
    let eval = match (&hooks.evaluation, outcome.interrupted) {
        (Some(e), false) => {
            let mut extra = method.report();
            if let Some(o) = extra.as_object_mut() {
                o.insert("method".into(), method.name().into());
                o.insert("train_seconds".into(), t0.elapsed().as_secs_f64().into());
            }
            let model = method
                .model()
                .context("[eval] needs a text-to-image model")?;
            let mut metrics =
                MetricsWriter::open_with(&outcome.metrics, Some(u64::MAX), run.log.tensorboard)?;
            Some(e.finish(model, policy, outcome.steps, out, &mut metrics, extra)?)
        }
        _ => None,
    };
    let records = read_metrics(&outcome.metrics)?;
    let mut curves = vec![("loss", series(&records, "loss"))];
    if let Some(h) = method.headline_metric() {
        curves.push((h, series(&records, h)));
    }
    let eval_curve = series(&records, "eval_reward");
    if !eval_curve.is_empty() {
        curves.push(("eval_reward", eval_curve));
    }
    if curves[0].1.len() > 1 {
        plot_curves(out.join("curves.png"), &curves)?;
    }
    Ok(TrainSummary {
        steps: outcome.steps,
        output_dir: out.to_path_buf(),
        weights,
        metrics: outcome.metrics,
        last: outcome.last,
        interrupted: outcome.interrupted,
        eval,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
