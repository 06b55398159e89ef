//! The alignment benchmark behind `diffpref bench align`: the base model against each preference method
//! trained from it, all evaluated on the same held-out prompts and initial noise with the same reward (see
//! [`crate::eval`] for the figures). One row per method, with its training wall time and reward calls; the
//! default setting is the embedded shapes world ([`crate::assets`]).
//!
//! Methods: the Diffusion-DPO loss family (`dpo` = the sigmoid loss, `ipo`, `hinge`, `robust`, `simpo`,
//! `mapo`, `kto`, `sft`), trained as LoRAs by [`crate::methods::pairwise::train`] with the DPO configuration's
//! data, optimizer and budget; and `grpo`, trained by [`crate::methods::grpo::train`] with the GRPO
//! configuration (its own budget: online methods are compared at their own defaults); and `lpo`: a latent
//! reward model trained by [`crate::methods::lrm::train`] with the LRM configuration (into `OUT/lpo-lrm/`),
//! then [`crate::methods::lpo::train`] with the LPO configuration and that LRM (its train time is the sum of
//! both); and `spo`: a step-aware preference model trained by [`crate::methods::spm::train`] with the SPM
//! configuration (into `OUT/spo-spm/`), then [`crate::methods::spo::train`] with the SPO configuration and
//! that SPM (`spo.scorer = "reward"` skips the SPM: the configured reward scores the steps); and `seppo`, trained
//! by [`crate::methods::seppo::train`] with the SePPO configuration (its own budget and data), and `seppo-noflip`,
//! the same without the anchor-based flipper (the paper's ablation); and `adjoint`, trained by
//! [`crate::methods::adjoint::train`] with the Adjoint Matching configuration (its own budget and training
//! reward). Each trains into
//! `OUT/<method>/` (replaced on every run); the evaluation (model, `[eval]`) is the
//! DPO configuration's, and the online configurations must name the same model.

use crate::engine::config::TrainMode;
use crate::eval::{
    compare, comparison_grid, read_prompts, sample_and_score, summarize, SampleOptions, Samples,
};
use crate::methods::adjoint::AdjointConfig;
use crate::methods::dpo::LossKind;
use crate::methods::grpo::GrpoConfig;
use crate::methods::lpo::LpoConfig;
use crate::methods::lrm::LrmConfig;
use crate::methods::pairwise::DpoConfig;
use crate::methods::seppo::SeppoConfig;
use crate::methods::spm::SpmConfig;
use crate::methods::spo::{SpoConfig, SpoScorer};
use crate::output::{Input, OutputDir};
use anyhow::{bail, ensure, Context, Result};
use diffpref_rewards::metrics::MeanCi;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A row's method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlignMethod {
    /// A member of the DPO loss family.
    Pairwise(LossKind),
    Grpo,
    Lpo,
    Spo,
    /// SePPO with its configuration's flipper, or (`seppo-noflip`) the ablation without it.
    /// Adjoint Matching with its configuration's training reward.
    Adjoint,
    Seppo {
        flipper: bool,
    },
}

/// The method of a name (`dpo` is the sigmoid loss).
pub fn method_of(name: &str) -> Result<AlignMethod> {
    match name {
        "grpo" => return Ok(AlignMethod::Grpo),
        "lpo" => return Ok(AlignMethod::Lpo),
        "spo" => return Ok(AlignMethod::Spo),
        "seppo" => return Ok(AlignMethod::Seppo { flipper: true }),
        "seppo-noflip" => return Ok(AlignMethod::Seppo { flipper: false }),
        "adjoint" => return Ok(AlignMethod::Adjoint),
        _ => {}
    }
    let kind = if name == "dpo" { "sigmoid" } else { name };
    serde_json::from_value(serde_json::Value::String(kind.into()))
        .map(AlignMethod::Pairwise)
        .map_err(|_| {
            anyhow::anyhow!(
                "unknown method {name:?}: expected dpo, ipo, hinge, robust, simpo, mapo, kto, sft, grpo, lpo, spo, seppo, seppo-noflip or adjoint"
            )
        })
}

/// The configurations the rows train with.
#[derive(Clone, Debug)]
pub struct AlignConfigs {
    /// The DPO family's run, and the evaluation of every row (model, `[eval]`).
    pub dpo: DpoConfig,
    /// The `grpo` row's run.
    pub grpo: GrpoConfig,
    /// The `lpo` row's LRM and LPO runs (its `lpo.lrm` is replaced by the LRM trained first).
    pub lrm: LrmConfig,
    pub lpo: LpoConfig,
    /// The `spo` row's SPM and SPO runs (its `spo.spm` is replaced by the SPM trained first).
    pub spm: SpmConfig,
    pub spo: SpoConfig,
    /// The `seppo` row's run.
    pub seppo: SeppoConfig,
    /// The `adjoint` row's run.
    pub adjoint: AdjointConfig,
    /// The robustness report (fresh prompt lists × sampling seeds); `lists = 0` skips it.
    pub robustness: Robustness,
    /// Training seeds per method (≥ 1): run `k` trains with every seed of its configurations (the run's, and
    /// the LRM's / SPM's that LPO / SPO train first) plus `k`, and the table adds each method's change over its
    /// seeds ([`SeedSummary`]). The seed moves a short run's result as much as many settings do, so settings are
    /// only compared across several.
    pub train_seeds: usize,
}

/// One row of the table.
#[derive(Clone, Debug, Serialize)]
pub struct AlignRow {
    pub method: String,
    pub reward: MeanCi,
    /// Paired change against the base model (none for the base row).
    pub difference: Option<MeanCi>,
    pub win_rate: Option<f64>,
    pub win_rate_ci95: Option<(f64, f64)>,
    pub diversity: Option<f64>,
    /// Optimizer steps (0 for the base row).
    pub steps: u64,
    pub train_seconds: f64,
    pub eval_seconds: f64,
    /// Images scored by the training reward (online methods).
    pub reward_calls: Option<u64>,
    /// The trained LoRA.
    pub weights: Option<PathBuf>,
    /// The training seed (none for the base row).
    pub seed: Option<u64>,
    /// With a shapes judge: the exact reward's terms against the base row's ([`crate::eval::shapes_terms`]).
    pub terms: Option<Vec<crate::eval::TermChange>>,
}

/// A method's result over its training seeds (`--train-seeds`): the change of each seed's LoRA on the held-out
/// prompts (and, with fresh lists, pooled over them), their mean, their standard deviation across seeds (the
/// seed noise) and the Student-t 95% interval of the mean over seeds: the interval a comparison of settings
/// must clear, wider than any one row's interval, which only counts the judge's sampling noise.
#[derive(Clone, Debug, Serialize)]
pub struct SeedSummary {
    pub method: String,
    pub seeds: Vec<u64>,
    /// Held-out change of each seed's LoRA, and their mean ± t-interval over seeds.
    pub changes: Vec<f64>,
    pub change: MeanCi,
    /// With fresh lists: each seed's pooled fresh-list change, and their mean ± t-interval over seeds.
    pub fresh_changes: Vec<f64>,
    pub fresh_change: Option<MeanCi>,
}

/// How each trained row is checked beyond the held-out list its settings may have been tuned on: on `lists`
/// freshly drawn shapes caption lists of `prompts` captions each (list `i` drawn as `diffpref data prompts
/// --seed 1000+i`, excluding every caption of the held-out list, of each row's training prompts files and of the
/// DPO/SePPO manifests) × `seeds` sampling seeds (`[eval] seed` + 1, + 2, ...), with `[eval]`'s samples per
/// prompt, steps and guidance; base and rows on the same noise in every cell. Only for the shapes reward.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Robustness {
    pub lists: usize,
    pub seeds: usize,
    pub prompts: usize,
}

impl Default for Robustness {
    fn default() -> Self {
        Robustness {
            lists: 0,
            seeds: 2,
            prompts: 48,
        }
    }
}

/// A fresh caption list: its `data prompts` seed and captions.
pub type FreshList = (u64, Vec<String>);

/// One (fresh list, sampling seed) cell of a row.
#[derive(Clone, Debug, Serialize)]
pub struct RobustCell {
    /// The `data prompts` seed of the list.
    pub list_seed: u64,
    pub sample_seed: u64,
    pub base: MeanCi,
    pub change: MeanCi,
    pub win_rate: f64,
}

/// A row's robustness: every cell, and the change pooled over all of their samples.
#[derive(Clone, Debug, Serialize)]
pub struct RobustRow {
    pub method: String,
    pub cells: Vec<RobustCell>,
    pub pooled: MeanCi,
    /// Whether every cell's change is positive beyond its 95% interval.
    pub every_cell_beyond_ci: bool,
    pub diversity_base: Option<f64>,
    pub diversity: Option<f64>,
}

/// The benchmark's result.
#[derive(Clone, Debug, Serialize)]
pub struct AlignReport {
    pub reward: String,
    pub prompts: usize,
    pub samples_per_prompt: usize,
    pub rows: Vec<AlignRow>,
    /// Fresh lists × seeds (empty without `--fresh-lists`).
    pub robustness: Vec<RobustRow>,
    /// Each method over its training seeds (empty with one seed per method).
    pub seed_summaries: Vec<SeedSummary>,
    /// The fresh lists: `(data prompts seed, captions)`.
    pub fresh_lists: Vec<FreshList>,
    /// `align.json` and `grid.png` in the output folder.
    pub report: PathBuf,
    pub grid: PathBuf,
}

/// Runs the benchmark: `cfgs.dpo` gives the model, data, optimizer (its `max_steps` is the DPO family's budget)
/// and `[eval]` (prompts, reward, samples) of every row, `cfgs.grpo` the `grpo` row's run; `methods` the rows
/// after the base row.
pub fn run_align(
    cfgs: &AlignConfigs,
    methods: &[String],
    out: &Path,
    progress: bool,
) -> Result<AlignReport> {
    let cfg = &cfgs.dpo;
    ensure!(
        cfg.run.mode == TrainMode::Lora
            && cfgs.grpo.run.mode == TrainMode::Lora
            && cfgs.lpo.run.mode == TrainMode::Lora
            && cfgs.spo.run.mode == TrainMode::Lora
            && cfgs.seppo.run.mode == TrainMode::Lora
            && cfgs.adjoint.run.mode == TrainMode::Lora,
        "bench align trains LoRAs (mode = \"lora\")"
    );
    ensure!(cfgs.train_seeds >= 1, "--train-seeds must be at least 1");
    let prompts_file = cfg
        .run
        .eval
        .prompts
        .as_ref()
        .context("bench align needs [eval] prompts (the held-out prompts)")?;
    let kinds = methods
        .iter()
        .map(|m| method_of(m))
        .collect::<Result<Vec<_>>>()?;
    // The online rows train their own configurations' model; the rows are all evaluated on the DPO one's.
    for (row, label, model) in [
        (
            kinds.contains(&AlignMethod::Grpo),
            "GRPO",
            &cfgs.grpo.run.model,
        ),
        (
            kinds.contains(&AlignMethod::Lpo),
            "LPO",
            &cfgs.lpo.run.model,
        ),
        (
            kinds.contains(&AlignMethod::Spo),
            "SPO",
            &cfgs.spo.run.model,
        ),
        (
            kinds.iter().any(|k| matches!(k, AlignMethod::Seppo { .. })),
            "SePPO",
            &cfgs.seppo.run.model,
        ),
        (
            kinds.contains(&AlignMethod::Adjoint),
            "Adjoint Matching",
            &cfgs.adjoint.run.model,
        ),
    ] {
        ensure!(
            !row || *model == cfg.run.model,
            "bench align: the {label} configuration trains {model} but the rows are evaluated on {}",
            cfg.run.model
        );
    }
    let mut inputs = vec![
        Input::new("DPO model", Path::new(&cfg.run.model)),
        Input::new("GRPO model", Path::new(&cfgs.grpo.run.model)),
    ];
    for (what, p) in [
        ("[eval] prompts file", &cfg.run.eval.prompts),
        ("[data] manifest", &cfg.data.manifest),
        ("[grpo] prompts file", &cfgs.grpo.grpo.prompts),
        ("[lpo] prompts file", &cfgs.lpo.lpo.prompts),
        ("LRM [data] manifest", &cfgs.lrm.data.manifest),
        ("[spo] prompts file", &cfgs.spo.spo.prompts),
        ("SPM [data] manifest", &cfgs.spm.data.manifest),
        ("SePPO [data] manifest", &cfgs.seppo.data.manifest),
        ("[seppo] prompts file", &cfgs.seppo.seppo.prompts),
        ("[adjoint] prompts file", &cfgs.adjoint.adjoint.prompts),
    ] {
        if let Some(p) = p {
            inputs.push(Input::new(what, p));
        }
    }
    let guard = OutputDir {
        path: out,
        key: "--out",
        command: "bench align",
        legacy: &["align.json"],
    };
    guard.check(&inputs, cfg.run.overwrite)?;
    guard.create()?;

    // Train every method first (each run loads its own model), each with every training seed.
    let mut trained: Vec<Trained> = Vec::with_capacity(methods.len() * cfgs.train_seeds);
    for (method, kind) in methods.iter().zip(kinds) {
        for k in 0..cfgs.train_seeds as u64 {
            // One seed: the row and its folder are the method's name; several: `dpo@seed1`, ...
            let seed = match kind {
                AlignMethod::Pairwise(_) => cfg.run.seed,
                AlignMethod::Grpo => cfgs.grpo.run.seed,
                AlignMethod::Lpo => cfgs.lpo.run.seed,
                AlignMethod::Spo => cfgs.spo.run.seed,
                AlignMethod::Seppo { .. } => cfgs.seppo.run.seed,
                AlignMethod::Adjoint => cfgs.adjoint.run.seed,
            } + k;
            let name = if cfgs.train_seeds == 1 {
                method.clone()
            } else {
                format!("{method}@seed{seed}")
            };
            let name = &name;
            let dir = out.join(name);
            clear(&dir)?;
            let quiet = |r: &mut crate::engine::RunConfig| {
                r.output_dir = Some(dir.clone());
                r.seed += k;
                r.resume = false;
                r.eval.prompts = None;
                r.validation.every = 0;
                r.log.progress = progress;
            };
            let t0 = Instant::now();
            let s = match kind {
                AlignMethod::Pairwise(kind) => {
                    let mut c = cfg.clone();
                    c.loss.kind = kind;
                    // The unconditional anchor holds the base model's prediction, so it needs a reference: the
                    // reference-free methods (simpo, mapo, sft) train without it.
                    if !kind.needs_reference() {
                        c.loss.uncond_anchor = 0.0;
                    }
                    quiet(&mut c.run);
                    crate::methods::pairwise::train(&c, None)
                }
                AlignMethod::Grpo => {
                    let mut c = cfgs.grpo.clone();
                    quiet(&mut c.run);
                    crate::methods::grpo::train(&c, None)
                }
                AlignMethod::Lpo => {
                    let lrm_dir = out.join(format!("{name}-lrm"));
                    clear(&lrm_dir)?;
                    let mut l = cfgs.lrm.clone();
                    l.output_dir = Some(lrm_dir);
                    l.seed += k;
                    l.resume = false;
                    l.log.progress = progress;
                    let lrm = crate::methods::lrm::train(&l, None).context("training the LRM")?;
                    ensure!(!lrm.interrupted, "training the LRM was interrupted");
                    let mut c = cfgs.lpo.clone();
                    c.lpo.lrm = Some(lrm.weights);
                    quiet(&mut c.run);
                    crate::methods::lpo::train(&c, None)
                }
                AlignMethod::Spo => {
                    let mut c = cfgs.spo.clone();
                    if c.spo.scorer == SpoScorer::Spm {
                        let spm_dir = out.join(format!("{name}-spm"));
                        clear(&spm_dir)?;
                        let mut m = cfgs.spm.clone();
                        m.output_dir = Some(spm_dir);
                        m.seed += k;
                        m.resume = false;
                        m.log.progress = progress;
                        let spm =
                            crate::methods::spm::train(&m, None).context("training the SPM")?;
                        ensure!(!spm.interrupted, "training the SPM was interrupted");
                        c.spo.spm = Some(spm.weights);
                    }
                    quiet(&mut c.run);
                    crate::methods::spo::train(&c, None)
                }
                AlignMethod::Seppo { flipper } => {
                    let mut c = cfgs.seppo.clone();
                    if !flipper {
                        c.seppo.flipper = crate::methods::seppo::Flipper::Off;
                    }
                    quiet(&mut c.run);
                    crate::methods::seppo::train(&c, None)
                }
                AlignMethod::Adjoint => {
                    let mut c = cfgs.adjoint.clone();
                    quiet(&mut c.run);
                    crate::methods::adjoint::train(&c, None)
                }
            }
            .with_context(|| format!("training {name}"))?;
            if s.interrupted {
                bail!("training {name} was interrupted");
            }
            let calls = s
                .last_metric("reward_calls")
                .or_else(|| s.last_metric("scorer_calls"))
                .map(|c| c as u64);
            trained.push(Trained {
                name: name.clone(),
                method: method.clone(),
                seed,
                weights: s.weights,
                steps: s.steps,
                train_seconds: t0.elapsed().as_secs_f64(),
                calls,
            });
        }
    }

    // Evaluate the base model and each LoRA on the same prompts and noise.
    let prompts =
        read_prompts(prompts_file, cfg.run.eval.reward.is_shapes()).context("[eval] prompts")?;
    let device = cfg.run.device.device()?;
    let reward = cfg.run.eval.load_reward(&device)?;
    let (model, _) = crate::engine::run::load_model(&cfg.run)?;
    let opts: SampleOptions = cfg.run.eval.sample_options();
    let n = prompts.len() * opts.samples_per_prompt;
    let sample = |what: &str| -> Result<(Samples, f64)> {
        let pb = if progress {
            crate::train::metrics::count_bar(n, what)
        } else {
            indicatif::ProgressBar::hidden()
        };
        let t0 = Instant::now();
        let s = sample_and_score(&model, &prompts, &opts, reward.as_ref(), Some(&pb))?;
        pb.finish_and_clear();
        Ok((s, t0.elapsed().as_secs_f64()))
    };
    let (base, base_s) = sample("eval base")?;
    let b = summarize(&base);
    let mut rows = vec![AlignRow {
        method: "base".into(),
        reward: b.reward,
        difference: None,
        win_rate: None,
        win_rate_ci95: None,
        diversity: b.diversity,
        steps: 0,
        train_seconds: 0.0,
        eval_seconds: base_s,
        reward_calls: None,
        weights: None,
        seed: None,
        terms: None,
    }];
    let mut sets = Vec::new();
    for t in &trained {
        let lora = crate::train::lora::LoraSet::load_into(&model.unet, &t.weights, 1.0)
            .with_context(|| format!("loading {}", t.weights.display()))?;
        let (s, eval_s) = sample(&format!("eval {}", t.name))?;
        lora.detach_from(&model.unet);
        let c = compare(&base, &s)?;
        let terms = if cfg.run.eval.reward.is_shapes() {
            Some(crate::eval::shapes_terms(&base, &s)?)
        } else {
            None
        };
        rows.push(AlignRow {
            method: t.name.clone(),
            reward: c.model.reward,
            difference: Some(c.difference),
            win_rate: Some(c.win_rate),
            win_rate_ci95: Some(c.win_rate_ci95),
            diversity: c.model.diversity,
            steps: t.steps,
            train_seconds: t.train_seconds,
            eval_seconds: eval_s,
            reward_calls: t.calls,
            weights: Some(t.weights.clone()),
            seed: Some(t.seed),
            terms,
        });
        sets.push((t.name.clone(), s));
    }
    let (robustness, fresh_lists) = if cfgs.robustness.lists > 0 {
        ensure!(
            cfg.run.eval.reward.is_shapes(),
            "--fresh-lists draws shapes-world captions: it needs the shapes reward"
        );
        let taken = training_captions(cfgs, &prompts)?;
        robustness_rows(
            &model,
            reward.as_ref(),
            &opts,
            &cfgs.robustness,
            cfg.run.eval.seed,
            taken,
            &trained,
            progress,
        )?
    } else {
        (Vec::new(), Vec::new())
    };
    let seed_summaries = if cfgs.train_seeds > 1 {
        seed_summaries(methods, &trained, &rows, &robustness)
    } else {
        Vec::new()
    };
    let mut grid_sets: Vec<(&str, &Samples)> = vec![("base", &base)];
    grid_sets.extend(sets.iter().map(|(n, s)| (n.as_str(), s)));
    let grid = comparison_grid(&grid_sets, cfg.run.eval.grid_prompts, 2)?;
    let grid_path = out.join("grid.png");
    crate::imaging::save_png(&grid, &grid_path)?;
    let report_path = out.join("align.json");
    let report = AlignReport {
        reward: reward.name().to_string(),
        prompts: prompts.len(),
        samples_per_prompt: opts.samples_per_prompt,
        rows,
        robustness,
        seed_summaries,
        fresh_lists,
        report: report_path.clone(),
        grid: grid_path,
    };
    let doc = serde_json::json!({
        "model": cfg.run.model,
        "data": cfg.data.manifest,
        "prompts_file": prompts_file,
        "budget_steps": cfg.run.optim.max_steps,
        "grpo_steps": cfgs.grpo.run.optim.max_steps,
        "lpo_steps": cfgs.lpo.run.optim.max_steps,
        "lrm_steps": cfgs.lrm.optim.max_steps,
        "spo_steps": cfgs.spo.run.optim.max_steps,
        "spm_steps": cfgs.spm.optim.max_steps,
        "seppo_steps": cfgs.seppo.run.optim.max_steps,
        "adjoint_steps": cfgs.adjoint.run.optim.max_steps,
        "train_seeds": cfgs.train_seeds,
        "batch_size": cfg.run.optim.batch_size,
        "lr": cfg.run.optim.lr,
        "beta": cfg.loss.beta,
        "report": &report,
    });
    crate::io::write_json(&report_path, &doc)?;
    Ok(report)
}

/// Every caption a row trains on or is judged on: the held-out list, the prompts files of the online rows and
/// the prompts of the DPO and SePPO manifests.
fn training_captions(
    cfgs: &AlignConfigs,
    held_out: &[String],
) -> Result<std::collections::HashSet<String>> {
    let mut taken: std::collections::HashSet<String> = held_out.iter().cloned().collect();
    for p in [
        &cfgs.grpo.grpo.prompts,
        &cfgs.lpo.lpo.prompts,
        &cfgs.spo.spo.prompts,
        &cfgs.seppo.seppo.prompts,
        &cfgs.adjoint.adjoint.prompts,
    ]
    .into_iter()
    .flatten()
    {
        taken.extend(read_prompts(p, false).with_context(|| format!("{}", p.display()))?);
    }
    for m in [&cfgs.dpo.data.manifest, &cfgs.seppo.data.manifest]
        .into_iter()
        .flatten()
    {
        let text =
            std::fs::read_to_string(m).with_context(|| format!("reading {}", m.display()))?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("{}:{}", m.display(), i + 1))?;
            if let Some(p) = v.get("prompt").and_then(|p| p.as_str()) {
                taken.insert(p.to_string());
            }
        }
    }
    Ok(taken)
}

/// Removes `dir` (a row's folder from an earlier run of the benchmark) if it exists.
fn clear(dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    Ok(())
}

/// A trained LoRA of a row.
struct Trained {
    /// The row's name (`dpo`, or `dpo@seed1` with several training seeds).
    name: String,
    /// The method's name (`dpo`).
    method: String,
    seed: u64,
    weights: PathBuf,
    steps: u64,
    train_seconds: f64,
    calls: Option<u64>,
}

/// Each method's changes over its training seeds; `rows` are the table's (the base row first, then one per
/// trained LoRA in `trained`'s order), `robustness` empty or one per trained LoRA.
fn seed_summaries(
    methods: &[String],
    trained: &[Trained],
    rows: &[AlignRow],
    robustness: &[RobustRow],
) -> Vec<SeedSummary> {
    methods
        .iter()
        .map(|m| {
            let of: Vec<usize> = (0..trained.len())
                .filter(|&i| &trained[i].method == m)
                .collect();
            let changes: Vec<f64> = of
                .iter()
                .map(|&i| rows[i + 1].difference.map_or(f64::NAN, |d| d.mean))
                .collect();
            let fresh_changes: Vec<f64> = of
                .iter()
                .filter_map(|&i| robustness.get(i).map(|r| r.pooled.mean))
                .collect();
            SeedSummary {
                method: m.clone(),
                seeds: of.iter().map(|&i| trained[i].seed).collect(),
                change: MeanCi::of(&changes),
                changes,
                fresh_change: (!fresh_changes.is_empty()).then(|| MeanCi::of(&fresh_changes)),
                fresh_changes,
            }
        })
        .collect()
}

/// The robustness cells of every trained row (see [`Robustness`]).
#[allow(clippy::too_many_arguments)]
fn robustness_rows(
    model: &diffpref_pipelines::loading::StableDiffusion,
    reward: &dyn diffpref_rewards::Reward,
    opts: &SampleOptions,
    r: &Robustness,
    eval_seed: u64,
    mut taken: std::collections::HashSet<String>,
    trained: &[Trained],
    progress: bool,
) -> Result<(Vec<RobustRow>, Vec<FreshList>)> {
    ensure!(
        r.seeds > 0 && r.prompts > 0,
        "--fresh-seeds and --fresh-prompts must be at least 1"
    );
    let mut cells: Vec<Vec<RobustCell>> = vec![Vec::new(); trained.len()];
    let mut diffs: Vec<Vec<f64>> = vec![Vec::new(); trained.len()];
    let mut div: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); trained.len()];
    let mut lists = Vec::with_capacity(r.lists);
    for i in 0..r.lists {
        let list_seed = 1000 + i as u64;
        let prompts = crate::data::shapes::fresh_captions(list_seed, r.prompts, 3, &mut taken)?;
        lists.push((list_seed, prompts.clone()));
        for j in 0..r.seeds {
            let sample_seed = eval_seed + 1 + j as u64;
            let o = SampleOptions {
                seed: sample_seed,
                ..opts.clone()
            };
            let n = prompts.len() * o.samples_per_prompt;
            let sample = |what: String| -> Result<Samples> {
                let pb = if progress {
                    crate::train::metrics::count_bar(n, &what)
                } else {
                    indicatif::ProgressBar::hidden()
                };
                let s = sample_and_score(model, &prompts, &o, reward, Some(&pb))?;
                pb.finish_and_clear();
                Ok(s)
            };
            let base = sample(format!("fresh list {list_seed} seed {sample_seed}: base"))?;
            for (k, t) in trained.iter().enumerate() {
                let lora = crate::train::lora::LoraSet::load_into(&model.unet, &t.weights, 1.0)
                    .with_context(|| format!("loading {}", t.weights.display()))?;
                let s = sample(format!(
                    "fresh list {list_seed} seed {sample_seed}: {}",
                    t.name
                ));
                lora.detach_from(&model.unet);
                let s = s?;
                let c = compare(&base, &s)?;
                diffs[k].extend(s.rewards.iter().zip(&base.rewards).map(|(m, b)| m - b));
                if let (Some(a), Some(b)) = (c.base.diversity, c.model.diversity) {
                    div[k].0.push(a);
                    div[k].1.push(b);
                }
                cells[k].push(RobustCell {
                    list_seed,
                    sample_seed,
                    base: c.base.reward,
                    change: c.difference,
                    win_rate: c.win_rate,
                });
            }
        }
    }
    let avg = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let rows = trained
        .iter()
        .zip(cells)
        .zip(diffs)
        .zip(div)
        .map(|(((t, cells), d), (db, dm))| RobustRow {
            method: t.name.clone(),
            every_cell_beyond_ci: cells.iter().all(|c| c.change.mean - c.change.ci95 > 0.0),
            cells,
            pooled: MeanCi::of(&d),
            diversity_base: avg(&db),
            diversity: avg(&dm),
        })
        .collect();
    Ok((rows, lists))
}

/// The table of a report.
pub fn format_table(r: &AlignReport) -> String {
    let mut s = format!(
        "{} reward on {} held-out prompts x {} samples (same noise for every row); ± = 95% CI\n",
        r.reward, r.prompts, r.samples_per_prompt
    );
    s.push_str(&format!(
        "{:<12} {:>6} {:>18} {:>18} {:>22} {:>9} {:>9} {:>8} {:>12}\n",
        "method",
        "steps",
        "reward",
        "change",
        "win rate vs base",
        "diversity",
        "train s",
        "eval s",
        "reward calls"
    ));
    for row in &r.rows {
        let change = row
            .difference
            .map(|d| format!("{:+.4} ± {:.4}", d.mean, d.ci95))
            .unwrap_or_else(|| "-".into());
        let win = match (row.win_rate, row.win_rate_ci95) {
            (Some(w), Some((lo, hi))) => format!("{w:.3} [{lo:.3}, {hi:.3}]"),
            _ => "-".into(),
        };
        let div = row
            .diversity
            .map(|d| format!("{d:.4}"))
            .unwrap_or_else(|| "-".into());
        let calls = row
            .reward_calls
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            "{:<12} {:>6} {:>18} {:>18} {:>22} {:>9} {:>9.1} {:>8.1} {:>12}\n",
            row.method,
            row.steps,
            format!("{:.4} ± {:.4}", row.reward.mean, row.reward.ci95),
            change,
            win,
            div,
            row.train_seconds,
            row.eval_seconds,
            calls
        ));
    }
    if !r.seed_summaries.is_empty() {
        s.push_str(
            "\nover training seeds: mean change ± 95% t-interval across seeds (std = the seed noise)\n",
        );
        for m in &r.seed_summaries {
            let list = |xs: &[f64]| {
                xs.iter()
                    .map(|x| format!("{x:+.4}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            s.push_str(&format!(
                "{:<12} seeds {:?}: held-out {:+.4} ± {:.4} (std {:.4}; {})",
                m.method,
                m.seeds,
                m.change.mean,
                m.change.ci95,
                m.change.std,
                list(&m.changes)
            ));
            if let Some(f) = &m.fresh_change {
                s.push_str(&format!(
                    "; fresh lists pooled {:+.4} ± {:.4} (std {:.4}; {})",
                    f.mean,
                    f.ci95,
                    f.std,
                    list(&m.fresh_changes)
                ));
            }
            s.push('\n');
        }
    }
    if !r.robustness.is_empty() {
        s.push_str(
            "\nfresh prompt lists (never trained or tuned on) x sampling seeds: paired change ± 95% CI\n",
        );
        for row in &r.robustness {
            let cells: Vec<String> = row
                .cells
                .iter()
                .map(|c| {
                    format!(
                        "list {} seed {}: {:+.4} ± {:.4}",
                        c.list_seed, c.sample_seed, c.change.mean, c.change.ci95
                    )
                })
                .collect();
            s.push_str(&format!(
                "{:<12} pooled {:+.4} ± {:.4}; every cell beyond its CI: {}; diversity {} -> {}\n  {}\n",
                row.method,
                row.pooled.mean,
                row.pooled.ci95,
                if row.every_cell_beyond_ci { "yes" } else { "no" },
                row.diversity_base
                    .map(|d| format!("{d:.4}"))
                    .unwrap_or_else(|| "-".into()),
                row.diversity
                    .map(|d| format!("{d:.4}"))
                    .unwrap_or_else(|| "-".into()),
                cells.join("; ")
            ));
        }
    }
    s
}
