//! Scheduler parity with diffusers 0.42 (golden files) and behaviour tests of the schedulers module.

mod common;
use candle_core::{DType, Device, Tensor, Var};
use common::randn;
use diffpref_pipelines::checks::{run, CheckContext};
use diffpref_pipelines::golden::Golden;
use diffpref_pipelines::schedulers::{
    build, build_from_config, ddim_step_with_logprob, DdimTransition, NoiseSchedule,
    PredictionType, SchedulerConfig, SchedulerKind, TimestepSpacing,
};
use diffpref_pipelines::Error;
use std::path::{Path, PathBuf};

fn golden_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/golden")
        .join(format!("{name}.safetensors"))
}

fn check_golden(name: &str) {
    let golden = Golden::load(golden_path(name)).unwrap_or_else(|e| panic!("loading {name}: {e}"));
    let comps = run(&golden, &CheckContext::cpu(None))
        .unwrap_or_else(|e| panic!("{name}: check failed to run: {e}"))
        .unwrap_or_else(|| {
            panic!(
                "{name}: kind {:?} not handled by the pipelines checks",
                golden.kind()
            )
        });
    assert!(!comps.is_empty(), "{name}: no comparisons");
    let worst = comps.iter().map(|c| c.ratio).fold(0.0, f64::max);
    println!(
        "{name}: {} comparisons, worst ratio {worst:.4}",
        comps.len()
    );
    for c in &comps {
        println!("  {c}");
    }
    let failed: Vec<String> = comps
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{name}: {} comparisons failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn golden_scheduler_common() {
    check_golden("scheduler_common");
}

#[test]
fn golden_scheduler_ddim_eta0() {
    check_golden("scheduler_ddim_eta0");
}

#[test]
fn golden_scheduler_ddim_eta1() {
    check_golden("scheduler_ddim_eta1");
}

#[test]
fn golden_scheduler_ddpm() {
    check_golden("scheduler_ddpm");
}

#[test]
fn golden_scheduler_euler() {
    check_golden("scheduler_euler");
}

#[test]
fn golden_scheduler_euler_ancestral() {
    check_golden("scheduler_euler_ancestral");
}

#[test]
fn golden_scheduler_dpmpp_2m() {
    check_golden("scheduler_dpmpp_2m");
}

/// A v-prediction / sample-prediction golden (`tests/fixtures/parity/make_prediction_type_goldens.py`): its
/// metadata config really has `pred`, every other field is the epsilon golden's, and the chain matches.
fn check_prediction_golden(name: &str, pred: PredictionType) {
    let g = Golden::load(golden_path(name)).unwrap_or_else(|e| panic!("loading {name}: {e}"));
    let cfg = SchedulerConfig::from_json_str(&g.metadata["scheduler_config"], name).unwrap();
    assert_eq!(cfg.prediction_type, pred, "{name}: prediction_type");
    check_golden(name);
}

#[test]
fn golden_scheduler_ddim_eta0_vpred() {
    check_prediction_golden("scheduler_ddim_eta0_vpred", PredictionType::VPrediction);
}

#[test]
fn golden_scheduler_ddim_eta0_sample() {
    check_prediction_golden("scheduler_ddim_eta0_sample", PredictionType::Sample);
}

#[test]
fn golden_scheduler_ddim_eta1_vpred() {
    check_prediction_golden("scheduler_ddim_eta1_vpred", PredictionType::VPrediction);
}

#[test]
fn golden_scheduler_ddim_eta1_sample() {
    check_prediction_golden("scheduler_ddim_eta1_sample", PredictionType::Sample);
}

#[test]
fn golden_scheduler_ddpm_vpred() {
    check_prediction_golden("scheduler_ddpm_vpred", PredictionType::VPrediction);
}

#[test]
fn golden_scheduler_ddpm_sample() {
    check_prediction_golden("scheduler_ddpm_sample", PredictionType::Sample);
}

#[test]
fn golden_scheduler_euler_vpred() {
    check_prediction_golden("scheduler_euler_vpred", PredictionType::VPrediction);
}

#[test]
fn golden_scheduler_euler_sample() {
    check_prediction_golden("scheduler_euler_sample", PredictionType::Sample);
}

#[test]
fn golden_scheduler_euler_ancestral_vpred() {
    check_prediction_golden(
        "scheduler_euler_ancestral_vpred",
        PredictionType::VPrediction,
    );
}

/// diffusers 0.42.1's Euler-ancestral has no `sample` path: this golden is its epsilon path fed the
/// equivalent noise prediction (x0 = model_output, as diffusers' Euler; see the file's `reference_note`).
#[test]
fn golden_scheduler_euler_ancestral_sample() {
    check_prediction_golden("scheduler_euler_ancestral_sample", PredictionType::Sample);
}

#[test]
fn golden_scheduler_dpmpp_2m_vpred() {
    check_prediction_golden("scheduler_dpmpp_2m_vpred", PredictionType::VPrediction);
}

#[test]
fn golden_scheduler_dpmpp_2m_sample() {
    check_prediction_golden("scheduler_dpmpp_2m_sample", PredictionType::Sample);
}

/// The prediction-type goldens discriminate: run with any other prediction type in the config, some
/// output (samples, predicted x0) of every one of them is out of tolerance.
#[test]
fn prediction_type_goldens_fail_under_another_prediction_type() {
    let preds = [
        ("epsilon", PredictionType::Epsilon),
        ("v_prediction", PredictionType::VPrediction),
        ("sample", PredictionType::Sample),
    ];
    for sched in [
        "ddim_eta0",
        "ddim_eta1",
        "ddpm",
        "euler",
        "euler_ancestral",
        "dpmpp_2m",
    ] {
        for suffix in ["vpred", "sample"] {
            let name = format!("scheduler_{sched}_{suffix}");
            let golden = Golden::load(golden_path(&name)).unwrap();
            let text = golden.metadata["scheduler_config"].clone();
            let own = SchedulerConfig::from_json_str(&text, &name)
                .unwrap()
                .prediction_type;
            let own_key = preds.iter().find(|(_, p)| *p == own).unwrap().0;
            let own_field = format!("\"prediction_type\": \"{own_key}\"");
            assert!(text.contains(&own_field), "{name}: {text}");
            for (other, p) in preds {
                if p == own {
                    continue;
                }
                // (string edit: the DPM config holds Python's `-Infinity`, which serde_json rejects)
                let mut g = Golden::load(golden_path(&name)).unwrap();
                let cfg = text.replace(&own_field, &format!("\"prediction_type\": \"{other}\""));
                g.metadata.insert("scheduler_config".into(), cfg);
                let comps = run(&g, &CheckContext::cpu(None)).unwrap().unwrap();
                let worst = comps.iter().map(|c| c.ratio).fold(0.0, f64::max);
                assert!(
                    comps.iter().any(|c| !c.passed),
                    "{name} run as {other}: every comparison passed (worst ratio {worst})"
                );
                println!("{name} as {other}: worst ratio {worst:.3e}");
            }
        }
    }
}

#[test]
fn golden_scheduler_timesteps() {
    check_golden("scheduler_timesteps");
}

#[test]
fn golden_ddim_logprob() {
    check_golden("ddim_logprob");
}

fn sd15_schedule() -> NoiseSchedule {
    NoiseSchedule::new(&SchedulerConfig::sd15()).unwrap()
}

/// d(sum log_prob) / d(model_output) from backprop matches a central finite difference (f64).
#[test]
fn ddim_logprob_gradient_matches_finite_difference() {
    let dev = Device::Cpu;
    let schedule = sd15_schedule();
    let shape = (2, 2, 3, 3);
    let sample = randn(1, 1.0, shape, &dev, DType::F64);
    let mo = randn(2, 1.0, shape, &dev, DType::F64);
    let noise = randn(3, 1.0, shape, &dev, DType::F64);
    let t = Tensor::new(&[501i64, 801], &dev).unwrap();
    // The sampled x_{t-1} is fixed (as in PPO: the trajectory is stored), the model output varies.
    let x_prev = ddim_step_with_logprob(
        &schedule,
        &mo,
        &t,
        &sample,
        1.0,
        100,
        DdimTransition::Noise(&noise),
    )
    .unwrap()
    .prev_sample;
    let mo_new = (&mo + randn(4, 0.1, shape, &dev, DType::F64)).unwrap();
    let var = Var::from_tensor(&mo_new).unwrap();
    let lp = |m: &Tensor| {
        ddim_step_with_logprob(
            &schedule,
            m,
            &t,
            &sample,
            1.0,
            100,
            DdimTransition::PrevSample(&x_prev),
        )
        .unwrap()
        .log_prob
    };
    let loss = lp(var.as_tensor()).sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .expect("no gradient w.r.t. model_output");
    let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
    assert!(g.iter().any(|x| x.abs() > 1e-6), "gradient is zero");
    let base: Vec<f64> = mo_new.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-5;
    for i in [0usize, 7, 20, 35] {
        let mut plus = base.clone();
        plus[i] += eps;
        let mut minus = base.clone();
        minus[i] -= eps;
        let f = |v: Vec<f64>| {
            let m = Tensor::from_vec(v, shape, &dev).unwrap();
            lp(&m).sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let fd = (f(plus) - f(minus)) / (2.0 * eps);
        assert!(
            (fd - g[i]).abs() <= 1e-6 + 1e-4 * fd.abs(),
            "element {i}: backprop {} vs finite difference {fd}",
            g[i]
        );
    }
}

#[test]
fn v_prediction_target_is_velocity() {
    let dev = Device::Cpu;
    let mut cfg = SchedulerConfig::sd15();
    cfg.prediction_type = PredictionType::VPrediction;
    let s = NoiseSchedule::new(&cfg).unwrap();
    let x0 = randn(5, 1.0, (3, 4, 5, 5), &dev, DType::F32);
    let noise = randn(6, 1.0, (3, 4, 5, 5), &dev, DType::F32);
    let t = Tensor::new(&[3i64, 500, 999], &dev).unwrap();
    let target = s.target(&x0, &noise, &t).unwrap();
    let v = s.velocity(&x0, &noise, &t).unwrap();
    assert_eq!(target.dtype(), DType::F32);
    let d = (target - &v)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
    // And it is not the noise: v = sqrt(a) eps - sqrt(1-a) x0.
    let d = (v - &noise)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d > 0.1);
    // With the velocity as model output, the predicted x0 is x0 again.
    let xt = s.add_noise(&x0, &noise, &t).unwrap();
    let v = s.velocity(&x0, &noise, &t).unwrap();
    let x0_hat = s.pred_original_sample(&v, &xt, &t).unwrap();
    let d = (x0_hat - &x0)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-4, "x0 round trip off by {d}");
}

#[test]
fn unsupported_config_values_name_the_key() {
    let text = r#"{"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid", "num_train_timesteps": 1000}"#;
    match SchedulerConfig::from_json_str(text, "my/scheduler_config.json") {
        Err(Error::UnsupportedConfig {
            file, key, value, ..
        }) => {
            assert_eq!(file, "my/scheduler_config.json");
            assert_eq!(key, "beta_schedule");
            assert!(value.contains("sigmoid"));
        }
        other => panic!("expected UnsupportedConfig, got {other:?}"),
    }
    let text = r#"{"_class_name": "DDIMScheduler", "thresholding": true}"#;
    let cfg = SchedulerConfig::from_json_str(text, "cfg.json").unwrap();
    let err = build_from_config(&cfg).unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedConfig { key, .. } if key == "thresholding"),
        "{err}"
    );
    assert!(err.to_string().contains("thresholding"));
    let text = r#"{"timestep_spacing": "quadratic"}"#;
    let err = SchedulerConfig::from_json_str(text, "cfg.json").unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedConfig { key, .. } if key == "timestep_spacing"),
        "{err}"
    );
    let cfg = SchedulerConfig {
        use_beta_sigmas: true,
        ..SchedulerConfig::sd15()
    };
    let err = build(SchedulerKind::Euler, &cfg).unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedConfig { key, .. } if key == "use_beta_sigmas"),
        "{err}"
    );
    let err = SchedulerKind::from_class_name("HeunDiscreteScheduler").unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedConfig { key, .. } if key == "_class_name"),
        "{err}"
    );
}

#[test]
fn per_sample_add_noise_matches_scalar_formula() {
    let dev = Device::Cpu;
    let s = sd15_schedule();
    let x0 = randn(7, 1.0, (4, 2, 3, 3), &dev, DType::F32);
    let noise = randn(8, 1.0, (4, 2, 3, 3), &dev, DType::F32);
    let ts = [0i64, 17, 500, 999];
    let t = Tensor::new(&ts, &dev).unwrap();
    let batched = s.add_noise(&x0, &noise, &t).unwrap();
    // Float timesteps (integer-valued) give the same result.
    let tf = Tensor::new(&[0f32, 17.0, 500.0, 999.0], &dev).unwrap();
    let batched_f = s.add_noise(&x0, &noise, &tf).unwrap();
    assert_eq!(
        (&batched - &batched_f)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    for (b, t) in ts.iter().enumerate() {
        let a = s.alphas_cumprod()[*t as usize];
        let expect = ((x0.get(b).unwrap() * a.sqrt()).unwrap()
            + (noise.get(b).unwrap() * (1.0 - a).sqrt()).unwrap())
        .unwrap();
        let d = (batched.get(b).unwrap() - expect)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6, "sample {b} (t = {t}) off by {d}");
        // A one-sample batch with the same t agrees too.
        let single = s
            .add_noise(
                &x0.narrow(0, b, 1).unwrap(),
                &noise.narrow(0, b, 1).unwrap(),
                &Tensor::new(&[*t], &dev).unwrap(),
            )
            .unwrap();
        let d = (batched.narrow(0, b, 1).unwrap() - single)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }
    // Results keep x0's dtype.
    let x64 = x0.to_dtype(DType::F64).unwrap();
    assert_eq!(s.add_noise(&x64, &noise, &t).unwrap().dtype(), DType::F64);
    // snr / sigma per sample.
    let snr: Vec<f32> = s.snr(&t).unwrap().to_vec1().unwrap();
    let sig: Vec<f32> = s.sigma(&t).unwrap().to_vec1().unwrap();
    for (i, t) in ts.iter().enumerate() {
        let a = s.alphas_cumprod()[*t as usize];
        assert!((snr[i] as f64 - a / (1.0 - a)).abs() <= 1e-5 * (a / (1.0 - a)));
        assert!((sig[i] as f64 - ((1.0 - a) / a).sqrt()).abs() <= 1e-5 * ((1.0 - a) / a).sqrt());
    }
}

#[test]
fn euler_from_ddim_config_inherits_leading_spacing() {
    let ddim = SchedulerConfig::sd15();
    let mut euler = build(SchedulerKind::Euler, &ddim).unwrap();
    euler.set_timesteps(10).unwrap();
    assert_eq!(euler.timesteps()[0], 901.0);
    assert_eq!(euler.timesteps()[9], 1.0);
    let sigma_max = euler.sigmas().unwrap()[0];
    assert!((euler.init_noise_sigma() - (sigma_max * sigma_max + 1.0).sqrt()).abs() < 1e-4);
    // A config without timestep_spacing takes Euler's own default (linspace).
    let mut cfg = SchedulerConfig::sd15();
    cfg.timestep_spacing = None;
    let mut euler = build(SchedulerKind::Euler, &cfg).unwrap();
    euler.set_timesteps(10).unwrap();
    assert_eq!(euler.timesteps()[0], 999.0);
    assert!((euler.init_noise_sigma() - euler.sigmas().unwrap()[0]).abs() < 1e-6);
    let mut ddim = build(SchedulerKind::Ddim, &cfg).unwrap();
    ddim.set_timesteps(10).unwrap();
    assert_eq!(ddim.timesteps()[0], 901.0);
}

#[test]
fn scheduler_kind_names_round_trip() {
    for k in SchedulerKind::ALL {
        assert_eq!(SchedulerKind::parse(k.name()).unwrap(), k);
        assert_eq!(SchedulerKind::from_class_name(k.class_name()).unwrap(), k);
    }
    assert_eq!(
        SchedulerKind::from_class_name("PNDMScheduler").unwrap(),
        SchedulerKind::Ddim
    );
    assert!(SchedulerKind::parse("heun").is_err());
}

#[test]
fn python_infinity_and_config_round_trip() {
    let text = r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
                   "beta_schedule": "scaled_linear", "_diffusers_version": "0.42.1", "unknown_key": [1, 2]}"#;
    let cfg = SchedulerConfig::from_json_str(text, "x").unwrap();
    assert_eq!(cfg.lambda_min_clipped, f64::NEG_INFINITY);
    assert_eq!(cfg.timestep_spacing, None);
    let json = serde_json::to_string(&cfg).unwrap();
    let back: SchedulerConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back.beta_schedule, cfg.beta_schedule);
    assert_eq!(back.class_name, cfg.class_name);
    assert_eq!(back.lambda_min_clipped, f64::NEG_INFINITY);
    let sd = SchedulerConfig::sd15().with_spacing(TimestepSpacing::Trailing);
    let back: SchedulerConfig = serde_json::from_str(&serde_json::to_string(&sd).unwrap()).unwrap();
    assert_eq!(back.timestep_spacing, Some(TimestepSpacing::Trailing));
    assert_eq!(back.steps_offset, 1);
}

/// The StepOutput mean / std decomposition holds: prev = mean + std * noise.
#[test]
fn stochastic_steps_expose_mean_and_std() {
    let dev = Device::Cpu;
    let cfg = SchedulerConfig::sd15();
    let x = randn(9, 1.0, (2, 4, 4, 4), &dev, DType::F32);
    let m = randn(10, 1.0, (2, 4, 4, 4), &dev, DType::F32);
    let z = randn(11, 1.0, (2, 4, 4, 4), &dev, DType::F32);
    for kind in [
        SchedulerKind::Ddim,
        SchedulerKind::Ddpm,
        SchedulerKind::EulerAncestral,
    ] {
        let mut s = build(kind, &cfg).unwrap();
        if kind == SchedulerKind::Ddim {
            s.set_eta(1.0).unwrap();
        }
        s.set_timesteps(5).unwrap();
        assert!(s.needs_noise(0));
        let out = s.step(&m, 1, &x, Some(&z)).unwrap();
        let (mean, std) = (out.mean.unwrap(), out.std.unwrap());
        assert!(std > 0.0, "{kind}: std {std}");
        let rebuilt = (mean + (&z * std).unwrap()).unwrap();
        let d = (rebuilt - out.prev_sample)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{kind}: off by {d}");
    }
    // Deterministic ones need no noise and draw none.
    for kind in [SchedulerKind::Euler, SchedulerKind::DpmPp2m] {
        let mut s = build(kind, &cfg).unwrap();
        s.set_timesteps(5).unwrap();
        assert!(!s.needs_noise(0));
        let a = s.step(&m, 0, &x, None).unwrap().prev_sample;
        let b = s.clone_box().step(&m, 0, &x, None).unwrap().prev_sample;
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
    }
    // DPM-Solver must be stepped in order.
    let mut s = build(SchedulerKind::DpmPp2m, &cfg).unwrap();
    s.set_timesteps(5).unwrap();
    assert!(s.step(&m, 2, &x, None).is_err());
}

/// Every scheduler runs every prediction type and spacing on bf16 samples without error, returning bf16.
#[test]
fn all_schedulers_all_prediction_types() {
    let dev = Device::Cpu;
    for pred in [
        PredictionType::Epsilon,
        PredictionType::VPrediction,
        PredictionType::Sample,
    ] {
        for spacing in [
            TimestepSpacing::Leading,
            TimestepSpacing::Linspace,
            TimestepSpacing::Trailing,
        ] {
            for kind in SchedulerKind::ALL {
                let mut cfg = SchedulerConfig::sd15().with_spacing(spacing);
                cfg.prediction_type = pred;
                let mut s = build(kind, &cfg).unwrap();
                s.set_timesteps(4).unwrap();
                let mut x = (randn(12, 1.0, (1, 4, 4, 4), &dev, DType::F32) * s.init_noise_sigma())
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap();
                for i in 0..4 {
                    let inp = s.scale_model_input(&x, i).unwrap();
                    let out = (inp * 0.1).unwrap();
                    x = s.step(&out, i, &x, None).unwrap().prev_sample;
                }
                assert_eq!(x.dtype(), DType::BF16);
                let v = x
                    .to_dtype(DType::F32)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    v.is_finite(),
                    "{kind} {pred:?} {spacing:?}: non-finite sample"
                );
            }
        }
    }
}

#[test]
fn karras_sigmas_and_zero_terminal_snr() {
    for kind in [SchedulerKind::Euler, SchedulerKind::DpmPp2m] {
        let mut cfg = SchedulerConfig::sd15().with_spacing(TimestepSpacing::Linspace);
        cfg.use_karras_sigmas = true;
        let mut s = build(kind, &cfg).unwrap();
        s.set_timesteps(10).unwrap();
        let sig = s.sigmas().unwrap();
        assert_eq!(sig.len(), 11);
        assert!(
            (sig[0] - 14.6146).abs() < 1e-3,
            "{kind}: sigma_max {}",
            sig[0]
        );
        assert!(
            (sig[9] - 0.029168).abs() < 1e-4,
            "{kind}: sigma_min {}",
            sig[9]
        );
        assert_eq!(sig[10], 0.0);
        assert!(
            sig.windows(2).all(|w| w[0] > w[1]),
            "{kind}: sigmas not decreasing"
        );
        let ts = s.timesteps();
        assert!(
            (ts[0] - 999.0).abs() < 1e-3 && ts[9].abs() < 1e-3,
            "{kind}: timesteps {ts:?}"
        );
    }
    let mut cfg = SchedulerConfig::sd15();
    cfg.rescale_betas_zero_snr = true;
    let ddim = NoiseSchedule::new(&cfg).unwrap();
    assert_eq!(*ddim.alphas_cumprod().last().unwrap(), 0.0);
    assert!((ddim.alphas_cumprod()[0] - sd15_schedule().alphas_cumprod()[0]).abs() < 1e-6);
    let mut euler = build(
        SchedulerKind::Euler,
        &cfg.with_spacing(TimestepSpacing::Trailing),
    )
    .unwrap();
    euler.set_timesteps(4).unwrap();
    assert!(
        (euler.sigmas().unwrap()[0] - 4096.0).abs() < 1.0,
        "sigma_max {}",
        euler.sigmas().unwrap()[0]
    );
}
