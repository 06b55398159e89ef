//! End-to-end check of the training core: accumulation + clipping + AdamW + schedule + EMA + checkpoints +
//! metrics, interrupted and resumed from a checkpoint, must end bit-identical to an uninterrupted run.

use std::path::Path;

use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use diffpref::train::checkpoint::{self, Checkpointer};
use diffpref::train::ema::{Ema, EmaConfig};
use diffpref::train::metrics::{read_metrics, MetricsWriter, METRICS_FILE};
use diffpref::train::optim::{clip_grad_norm, AdamW, AdamWConfig, GradAccumulator};
use diffpref::train::rng::Rng;
use diffpref::train::schedule::{LrSchedule, ScheduleKind};
use serde_json::json;

const TOTAL: u64 = 8;
const BASE_LR: f64 = 0.05;

struct Trainer {
    params: Vec<(String, Var)>,
    frozen: Tensor,
    opt: AdamW,
    ema: Ema,
    rng: Rng,
    step: u64,
    schedule: LrSchedule,
}

fn params() -> Vec<(String, Var)> {
    let dev = Device::Cpu;
    vec![
        (
            "down.weight".to_string(),
            Var::from_tensor(&Tensor::new(&[[0.5f32, -0.25], [0.1, 0.3]], &dev).unwrap()).unwrap(),
        ),
        (
            "up.weight".to_string(),
            Var::from_tensor(&Tensor::new(&[[1.0f32], [-1.0]], &dev).unwrap()).unwrap(),
        ),
    ]
}

impl Trainer {
    fn new() -> Self {
        let params = params();
        let ema = Ema::new(
            &params,
            EmaConfig {
                decay: 0.9,
                ..Default::default()
            },
        )
        .unwrap();
        Trainer {
            frozen: Tensor::new(&[[2f32, -1.0]], &Device::Cpu).unwrap(),
            opt: AdamW::new(AdamWConfig {
                lr: BASE_LR,
                ..Default::default()
            }),
            ema,
            rng: Rng::new(1234),
            step: 0,
            schedule: LrSchedule {
                min_lr_ratio: 0.1,
                ..LrSchedule::new(ScheduleKind::Cosine, 2, TOTAL)
            },
            params,
        }
    }

    /// One optimizer step over 3 micro-batches of random inputs.
    fn train_step(&mut self, metrics: &mut MetricsWriter) -> Result<()> {
        let mut acc = GradAccumulator::new();
        let mut loss_sum = 0.0;
        for _ in 0..3 {
            let x = self.rng.normal_tensor(&[4, 2], &Device::Cpu)?;
            let target = self.rng.normal_tensor(&[4, 1], &Device::Cpu)?;
            let h = x.matmul(self.params[0].1.as_tensor())?;
            let h = (h.broadcast_mul(&self.frozen)?).tanh()?; // frozen tensor in the graph
            let y = h.matmul(self.params[1].1.as_tensor())?;
            let loss = (y - target)?.sqr()?.mean_all()?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            acc.add_store(&self.params, loss.backward()?)?;
        }
        let mut grads = acc.into_grads()?;
        grads.check_finite()?;
        let norm = clip_grad_norm(&mut grads, 0.5)?;
        let lr = self.schedule.lr_at(self.step, BASE_LR);
        self.opt.set_lr(lr);
        self.opt.step(&self.params, &grads)?;
        self.ema.update(&self.params)?;
        self.step += 1;
        metrics.log(
            self.step,
            &[("loss", loss_sum / 3.0), ("grad_norm", norm), ("lr", lr)],
        )?;
        Ok(())
    }

    fn save(&self, ck: &Checkpointer) -> Result<()> {
        let state = json!({ "step": self.step, "rng": self.rng });
        ck.save(self.step, &state, |dir: &Path| {
            let weights: Vec<(String, Tensor)> = self
                .params
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                .collect();
            candle_core::safetensors::save(
                &weights.into_iter().collect(),
                dir.join("lora.safetensors"),
            )?;
            self.opt.save_state(dir.join("optimizer.safetensors"))?;
            self.ema.save(dir.join("ema.safetensors"))?;
            Ok(())
        })?;
        Ok(())
    }

    fn resume(dir: &Path) -> Result<Self> {
        let mut t = Trainer::new();
        let state = checkpoint::load_state(dir)?;
        t.step = state["step"].as_u64().unwrap();
        t.rng = serde_json::from_value(state["rng"].clone())?;
        let weights = candle_core::safetensors::load(dir.join("lora.safetensors"), &Device::Cpu)?;
        for (name, var) in &t.params {
            var.set(&weights[name])?;
        }
        t.opt
            .load_state(dir.join("optimizer.safetensors"), &t.params)?;
        t.ema.load(dir.join("ema.safetensors"), &t.params)?;
        Ok(t)
    }

    fn bits(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for (name, v) in &self.params {
            let p = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let e = self
                .ema
                .get(name)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            out.extend(p.iter().chain(&e).map(|x| x.to_bits()));
        }
        out
    }
}

#[test]
fn interrupted_and_resumed_run_is_bit_identical() {
    let base = tempfile::tempdir().unwrap();

    // Uninterrupted.
    let run_a = base.path().join("a");
    let mut metrics = MetricsWriter::create(run_a.join(METRICS_FILE)).unwrap();
    let mut a = Trainer::new();
    for _ in 0..TOTAL {
        a.train_step(&mut metrics).unwrap();
    }

    // Interrupted after step 5 (checkpoints every 2 steps, keep 2; metrics got ahead of the last checkpoint).
    let run_b = base.path().join("b");
    let ck = Checkpointer::new(&run_b, 2);
    let mut metrics = MetricsWriter::create(run_b.join(METRICS_FILE)).unwrap();
    let mut b = Trainer::new();
    for _ in 0..5 {
        b.train_step(&mut metrics).unwrap();
        if b.step.is_multiple_of(2) {
            b.save(&ck).unwrap();
        }
    }
    drop((b, metrics));
    // A save interrupted mid-way leaves a .tmp folder behind.
    std::fs::create_dir_all(run_b.join("checkpoint-6.tmp")).unwrap();

    let dir = checkpoint::latest(&run_b).unwrap().unwrap();
    assert_eq!(dir, run_b.join("checkpoint-4"));
    assert!(!run_b.join("checkpoint-6.tmp").exists());
    let kept: Vec<u64> = checkpoint::list(&run_b)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(kept, vec![2, 4]);
    let mut b = Trainer::resume(&dir).unwrap();
    let mut metrics = MetricsWriter::resume(run_b.join(METRICS_FILE), b.step).unwrap();
    while b.step < TOTAL {
        b.train_step(&mut metrics).unwrap();
        if b.step.is_multiple_of(2) {
            b.save(&ck).unwrap();
        }
    }

    assert_eq!(a.bits(), b.bits());
    assert_eq!(a.opt.step_count(), b.opt.step_count());
    assert_eq!(a.ema.optimization_step(), b.ema.optimization_step());
    let ma = std::fs::read_to_string(run_a.join(METRICS_FILE)).unwrap();
    let mb = std::fs::read_to_string(run_b.join(METRICS_FILE)).unwrap();
    assert_eq!(
        ma, mb,
        "metrics log of the resumed run matches the uninterrupted one"
    );
    assert_eq!(
        read_metrics(run_b.join(METRICS_FILE)).unwrap().len(),
        TOTAL as usize
    );
    let kept: Vec<u64> = checkpoint::list(&run_b)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(kept, vec![6, 8]);
}
