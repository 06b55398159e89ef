//! What the training loop does besides training, for every method with a text-to-image model: held-out
//! evaluation before, during and after training (`[eval]`, see [`crate::eval`]) and validation grids
//! (`[validation]`).

use crate::engine::config::{EvalConfig, ValidationConfig};
use crate::engine::policy::{Policy, Weights};
use crate::eval::{
    compare, comparison_grid, fmt_ci, per_prompt, read_prompts, sample_and_score, Comparison,
    SampleOptions, Samples,
};
use crate::train::metrics::{MetricsWriter, TrainProgress};
use anyhow::{Context, Result};
use candle_core::Device;
use diffpref_pipelines::loading::StableDiffusion;
use diffpref_pipelines::pipeline::{seeded_noise, GenerateOptions, Pipeline};
use diffpref_rewards::Reward;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The held-out evaluation of a finished run.
#[derive(Clone, Debug, Serialize)]
pub struct EvalOutcome {
    pub comparison: Comparison,
    pub reward: String,
    pub prompts: usize,
    pub samples_per_prompt: usize,
    /// `eval.json` and `before_after.png`.
    pub report: PathBuf,
    pub grid: PathBuf,
}

/// `[eval]`: the held-out prompts, sampling options and reward (the judge), and the base model's samples once
/// drawn.
pub struct Evaluation {
    cfg: EvalConfig,
    prompts: Vec<String>,
    opts: SampleOptions,
    reward: Box<dyn Reward>,
    progress: bool,
    base: Option<Samples>,
}

impl Evaluation {
    /// Loads the prompts and the reward of `[eval]` (`None` without `prompts`).
    pub fn new(cfg: &EvalConfig, device: &Device, progress: bool) -> Result<Option<Evaluation>> {
        let Some(p) = &cfg.prompts else {
            return Ok(None);
        };
        Ok(Some(Evaluation {
            prompts: read_prompts(p, cfg.reward.is_shapes()).context("[eval] prompts")?,
            opts: cfg.sample_options(),
            reward: cfg.load_reward(device)?,
            progress,
            cfg: cfg.clone(),
            base: None,
        }))
    }

    pub fn prompts(&self) -> &[String] {
        &self.prompts
    }

    pub fn reward(&self) -> &dyn Reward {
        self.reward.as_ref()
    }

    /// Samples and scores the held-out prompts with `model` as it is.
    pub fn sample(&self, model: &StableDiffusion, what: &str) -> Result<Samples> {
        let n = self.prompts.len() * self.opts.samples_per_prompt;
        let pb = if self.progress {
            crate::train::metrics::count_bar(n, what)
        } else {
            indicatif::ProgressBar::hidden()
        };
        let s = sample_and_score(
            model,
            &self.prompts,
            &self.opts,
            self.reward.as_ref(),
            Some(&pb),
        );
        pb.finish_and_clear();
        s
    }

    /// The base model's samples (drawn once; the same noise is reused for every later evaluation). Logged as
    /// step 0 when the run starts from scratch.
    pub fn before(
        &mut self,
        model: &mut StableDiffusion,
        policy: &Policy,
        metrics: &mut MetricsWriter,
        start_step: u64,
    ) -> Result<()> {
        let s = policy.with_weights(model, Weights::Base, |m| self.sample(m, "eval base"))?;
        if start_step == 0 {
            let r = crate::eval::summarize(&s).reward;
            metrics.log(0, &[("eval_reward", r.mean), ("eval_ci95", r.ci95)])?;
        }
        self.base = Some(s);
        Ok(())
    }

    /// The current weights against the base samples.
    fn compare_current(
        &self,
        model: &mut StableDiffusion,
        policy: &Policy,
        what: &str,
    ) -> Result<(Comparison, Samples)> {
        let base = self
            .base
            .as_ref()
            .context("evaluation: base samples not drawn")?;
        let s = policy.with_weights(model, Weights::Current, |m| self.sample(m, what))?;
        Ok((compare(base, &s)?, s))
    }

    /// After optimizer step `step` (not the last one): an evaluation when `[eval] every` says so.
    pub fn after_step(
        &self,
        model: &mut StableDiffusion,
        policy: &Policy,
        step: u64,
        done: bool,
        metrics: &mut MetricsWriter,
        progress: &TrainProgress,
    ) -> Result<()> {
        if self.cfg.every == 0 || !step.is_multiple_of(self.cfg.every) || done {
            return Ok(());
        }
        let (c, _) = self.compare_current(model, policy, "eval")?;
        metrics.log(step, &c.metrics())?;
        progress.println(format!(
            "step {step}: held-out {} {} (base {})",
            self.reward.name(),
            fmt_ci(&c.model.reward),
            fmt_ci(&c.base.reward)
        ));
        Ok(())
    }

    /// The final evaluation after `steps` steps: logged to the metrics, `eval.json` (every figure, the
    /// settings and `extra`) and `before_after.png` in `out`.
    pub fn finish(
        &self,
        model: &mut StableDiffusion,
        policy: &Policy,
        steps: u64,
        out: &Path,
        metrics: &mut MetricsWriter,
        extra: serde_json::Value,
    ) -> Result<EvalOutcome> {
        let base = self
            .base
            .as_ref()
            .context("evaluation: base samples not drawn")?;
        let (c, after) = self.compare_current(model, policy, "eval tuned")?;
        metrics.log(steps, &c.metrics())?;
        let mut fields = serde_json::json!({
            "steps": steps,
            "reward": self.reward.name(),
            "prompts_file": self.cfg.prompts,
            "prompts": self.prompts.len(),
            "samples_per_prompt": self.opts.samples_per_prompt,
            "seed": self.cfg.seed,
            "sampling_steps": self.cfg.steps,
            "guidance": self.cfg.guidance,
        });
        if let (Some(f), serde_json::Value::Object(e)) = (fields.as_object_mut(), extra) {
            f.extend(e);
        }
        if self.cfg.reward.is_shapes() {
            // The exact reward's terms: what the method moved.
            fields["terms"] = serde_json::to_value(crate::eval::shapes_terms(base, &after)?)?;
        }
        let report = c.report(fields, per_prompt(&[("base", base), ("tuned", &after)]))?;
        let report_path = out.join("eval.json");
        crate::io::write_json(&report_path, &report)?;
        let grid_path = out.join("before_after.png");
        let grid = comparison_grid(
            &[("before", base), ("after", &after)],
            self.cfg.grid_prompts,
            4,
        )?;
        crate::imaging::save_png(&grid, &grid_path)?;
        metrics.image(steps, "eval/before_after", &grid)?;
        Ok(EvalOutcome {
            comparison: c,
            reward: self.reward.name().to_string(),
            prompts: self.prompts.len(),
            samples_per_prompt: self.opts.samples_per_prompt,
            report: report_path,
            grid: grid_path,
        })
    }
}

/// `[validation]`: base vs current on fixed prompts and fixed noise, every `every` steps and at the end, as
/// `validation/step-NNNNNN.png` in the run folder.
pub struct Validation {
    cfg: ValidationConfig,
    dir: PathBuf,
}

impl Validation {
    /// `None` unless `[validation] every` and `prompts` are set.
    pub fn new(cfg: &ValidationConfig, out: &Path) -> Option<Validation> {
        (cfg.every > 0 && !cfg.prompts.is_empty()).then(|| Validation {
            cfg: cfg.clone(),
            dir: out.join("validation"),
        })
    }

    pub fn after_step(
        &self,
        model: &mut StableDiffusion,
        policy: &Policy,
        step: u64,
        done: bool,
        metrics: &mut MetricsWriter,
    ) -> Result<()> {
        if !step.is_multiple_of(self.cfg.every) && !done {
            return Ok(());
        }
        let img = self.grid(model, policy, step)?;
        crate::imaging::save_png(&img, self.dir.join(format!("step-{step:06}.png")))?;
        metrics.image(step, "validation", &img)
    }

    fn grid(
        &self,
        model: &mut StableDiffusion,
        policy: &Policy,
        step: u64,
    ) -> Result<image::RgbImage> {
        let v = &self.cfg;
        let prompts: Vec<&str> = v.prompts.iter().map(|s| s.as_str()).collect();
        let run = |model: &StableDiffusion| -> Result<Vec<image::RgbImage>> {
            let pipe = Pipeline::new(model)?;
            let opts0 = GenerateOptions {
                steps: v.steps,
                guidance_scale: v.guidance,
                seed: v.seed,
                ..Default::default()
            };
            let (lh, lw) = pipe.latent_size(&opts0)?;
            let c = model.unet.config().in_channels;
            let noise = seeded_noise(v.seed, &[1, c, lh, lw], &Device::Cpu)?.repeat((
                prompts.len(),
                1,
                1,
                1,
            ))?;
            let out = pipe.generate(
                &prompts,
                &[],
                &GenerateOptions {
                    init_latents: Some(noise),
                    ..opts0
                },
                None,
            )?;
            crate::imaging::tensor_to_images(&out.images)
        };
        let base = policy.with_weights(model, Weights::Base, run)?;
        let current = policy.with_weights(model, Weights::Current, run)?;
        let rows: Vec<Vec<image::RgbImage>> = base
            .into_iter()
            .zip(current)
            .map(|(a, b)| vec![a, b])
            .collect();
        let labels = vec!["base".to_string(), format!("step {step}")];
        let scale = (256 / rows[0][0].width().max(1)).clamp(1, 8);
        crate::imaging::grid(
            &rows,
            &v.prompts,
            &labels,
            &crate::imaging::GridOptions {
                scale,
                ..Default::default()
            },
        )
    }
}

/// The hooks of a run (either may be absent).
#[derive(Default)]
pub struct Hooks {
    pub evaluation: Option<Evaluation>,
    pub validation: Option<Validation>,
}

impl Hooks {
    pub fn none() -> Self {
        Hooks::default()
    }

    pub fn is_empty(&self) -> bool {
        self.evaluation.is_none() && self.validation.is_none()
    }
}
