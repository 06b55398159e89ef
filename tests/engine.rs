//! The training engine on a toy method and on the tiny UNet: accumulation and metrics, the NaN stop naming the
//! last good checkpoint, Ctrl-C then resume, and the policy's reference scopes (adapters off, snapshot).

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use diffpref::engine::config::{LogConfig, OptimConfig};
use diffpref::engine::hooks::Hooks;
use diffpref::engine::method::{Method, MicroStep, StepContext};
use diffpref::engine::policy::{Policy, Weights};
use diffpref::engine::trainer::{train, TrainerSettings};
use diffpref::pipelines::models::unet::UNet2DConditionModel;
use diffpref::train::checkpoint::StopFlag;
use diffpref::train::lora::{LoraConfig, LoraFormat};
use diffpref::train::rng::Rng;
use std::path::{Path, PathBuf};

/// Regression of a 4-vector onto targets drawn from a resumable stream; NaN from step `nan_at` on; Ctrl-C
/// pressed after step `stop_after`.
struct Toy {
    w: Var,
    rng: Rng,
    nan_at: Option<u64>,
    stop_after: Option<(u64, StopFlag)>,
    seen: Vec<(u64, usize)>,
}

impl Method for Toy {
    fn name(&self) -> &str {
        "toy"
    }

    fn micro_step(&mut self, ctx: &StepContext<'_>) -> Result<MicroStep> {
        self.seen.push((ctx.step, ctx.micro));
        let target = self.rng.normal_tensor(&[4], &Device::Cpu)?;
        let mut loss = (self.w.as_tensor() - &target)?.sqr()?.mean_all()?;
        if self.nan_at.is_some_and(|s| ctx.step + 1 >= s) {
            loss = (loss * f64::NAN)?;
        }
        Ok(MicroStep {
            loss,
            metrics: vec![("micro", ctx.micro as f64)],
            units: ctx.batch_size,
            about: format!("toy micro-batch {}", ctx.micro),
        })
    }

    fn after_step(&mut self, ctx: &StepContext<'_>) -> Result<Vec<(&'static str, f64)>> {
        if let Some((s, flag)) = &self.stop_after {
            if ctx.step + 1 == *s {
                flag.set();
            }
        }
        Ok(vec![("after", 1.0)])
    }

    fn state(&self) -> Result<serde_json::Value> {
        Ok(serde_json::to_value(&self.rng)?)
    }

    fn load_state(&mut self, state: serde_json::Value) -> Result<()> {
        self.rng = serde_json::from_value(state)?;
        Ok(())
    }
}

fn toy() -> (Toy, Policy) {
    let w = Var::zeros(4, DType::F32, &Device::Cpu).unwrap();
    let policy = Policy::without_reference(vec![("w".into(), w.clone())]);
    (
        Toy {
            w,
            rng: Rng::new(1),
            nan_at: None,
            stop_after: None,
            seen: Vec::new(),
        },
        policy,
    )
}

fn settings(dir: &Path, steps: u64, accum: usize) -> TrainerSettings {
    TrainerSettings {
        optim: OptimConfig {
            lr: 0.1,
            grad_accum: accum,
            max_steps: steps,
            ..Default::default()
        },
        log: LogConfig {
            checkpoint_every: 2,
            keep_last: 2,
            progress: false,
            ..Default::default()
        },
        output_dir: dir.to_path_buf(),
        resume: true,
        checkpoints: true,
        config: serde_json::json!({"toy": true}),
    }
}

fn records(p: &Path) -> Vec<serde_json::Value> {
    diffpref::train::metrics::read_metrics(p).unwrap()
}

/// What TensorBoard shows for the run folder (every event file, checksums checked, resumes purged) is exactly
/// the finite numbers of `metrics.jsonl`, tag by tag and in order.
fn assert_tensorboard_matches(metrics: &Path) {
    let tb = diffpref::train::tensorboard::read_scalars(metrics.parent().unwrap()).unwrap();
    let mut want: std::collections::BTreeMap<String, Vec<(i64, f32)>> = Default::default();
    for r in records(metrics) {
        let step = r["step"].as_i64().unwrap();
        for (k, v) in r.as_object().unwrap() {
            if let (true, Some(x)) = (k != "step", v.as_f64()) {
                want.entry(k.clone()).or_default().push((step, x as f32));
            }
        }
    }
    assert!(want.contains_key("loss"));
    assert_eq!(tb, want);
}

#[test]
fn accumulation_metrics_and_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut m, policy) = toy();
    let out = train(
        &settings(tmp.path(), 5, 3),
        &policy,
        &mut m,
        &mut Hooks::none(),
        None,
    )
    .unwrap();
    assert_eq!((out.start_step, out.steps, out.interrupted), (0, 5, false));
    // Three micro-batches per step, in order.
    assert_eq!(m.seen.len(), 15);
    assert_eq!(&m.seen[..4], &[(0, 0), (0, 1), (0, 2), (1, 0)]);
    let r = records(&out.metrics);
    assert_eq!(r.len(), 5);
    // The method's figures are micro-batch means, in the method's order after the loss; then the step's.
    let line = std::fs::read_to_string(&out.metrics).unwrap();
    let first = line.lines().next().unwrap();
    let order: Vec<usize> = [
        "step",
        "loss",
        "micro",
        "after",
        "grad_norm",
        "lr",
        "samples_per_s",
        "step_s",
    ]
    .iter()
    .map(|k| {
        first
            .find(&format!("\"{k}\":"))
            .unwrap_or_else(|| panic!("{k} in {first}"))
    })
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{first}");
    assert_eq!(r[0]["micro"], 1.0);
    // Checkpoints every 2 steps and at the end, the last two kept.
    let cps: Vec<u64> = diffpref::train::checkpoint::list(tmp.path())
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(cps, vec![4, 5]);
    assert!(out.last_metric("loss").unwrap() < r[0]["loss"].as_f64().unwrap());
    assert_tensorboard_matches(&out.metrics);
}

#[test]
fn a_non_finite_loss_stops_naming_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut m, policy) = toy();
    m.nan_at = Some(4);
    let err = train(
        &settings(tmp.path(), 6, 1),
        &policy,
        &mut m,
        &mut Hooks::none(),
        None,
    )
    .unwrap_err();
    let e = format!("{err:#}");
    assert!(
        e.contains("step 4") && e.contains("toy micro-batch 0"),
        "{e}"
    );
    assert!(e.contains("checkpoint-2"), "{e}");

    // Resumed from checkpoint-2 (a fresh process without the fault): step 3, logged before the stop, is logged
    // again; metrics.jsonl drops the old line and TensorBoard the old event (the new file's SessionLog START).
    let (mut m, policy) = toy();
    let out = train(
        &settings(tmp.path(), 6, 1),
        &policy,
        &mut m,
        &mut Hooks::none(),
        None,
    )
    .unwrap();
    assert_eq!((out.start_step, out.steps), (2, 6));
    let steps: Vec<u64> = records(&out.metrics)
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(
        diffpref::train::tensorboard::event_files(tmp.path())
            .unwrap()
            .len(),
        2
    );
    assert_tensorboard_matches(&out.metrics);
}

#[test]
fn ctrl_c_checkpoints_and_the_resumed_run_is_identical() {
    ctrl_c_resume(0.0);
}

/// With an EMA of the weights (saved in the checkpoint, copied into the weights at the end), the resumed run
/// still ends bit-identical, and differs from the run without EMA.
#[test]
fn ctrl_c_resume_keeps_the_ema() {
    let with = ctrl_c_resume(0.5);
    let without = ctrl_c_resume(0.0);
    assert_ne!(with, without);
}

/// A straight 5-step run against one stopped by Ctrl-C after step 3 and resumed in a fresh process (2
/// micro-batches per step, EMA decay `ema`): the final weights, returned.
fn ctrl_c_resume(ema: f64) -> Vec<f32> {
    let settings = |dir: &Path| {
        let mut s = settings(dir, 5, 2);
        s.optim.ema_decay = ema;
        s
    };
    let tmp = tempfile::tempdir().unwrap();
    let (mut m, policy) = toy();
    train(
        &settings(&tmp.path().join("a")),
        &policy,
        &mut m,
        &mut Hooks::none(),
        None,
    )
    .unwrap();
    let want = m.w.as_tensor().to_vec1::<f32>().unwrap();

    let dir = tmp.path().join("b");
    let (mut m, policy) = toy();
    let flag = StopFlag::new();
    m.stop_after = Some((3, flag.clone()));
    let out = train(
        &settings(&dir),
        &policy,
        &mut m,
        &mut Hooks::none(),
        Some(flag),
    )
    .unwrap();
    assert!(out.interrupted);
    assert_eq!(out.steps, 3);
    assert!(dir.join("checkpoint-3").join("state.json").exists());
    // A fresh process: new weights and method, resumed from checkpoint-3.
    let (mut m, policy) = toy();
    let out = train(&settings(&dir), &policy, &mut m, &mut Hooks::none(), None).unwrap();
    assert_eq!((out.start_step, out.steps), (3, 5));
    let got = m.w.as_tensor().to_vec1::<f32>().unwrap();
    assert_eq!(got, want);
    let steps: Vec<u64> = records(&out.metrics)
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5]);
    got
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn unet() -> UNet2DConditionModel {
    UNet2DConditionModel::load(
        fixtures().join("tiny-sd/unet"),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

fn forward(u: &UNet2DConditionModel) -> Tensor {
    let x = Rng::new(1)
        .normal_tensor(&[1, 4, 8, 8], &Device::Cpu)
        .unwrap();
    let c = Rng::new(2)
        .normal_tensor(&[1, 5, 32], &Device::Cpu)
        .unwrap();
    let t = Tensor::new(&[500i64], &Device::Cpu).unwrap();
    u.forward(&x, &t, &c, None).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Sets every LoRA B of `policy` to seeded values (as after training).
fn perturb(policy: &Policy, seed: u64) {
    let mut rng = Rng::new(seed);
    for (n, v) in policy.params() {
        if n.ends_with("lora_B.weight") {
            v.set(&(rng.normal_tensor(v.dims(), &Device::Cpu).unwrap() * 0.1).unwrap())
                .unwrap();
        }
    }
}

#[test]
fn reference_scopes_switch_adapters_and_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let u = unet();
    let base = forward(&u);
    let policy = Policy::lora(&u, &LoraConfig::default(), 1, &Device::Cpu).unwrap();
    // A snapshot: the adapters at one point of training.
    perturb(&policy, 7);
    let snap_out = forward(&u);
    let snap = tmp.path().join("snapshot.safetensors");
    policy
        .lora_set()
        .unwrap()
        .save(&snap, LoraFormat::Peft)
        .unwrap();
    // Training goes on.
    perturb(&policy, 8);
    let current = forward(&u);
    assert!(max_diff(&current, &base) > 1e-3 && max_diff(&current, &snap_out) > 1e-3);

    // Adapters off inside the scope, back on after it.
    {
        let r = policy.reference().unwrap();
        let scope = r.scope(&u);
        assert_eq!(max_diff(&forward(scope.unet()), &base), 0.0);
    }
    assert_eq!(max_diff(&forward(&u), &current), 0.0);

    // The snapshot as the reference: the earlier weights inside the scope, the trained ones outside.
    policy.set_reference_snapshot(&u, Some(&snap)).unwrap();
    assert_eq!(policy.reference_snapshot(), Some(snap.clone()));
    {
        let r = policy.reference().unwrap();
        let scope = r.scope(&u);
        assert!(max_diff(&forward(scope.unet()), &snap_out) < 1e-5);
    }
    assert_eq!(max_diff(&forward(&u), &current), 0.0);
    // Back to the base model as the reference; the trained adapters still train.
    policy.set_reference_snapshot(&u, None).unwrap();
    {
        let r = policy.reference().unwrap();
        let scope = r.scope(&u);
        assert_eq!(max_diff(&forward(scope.unet()), &base), 0.0);
    }
    let out = forward(&u);
    assert_eq!(max_diff(&out, &current), 0.0);
    let grads = out.sum_all().unwrap().backward().unwrap();
    assert!(policy
        .params()
        .iter()
        .all(|(_, v)| grads.get(v.as_tensor()).is_some()));
}

#[test]
fn with_weights_samples_base_current_and_reference_graph_free() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = diffpref::pipelines::loading::StableDiffusion::load(
        &fixtures().join("tiny-sd"),
        &Default::default(),
    )
    .unwrap();
    let base = forward(&model.unet);
    let policy = Policy::lora(&model.unet, &LoraConfig::default(), 1, &Device::Cpu).unwrap();
    perturb(&policy, 3);
    let snap = tmp.path().join("s.safetensors");
    policy
        .lora_set()
        .unwrap()
        .save(&snap, LoraFormat::Peft)
        .unwrap();
    let snap_out = forward(&model.unet);
    perturb(&policy, 4);
    let current = forward(&model.unet);
    policy
        .set_reference_snapshot(&model.unet, Some(&snap))
        .unwrap();
    let mut got = |which| {
        policy
            .with_weights(&mut model, which, |m| {
                let y = forward(&m.unet);
                // Outside the graph: no var is reachable from the output.
                assert!(y
                    .backward()
                    .unwrap()
                    .get(policy.params()[1].1.as_tensor())
                    .is_none());
                Ok(y)
            })
            .unwrap()
    };
    assert_eq!(max_diff(&got(Weights::Base), &base), 0.0);
    assert_eq!(max_diff(&got(Weights::Current), &current), 0.0);
    assert!(max_diff(&got(Weights::Reference), &snap_out) < 1e-5);
    assert!(policy.lora_set().unwrap().is_training());
}
