//! Adjoint Matching: the lean adjoint against finite differences of the sampler it differentiates (ε- and
//! v-prediction), the memoryless step's coefficients against the spec's table, `train adjoint` end to end
//! (bit-identical resume mid-replay, full fine-tuning, real reward models on tiny-sd), configuration errors.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assets, fixtures, write_prompts};
use diffpref::methods::adjoint::{lean_adjoint, train, AdjointConfig};
use diffpref::pipelines::loading::{LoadOptions, StableDiffusion};
use diffpref::pipelines::schedulers::{
    DdimScheduler, DdimTransition, NoiseSchedule, Scheduler, SchedulerConfig, TimestepSpacing,
};
use diffpref::rollout::{
    guided_output, transition, Conditioning, RolloutConfig, Sampler, StepRule,
};
use diffpref::train::rng::Rng;
use std::path::Path;

#[global_allocator]
static ALLOC: diffpref::alloc::MiMalloc = diffpref::alloc::MiMalloc;

fn load(name: &str) -> StableDiffusion {
    StableDiffusion::load(&fixtures().join(name), &LoadOptions::default()).unwrap()
}

fn rule(model: &StableDiffusion, steps: usize) -> StepRule {
    StepRule::new(
        model,
        &RolloutConfig {
            steps,
            guidance: 1.0,
            sampler: Sampler::Ddim,
            eta: 1.0,
            ..Default::default()
        },
    )
    .unwrap()
}

/// `X_0 … X_K` of the base sampler from `x0` with the given step noises (unguided).
fn roll(
    model: &StableDiffusion,
    rule: &StepRule,
    cond: &Conditioning,
    x0: &Tensor,
    noise: &[Tensor],
) -> Vec<Tensor> {
    let b = x0.dim(0).unwrap();
    let mut xs = vec![x0.clone()];
    for (k, z) in noise.iter().enumerate() {
        let x = xs.last().unwrap();
        let t = Tensor::full(rule.timesteps[k] as f32, b, x.device()).unwrap();
        let eps = guided_output(&model.unet, x, &t, cond, 1.0).unwrap();
        let tr = transition(rule, &eps, x, &vec![k; b], DdimTransition::Noise(z)).unwrap();
        xs.push(tr.prev_sample.detach());
    }
    xs
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    (a * b)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// ã_0 from the lean adjoint equals the gradient of ⟨g, X_K(X_0)⟩ (the sampler with its noise held fixed) by
/// central differences along random directions; the adjoint without the network's Jacobian does not.
fn check_finite_differences(name: &str) {
    let model = load(name);
    let k = 3;
    let rule = rule(&model, k);
    let cond = Conditioning::new(&model, &["a red square", "a blue circle"], 1.0, 32).unwrap();
    let mut rng = Rng::new(5);
    let shape = [2, model.unet.config().in_channels, 4, 4];
    let x0 = rng.normal_tensor(&shape, &Device::Cpu).unwrap();
    let noise: Vec<Tensor> = (0..k)
        .map(|_| rng.normal_tensor(&shape, &Device::Cpu).unwrap())
        .collect();
    let g = rng.normal_tensor(&shape, &Device::Cpu).unwrap();
    let xs = roll(&model, &rule, &cond, &x0, &noise);
    let lean = lean_adjoint(&model.unet, &rule, &xs, &cond, 1.0, g.clone()).unwrap();
    assert_eq!(lean.adjoints.len(), k + 1);
    assert_eq!(lean.base_means.len(), k);
    // The cached base means are the sampler's means: X_{k+1} − μ_k = s_k ξ_k.
    for j in 0..k {
        let d = (&xs[j + 1] - &lean.base_means[j]).unwrap();
        let s = (&d / &noise[j])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let s_mean = s.iter().sum::<f32>() / s.len() as f32;
        assert!(
            s.iter()
                .all(|v| (v - s_mean).abs() < 1e-3 * s_mean.abs().max(1e-3)),
            "{name} step {j}"
        );
    }
    let objective = |x: &Tensor| dot(&g, roll(&model, &rule, &cond, x, &noise).last().unwrap());
    // Without the ε Jacobian: ã_k = √(ᾱ_{k+1}/ᾱ_k) ã_{k+1} (the mean's x-coefficient alone).
    let ac = rule.schedule.alphas_cumprod();
    let mut naive = g.clone();
    for j in (0..k).rev() {
        let t = rule.timesteps[j] as usize;
        let prev = t.saturating_sub(rule.step_ratio);
        naive = (naive * (ac[prev] / ac[t]).sqrt()).unwrap();
    }
    // Central differences at h and h/2, Richardson-extrapolated (the O(h²) term cancels).
    let central = |v: &Tensor, h: f64| {
        let plus = objective(&(&x0 + (v * h).unwrap()).unwrap());
        let minus = objective(&(&x0 - (v * h).unwrap()).unwrap());
        (plus - minus) / (2.0 * h)
    };
    let mut worst_naive_gap = 0f64;
    for dir in 0..3 {
        let v = rng.normal_tensor(&shape, &Device::Cpu).unwrap();
        let fd = (4.0 * central(&v, 5e-3) - central(&v, 1e-2)) / 3.0;
        let ad = dot(&lean.adjoints[0], &v);
        let scale = fd.abs().max(1.0);
        assert!(
            (fd - ad).abs() < 2e-3 * scale,
            "{name} direction {dir}: finite differences {fd} vs lean adjoint {ad}"
        );
        worst_naive_gap = worst_naive_gap.max((fd - dot(&naive, &v)).abs() / scale);
    }
    assert!(
        worst_naive_gap > 2e-2,
        "{name}: the network's Jacobian changed nothing ({worst_naive_gap}); the check cannot tell"
    );
}

#[test]
fn lean_adjoint_matches_finite_differences_epsilon_prediction() {
    check_finite_differences("tiny-sd");
}

#[test]
fn lean_adjoint_matches_finite_differences_v_prediction() {
    check_finite_differences("tiny-sd2");
}

/// The spec's §1.4 table: SD1.5's scaled-linear schedule (and the official code's 0.002–0.009 betas), 50
/// trailing steps; `s_k` and `c_k = |w| / |ε^θ − ε^b|` at steps 0 and 25 as the spec lists them, and at the last
/// step the closed form with ᾱ_{k+1} = ᾱ(0) (the rollout's last step; the official code widens it instead).
#[test]
fn memoryless_step_coefficients_match_the_spec() {
    for (b0, b1, want) in [
        (0.00085, 0.012, [(0.460, 0.520), (0.294, 0.377)]),
        (0.002, 0.009, [(0.405, 0.444), (0.299, 0.357)]),
    ] {
        let mut sc = SchedulerConfig::sd15();
        sc.beta_start = b0;
        sc.beta_end = b1;
        let sc = sc.with_spacing(TimestepSpacing::Trailing);
        let mut ddim = DdimScheduler::new(&sc).unwrap();
        ddim.set_timesteps(50).unwrap();
        let rule = StepRule {
            schedule: NoiseSchedule::new(&sc).unwrap(),
            timesteps: ddim.timesteps().to_vec(),
            step_ratio: ddim.step_ratio(),
            sampler: Sampler::Ddim,
            eta: 1.0,
            guidance: 1.0,
            stochastic_range: None,
        };
        assert_eq!(rule.timesteps[0], 999.0);
        assert_eq!(rule.timesteps[49], 19.0);
        // One row, one element: the mean for ε = 0 and ε = 1 at x = 0.
        let x = Tensor::zeros((1, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
        let coeffs = |k: usize| -> (f64, f64) {
            let one = Tensor::ones((1, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
            let a = transition(&rule, &x, &x, &[k], DdimTransition::PrevSample(&x)).unwrap();
            let b = transition(&rule, &one, &x, &[k], DdimTransition::PrevSample(&x)).unwrap();
            let s = a.std.to_vec1::<f32>().unwrap()[0] as f64;
            let dmu = (b.mean - a.mean)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0] as f64;
            (s, -dmu / s)
        };
        for (i, (s_want, c_want)) in [0usize, 25].into_iter().zip(want) {
            let (s, c) = coeffs(i);
            assert!((s - s_want).abs() < 1.5e-3, "step {i}: s {s} vs {s_want}");
            assert!((c - c_want).abs() < 1.5e-3, "step {i}: c {c} vs {c_want}");
        }
        let ac = rule.schedule.alphas_cumprod();
        let (a, p) = (ac[19], ac[0]);
        let (s, c) = coeffs(49);
        let s_want = ((1.0 - p) / (1.0 - a) * (1.0 - a / p)).sqrt();
        let c_want = (p * (1.0 - a / p) / (a * (1.0 - p))).sqrt();
        assert!(
            (s - s_want).abs() < 1e-4 * s_want.max(1.0) + 1e-5,
            "last: s {s} vs {s_want}"
        );
        assert!(
            (c - c_want).abs() < 1e-3 * c_want,
            "last: c {c} vs {c_want}"
        );
    }
}

/// A small run on the shapes model with the surrogate reward, LoRA rank 4, 4-step trajectories.
fn config(dir: &Path, prompts: &Path, extra: &[&str]) -> AdjointConfig {
    diffpref::alloc::retain_freed_memory();
    let mut sets = vec![
        format!(
            "model = {:?}",
            assets().join("tiny-shapes").display().to_string()
        ),
        format!("output_dir = {:?}", dir.join("run").display().to_string()),
        format!("adjoint.prompts = {:?}", prompts.display().to_string()),
        "reward.kind = \"shapes_surrogate\"".into(),
        "lora.rank = 4".into(),
        "log.progress = false".into(),
        "log.checkpoint_every = 1".into(),
        "rollout.steps = 4".into(),
        "rollout.guidance = 3.0".into(),
        "adjoint.early_steps = 1".into(),
        "adjoint.late_steps = 1".into(),
        "adjoint.late_fraction = 0.5".into(),
        "optim.batch_size = 2".into(),
        "optim.lr = 1e-3".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    AdjointConfig::load(None, &sets).unwrap()
}

fn records(run: &Path) -> Vec<serde_json::Value> {
    diffpref::train::metrics::read_metrics(run.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.get("loss").is_some())
        .map(|mut r| {
            r.as_object_mut()
                .unwrap()
                .retain(|k, _| !k.ends_with("_per_s") && !k.ends_with("_s"));
            r
        })
        .collect()
}

fn weights(run: &Path, step: u64) -> Vec<(String, Vec<u32>)> {
    let map = candle_core::safetensors::load(
        run.join(format!("checkpoint-{step}/trainable.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let mut v: Vec<_> = map
        .into_iter()
        .map(|(k, t)| {
            let bits = t
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            (k, bits)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_resumed_run_is_bit_identical_mid_replay() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = write_prompts(
        tmp.path(),
        &["a red circle", "a blue square", "two green triangles"],
    );
    // Batches of 2 x 2 micro-batches replayed for 3 steps: the interruption at step 4 falls inside a batch.
    let extra = [
        "optim.grad_accum = 2",
        "adjoint.buffer_passes = 3",
        "adjoint.grad_copies = 1",
    ];
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let s = train(
        &config(
            &a,
            &prompts,
            &[&extra[..], &["optim.max_steps = 6"]].concat(),
        ),
        None,
    );
    let s = s.unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(s.steps, 6);
    train(
        &config(
            &b,
            &prompts,
            &[&extra[..], &["optim.max_steps = 4"]].concat(),
        ),
        None,
    )
    .unwrap();
    train(
        &config(
            &b,
            &prompts,
            &[&extra[..], &["optim.max_steps = 6"]].concat(),
        ),
        None,
    )
    .unwrap();
    assert_eq!(weights(&a.join("run"), 6), weights(&b.join("run"), 6));
    let (ra, rb) = (records(&a.join("run")), records(&b.join("run")));
    assert_eq!(ra, rb);
    // Two rounds of 4 trajectories, each scored clean and once noisy; every figure finite; the control moves off
    // zero once trained.
    assert_eq!(s.last_metric("reward_calls"), Some(16.0));
    for r in &ra {
        for key in ["loss", "reward", "kept_frac", "control_norm"] {
            assert!(r[key].as_f64().unwrap().is_finite(), "{key}: {r}");
        }
    }
    // Before the first update the policy is the base (zero-initialised LoRA B): no control, up to the rounding
    // of a different batch layout.
    let (first, last) = (
        ra[0]["control_norm"].as_f64().unwrap(),
        ra[5]["control_norm"].as_f64().unwrap(),
    );
    assert!(
        first < 1e-3 && last > 10.0 * first,
        "control norm {first} -> {last}"
    );
    let noise = ra[0]["adjoint_norm_noise"].as_f64().unwrap();
    assert!(noise.is_finite() && noise > 0.0, "{}", ra[0]);
}

#[test]
fn full_fine_tuning_and_real_reward_models_on_tiny_sd() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = write_prompts(tmp.path(), &["a photo of a cat", "a red car"]);
    let fx = |n: &str| fixtures().join(n).display().to_string();
    let sets = [
        format!("model = {:?}", fx("tiny-sd")),
        "reward.kind = \"clip\"".into(), // replaced by the mix below
        "rollout.resolution = 32".into(),
        "optim.max_steps = 2".into(),
    ];
    let mut cfg = config(
        tmp.path(),
        &prompts,
        &sets.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
    );
    cfg.reward = diffpref::scoring::RewardSpec {
        kind: None,
        mix: vec![
            diffpref::scoring::RewardTerm {
                kind: diffpref::scoring::RewardKind::Pickscore,
                weights: Some(fx("tiny-clip-hf")),
                clip: None,
                weight: 1.0,
            },
            diffpref::scoring::RewardTerm {
                kind: diffpref::scoring::RewardKind::Imagereward,
                weights: Some(fx("tiny-imagereward")),
                clip: None,
                weight: 0.5,
            },
        ],
        ..Default::default()
    };
    let s = train(&cfg, None).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(s.steps, 2);
    let r = records(&tmp.path().join("run"));
    for key in ["adjoint_norm_image", "adjoint_norm_noise"] {
        let v = r[0][key].as_f64().unwrap();
        assert!(v.is_finite() && v > 0.0, "{key}: {}", r[0]);
    }
    assert!(r[1]["control_norm"].as_f64().unwrap() > 0.0);

    // Full fine-tuning: the frozen copy is the base of the adjoint.
    let full = config(
        &tmp.path().join("full"),
        &prompts,
        &[
            &format!("model = {:?}", fx("tiny-sd")),
            "mode = \"full\"",
            "optim.lr = 1e-4",
            "rollout.resolution = 32",
            "optim.max_steps = 2",
            "reward.kind = \"shapes_surrogate\"",
        ],
    );
    // The shapes surrogate needs shapes captions.
    std::fs::create_dir_all(tmp.path().join("full")).unwrap();
    let shapes_prompts =
        write_prompts(&tmp.path().join("full"), &["a red circle", "a blue square"]);
    let mut full = full;
    full.adjoint.prompts = Some(shapes_prompts);
    let s = train(&full, None).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(s.steps, 2);
    assert!(tmp
        .path()
        .join("full/run/unet/diffusion_pytorch_model.safetensors")
        .is_file());
    let r = records(&tmp.path().join("full/run"));
    assert!(r[1]["control_norm"].as_f64().unwrap() > 0.0, "{}", r[1]);
}

#[test]
fn bad_settings_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = write_prompts(tmp.path(), &["a red circle"]);
    let err = |sets: &[&str]| {
        let e = train(&config(tmp.path(), &prompts, sets), None).unwrap_err();
        format!("{e:#}")
    };
    assert!(err(&["adjoint.reward_scale = 0.0"]).contains("reward_scale"));
    assert!(err(&["rollout.sampler = \"ddpm\""]).contains("sampler"));
    assert!(err(&["rollout.eta = 0.5"]).contains("eta"));
    assert!(err(&["rollout.stochastic_range = [0, 500]"]).contains("stochastic_range"));
    assert!(err(&["adjoint.early_steps = 3"]).contains("early_steps"));
    assert!(err(&["adjoint.late_steps = 3"]).contains("late_steps"));
    assert!(err(&["adjoint.clip_quantile = 0.0"]).contains("clip_quantile"));
    assert!(err(&["adjoint.buffer_passes = 0"]).contains("buffer_passes"));
    assert!(err(&["adjoint.late_fraction = 1.5"]).contains("late_fraction"));
    assert!(err(&["adjoint.grad_noise = 0.0"]).contains("grad_noise"));
    let e = AdjointConfig::load(None, &["adjoint.lambda = 3".into()]).unwrap_err();
    assert!(format!("{e:#}").contains("adjoint.lambda"), "{e:#}");
    let mut cfg = config(tmp.path(), &prompts, &[]);
    cfg.adjoint.prompts = None;
    let missing = format!("{:#}", train(&cfg, None).unwrap_err());
    assert!(missing.contains("[adjoint] prompts"), "{missing}");
}
