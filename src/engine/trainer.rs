//! The one training loop of diffpref, used by every method (`train dpo`, `train grpo`, `pretrain`'s two
//! stages, `bench dpo`).
//!
//! One optimizer step `s` (0-based; logged as `s + 1`):
//!
//! 1. Ctrl-C ([`StopFlag`]) was pressed: save a checkpoint of the state before this step and return;
//! 2. `lr = schedule(s)`; [`Method::before_step`] (online methods sample here);
//! 3. `grad_accum` times [`Method::micro_step`] → loss `L_k`; a non-finite loss stops the run naming the
//!    last good checkpoint; `∇(L_k / grad_accum)` is accumulated over the policy's trainable weights;
//! 4. a non-finite gradient stops the run (naming the parameter); the global norm is clipped to
//!    `max_grad_norm`; AdamW steps the f32 master weights; the EMA (if any) is updated;
//! 5. [`Method::after_step`]; one line of `metrics.jsonl`: `loss`, the method's figures (means over the
//!    micro-batches), `grad_norm`, `lr`, `<unit>_per_s`, `step_s`;
//! 6. a checkpoint every `log.checkpoint_every` steps and at the end (atomic, the last `log.keep_last` kept):
//!    trainable weights, optimizer state, EMA, the LoRA file, and `state.json` with the method's state;
//! 7. the hooks: a validation grid, a held-out evaluation.
//!
//! Resuming (`resume = true` and a checkpoint in the run folder) restores weights, optimizer, EMA and the
//! method's state (random streams, data position), truncates `metrics.jsonl` after the checkpoint's step, and
//! continues: a resumed CPU run ends with the same weights as an uninterrupted one. At the end the EMA weights
//! (if kept) are copied into the trained ones.

use crate::engine::config::{LogConfig, OptimConfig};
use crate::engine::hooks::Hooks;
use crate::engine::method::{Method, StartContext, StepContext};
use crate::engine::policy::Policy;
use crate::train::checkpoint::{self, load_vars, save_vars, Checkpointer, StopFlag};
use crate::train::ema::{Ema, EmaConfig};
use crate::train::metrics::{MetricsWriter, TrainProgress, METRICS_FILE};
use crate::train::optim::{clip_grad_norm, AdamW, AdamWConfig, GradAccumulator};
use crate::train::schedule::LrSchedule;
use anyhow::{bail, Context, Result};
use candle_core::DType;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How the loop runs (the shared part of a run's configuration).
#[derive(Clone, Debug)]
pub struct TrainerSettings {
    pub optim: OptimConfig,
    pub log: LogConfig,
    /// The run folder (checkpoints, `metrics.jsonl`).
    pub output_dir: PathBuf,
    /// Continue from the latest checkpoint in `output_dir`.
    pub resume: bool,
    /// Write checkpoints (every `log.checkpoint_every` steps, at the end, on Ctrl-C). Off only for benchmarks.
    pub checkpoints: bool,
    /// The run's configuration, stored in every checkpoint's `state.json`.
    pub config: serde_json::Value,
}

/// What a call of [`train`] did.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// The step the run started from (0, or a checkpoint's step).
    pub start_step: u64,
    /// Optimizer steps done in total (`max_steps` unless interrupted).
    pub steps: u64,
    /// Stopped by Ctrl-C (a checkpoint was saved).
    pub interrupted: bool,
    /// The logged figures of the last step run by this call (`loss` first).
    pub last: Vec<(String, f64)>,
    pub metrics: PathBuf,
}

impl RunOutcome {
    /// A figure of the last step.
    pub fn last_metric(&self, name: &str) -> Option<f64> {
        self.last.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }
}

#[derive(Serialize, Deserialize)]
struct State {
    step: u64,
    method: serde_json::Value,
    config: serde_json::Value,
}

/// Means of named figures over micro-batches, keeping the first-seen order.
#[derive(Default)]
struct Means {
    sums: Vec<(&'static str, f64, usize)>,
}

impl Means {
    fn add(&mut self, name: &'static str, v: f64) {
        match self.sums.iter_mut().find(|(k, _, _)| *k == name) {
            Some(e) => {
                e.1 += v;
                e.2 += 1;
            }
            None => self.sums.push((name, v, 1)),
        }
    }

    fn means(&self) -> impl Iterator<Item = (&'static str, f64)> + '_ {
        self.sums.iter().map(|(k, s, n)| (*k, s / *n as f64))
    }
}

/// "checkpoint-N" of the last good checkpoint, for error messages.
fn last_good(out: &Path) -> String {
    checkpoint::latest(out)
        .ok()
        .flatten()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|| "none yet".into())
}

/// Runs (or resumes) the loop of the module docs: `method` on `policy`'s weights, with `hooks`. `stop` (e.g.
/// from Ctrl-C) makes it save a checkpoint and return early.
pub fn train(
    settings: &TrainerSettings,
    policy: &Policy,
    method: &mut dyn Method,
    hooks: &mut Hooks,
    stop: Option<StopFlag>,
) -> Result<RunOutcome> {
    let o = &settings.optim;
    o.validate()?;
    let out = &settings.output_dir;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let params = policy.params();
    anyhow::ensure!(!params.is_empty(), "nothing to train");
    let base_lr = o.base_lr();
    let mut opt = AdamW::new(AdamWConfig {
        lr: base_lr,
        beta1: o.beta1,
        beta2: o.beta2,
        eps: o.eps,
        weight_decay: o.weight_decay,
    });
    let schedule = LrSchedule::new(o.schedule, o.warmup_steps, o.max_steps);
    schedule.validate()?;
    let mut ema = if o.ema_decay > 0.0 {
        Some(Ema::new(
            params,
            EmaConfig {
                decay: o.ema_decay,
                ..Default::default()
            },
        )?)
    } else {
        None
    };
    let checkpointer = Checkpointer::new(out.clone(), settings.log.keep_last.max(1));

    // Resume.
    let mut start = 0u64;
    if settings.resume {
        if let Some(dir) = checkpoint::latest(out)? {
            let state: State = serde_json::from_value(checkpoint::load_state(&dir)?)
                .with_context(|| format!("{}: unreadable state.json", dir.display()))?;
            load_vars(&dir.join("trainable.safetensors"), params)?;
            opt.load_state(dir.join("optimizer.safetensors"), params)?;
            if let Some(e) = ema.as_mut() {
                e.load(dir.join("ema.safetensors"), params)?;
            }
            method
                .load_state(state.method)
                .with_context(|| format!("{}: the {} state", dir.display(), method.name()))?;
            method.load_files(&dir)?;
            start = state.step;
            eprintln!("resuming from {} (step {start})", dir.display());
        }
    }
    let metrics_path = out.join(METRICS_FILE);
    let mut metrics = MetricsWriter::open_with(
        &metrics_path,
        if start > 0 { Some(start) } else { None },
        settings.log.tensorboard,
    )?;
    let progress = if settings.log.progress {
        TrainProgress::new(o.max_steps, start)
    } else {
        TrainProgress::hidden(o.max_steps, start)
    };
    method.on_start(StartContext {
        start_step: start,
        metrics: &mut metrics,
        progress: &progress,
    })?;
    if let Some(e) = hooks.evaluation.as_mut() {
        let model = method
            .model()
            .context("[eval] needs a method with a text-to-image model")?;
        e.before(model, policy, &mut metrics, start)?;
    }
    let stop = stop.unwrap_or_default();

    let save =
        |step: u64, opt: &AdamW, ema: &Option<Ema>, method: &dyn Method| -> Result<PathBuf> {
            let state = State {
                step,
                method: method.state()?,
                config: settings.config.clone(),
            };
            checkpointer.save(step, &serde_json::to_value(&state)?, |dir| {
                save_vars(&dir.join("trainable.safetensors"), params)?;
                opt.save_state(dir.join("optimizer.safetensors"))?;
                if let Some(e) = ema {
                    e.save(dir.join("ema.safetensors"))?;
                }
                if let Some(l) = policy.lora_set() {
                    l.save(
                        &dir.join("pytorch_lora_weights.safetensors"),
                        settings.log.lora_format,
                    )?;
                }
                method.save_files(dir)
            })
        };

    let mut last = Vec::new();
    let mut interrupted = false;
    let mut done_steps = start;
    let unit = format!("{}_per_s", method.unit());
    for step in start..o.max_steps {
        if stop.is_set() {
            if settings.checkpoints {
                let dir = save(step, &opt, &ema, &*method)?;
                progress.println(format!(
                    "interrupted: checkpoint saved to {}",
                    dir.display()
                ));
            }
            interrupted = true;
            break;
        }
        let t0 = Instant::now();
        let lr = schedule.lr_at(step, base_lr);
        opt.set_lr(lr);
        let mut ctx = StepContext {
            step,
            micro: 0,
            grad_accum: o.grad_accum,
            batch_size: o.batch_size,
            max_steps: o.max_steps,
            policy,
            progress: &progress,
        };
        let before = method.before_step(&ctx)?;
        let mut acc = GradAccumulator::new();
        let mut means = Means::default();
        let mut units = 0usize;
        for micro in 0..o.grad_accum {
            ctx.micro = micro;
            let m = method.micro_step(&ctx)?;
            let loss_v = m
                .loss
                .to_dtype(DType::F64)?
                .mean_all()?
                .to_scalar::<f64>()?;
            if !loss_v.is_finite() {
                bail!(
                    "the loss became {loss_v} at step {} ({}); stopping. Last good checkpoint: {}",
                    step + 1,
                    m.about,
                    last_good(out)
                );
            }
            let grads = diffpref_pipelines::autograd::backward(&(m.loss / o.grad_accum as f64)?)?;
            acc.add_store(params, grads)?;
            means.add("loss", loss_v);
            for (k, v) in m.metrics {
                means.add(k, v);
            }
            units += m.units;
        }
        let mut grads = acc.into_grads()?;
        if let Some(bad) = grads.first_non_finite()? {
            bail!(
                "non-finite gradient for `{bad}` at step {}; stopping. Last good checkpoint: {}",
                step + 1,
                last_good(out)
            );
        }
        let grad_norm = if o.max_grad_norm > 0.0 {
            clip_grad_norm(&mut grads, o.max_grad_norm)?
        } else {
            grads.global_norm()?
        };
        opt.step(params, &grads)?;
        if let Some(e) = ema.as_mut() {
            e.update(params)?;
        }
        let after = method.after_step(&ctx)?;
        let secs = t0.elapsed().as_secs_f64();
        let mut values: Vec<(&str, f64)> = means.means().collect();
        values.extend(before.iter().chain(&after).copied());
        values.push(("grad_norm", grad_norm));
        values.push(("lr", lr));
        values.push((unit.as_str(), units as f64 / secs.max(1e-9)));
        values.push(("step_s", secs));
        metrics.log(step + 1, &values)?;
        let loss = values[0].1;
        let headline = method
            .headline_metric()
            .and_then(|h| values.iter().find(|(k, _)| *k == h).map(|(k, v)| (*k, *v)));
        progress.update(step + 1, loss, headline, lr);
        last = values.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        done_steps = step + 1;
        let done = step + 1 == o.max_steps;
        if settings.checkpoints
            && ((settings.log.checkpoint_every > 0
                && (step + 1) % settings.log.checkpoint_every == 0)
                || done)
        {
            save(step + 1, &opt, &ema, &*method)?;
        }
        if !hooks.is_empty() {
            let model = method
                .model()
                .context("[validation] / [eval] need a method with a text-to-image model")?;
            if let Some(v) = &hooks.validation {
                v.after_step(model, policy, step + 1, done, &mut metrics)?;
            }
            if let Some(e) = &hooks.evaluation {
                e.after_step(model, policy, step + 1, done, &mut metrics, &progress)?;
            }
        }
    }
    progress.finish();
    if let Some(e) = ema.as_ref() {
        e.copy_to(params)?;
    }
    Ok(RunOutcome {
        start_step: start,
        steps: done_steps,
        interrupted,
        last,
        metrics: metrics_path,
    })
}
