//! Diffusion-DPO loss: parity with the diffusers/official goldens (loss, accuracy, gradients) and the loss
//! family's defining properties.

use candle_core::{Device, Tensor};
use diffpref::methods::dpo::{pair_loss, BetaConvention, DpoLossConfig, LossKind, PairErrors};
use diffpref_pipelines::checks::CheckContext;
use diffpref_pipelines::golden::Golden;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn dpo_golden_loss_and_gradients_match() {
    let g = Golden::load(fixtures().join("golden/dpo.safetensors")).unwrap();
    let res = diffpref::methods::dpo::check_golden(
        &g,
        &CheckContext::cpu(Some(fixtures().join("tiny-sd"))),
    )
    .unwrap();
    for c in &res {
        println!("{c}");
    }
    assert!(res.len() >= 16);
    assert!(res.iter().all(|c| c.passed));
}

fn errors(mw: &[f32], ml: &[f32], rw: &[f32], rl: &[f32]) -> PairErrors {
    let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
    PairErrors {
        model_w: t(mw),
        model_l: t(ml),
        ref_w: Some(t(rw)),
        ref_l: Some(t(rl)),
        weight: Tensor::ones(mw.len(), candle_core::DType::F32, &Device::Cpu).unwrap(),
        uncond_drift: None,
    }
}

#[test]
fn loss_family_properties() {
    // Policy equal to the reference: z = 0, DPO loss ln 2, accuracy ½ (ties).
    let e = errors(&[0.1, 0.2], &[0.3, 0.1], &[0.1, 0.2], &[0.3, 0.1]);
    let (l, s) = pair_loss(&DpoLossConfig::default(), &e, None).unwrap();
    assert!((l.to_scalar::<f32>().unwrap() as f64 - std::f64::consts::LN_2).abs() < 1e-6);
    assert_eq!(s.implicit_acc, 0.5);
    // Policy better on the winner by 1e-4: z = (5000/2)·1e-4 = 0.25 in the official convention.
    let e = errors(&[0.0999], &[0.3], &[0.1], &[0.3]);
    let (l, s) = pair_loss(&DpoLossConfig::default(), &e, None).unwrap();
    let z: f64 = 2500.0 * 1e-4;
    assert!((s.margin - z).abs() < 1e-3, "{}", s.margin);
    assert!((l.to_scalar::<f32>().unwrap() as f64 - (1.0 + (-z).exp()).ln()).abs() < 1e-3);
    assert_eq!(s.implicit_acc, 1.0);
    // The diffusers convention doubles z at the same β.
    let cfg = DpoLossConfig {
        beta_convention: BetaConvention::Diffusers,
        ..Default::default()
    };
    let (_, s2) = pair_loss(&cfg, &e, None).unwrap();
    assert!((s2.margin - 2.0 * s.margin).abs() < 1e-3);
    // Hinge is zero beyond margin 1; IPO is zero at h = 1/β.
    let e_big = errors(&[0.09], &[0.3], &[0.1], &[0.3]);
    let hinge = DpoLossConfig {
        kind: LossKind::Hinge,
        ..Default::default()
    };
    assert_eq!(
        pair_loss(&hinge, &e_big, None)
            .unwrap()
            .0
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    let ipo = DpoLossConfig {
        kind: LossKind::Ipo,
        beta: 1e4,
        ..Default::default()
    };
    let e_ipo = errors(&[0.0999], &[0.3], &[0.1], &[0.3]);
    assert!(
        pair_loss(&ipo, &e_ipo, None)
            .unwrap()
            .0
            .to_scalar::<f32>()
            .unwrap()
            < 1e-10
    );
    // cDPO: a tie label (p = ½) is minimised at z = 0; robust with ε = 0 equals plain DPO.
    let tie = Tensor::new(&[0.5f32], &Device::Cpu).unwrap();
    let at0 = pair_loss(
        &DpoLossConfig::default(),
        &errors(&[0.1], &[0.3], &[0.1], &[0.3]),
        Some(&tie),
    )
    .unwrap()
    .0;
    let off = pair_loss(&DpoLossConfig::default(), &e, Some(&tie))
        .unwrap()
        .0;
    assert!(at0.to_scalar::<f32>().unwrap() < off.to_scalar::<f32>().unwrap());
    let robust = DpoLossConfig {
        kind: LossKind::Robust,
        ..Default::default()
    };
    let a = pair_loss(&robust, &e, None)
        .unwrap()
        .0
        .to_scalar::<f32>()
        .unwrap();
    let b = pair_loss(&DpoLossConfig::default(), &e, None)
        .unwrap()
        .0
        .to_scalar::<f32>()
        .unwrap();
    assert!((a - b).abs() < 1e-6);
    // Reference-free losses run without reference errors; SFT is the winner MSE.
    let mut e_free = e.clone();
    e_free.ref_w = None;
    e_free.ref_l = None;
    for kind in [LossKind::Simpo, LossKind::Mapo, LossKind::Sft] {
        let (l, _) = pair_loss(
            &DpoLossConfig {
                kind,
                ..Default::default()
            },
            &e_free,
            None,
        )
        .unwrap();
        assert!(l.to_scalar::<f32>().unwrap().is_finite());
    }
    let sft = pair_loss(
        &DpoLossConfig {
            kind: LossKind::Sft,
            ..Default::default()
        },
        &e_free,
        None,
    )
    .unwrap()
    .0;
    assert!((sft.to_scalar::<f32>().unwrap() - 0.0999).abs() < 1e-7);
    assert!(pair_loss(&DpoLossConfig::default(), &e_free, None).is_err());
    // KTO at the reference point gives ½ per image.
    let kto = DpoLossConfig {
        kind: LossKind::Kto,
        beta: 1000.0,
        ..Default::default()
    };
    let l = pair_loss(&kto, &errors(&[0.1], &[0.3], &[0.1], &[0.3]), None)
        .unwrap()
        .0;
    assert!((l.to_scalar::<f32>().unwrap() - 0.5).abs() < 1e-6);
}

#[test]
fn sft_anchor_adds_the_winner_error_to_every_pairwise_loss() {
    // Two pairs, ω = (1, 2) (the anchor ignores ω): the anchor is λ·mean(m_θʷ).
    let mut e = errors(&[0.1, 0.2], &[0.3, 0.1], &[0.1, 0.2], &[0.3, 0.1]);
    e.weight = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
    let loss = |kind, sft_weight| {
        pair_loss(
            &DpoLossConfig {
                kind,
                sft_weight,
                ..Default::default()
            },
            &e,
            None,
        )
        .unwrap()
        .0
        .to_scalar::<f32>()
        .unwrap() as f64
    };
    let anchor = (0.1 + 0.2) / 2.0;
    for kind in [
        LossKind::Sigmoid,
        LossKind::Ipo,
        LossKind::Hinge,
        LossKind::Simpo,
    ] {
        let (plain, anchored) = (loss(kind, 0.0), loss(kind, 0.3));
        // f32 rounding of the loss itself (SimPO's is ~250 here: z from the policy errors alone).
        assert!(
            (anchored - plain - 0.3 * anchor).abs() < 1e-6 * plain.abs().max(1.0),
            "{kind:?}: {plain} -> {anchored}"
        );
    }
    // SFT is the anchor itself: no second copy.
    assert_eq!(loss(LossKind::Sft, 0.0), loss(LossKind::Sft, 0.3));
    // The anchor's gradient pulls only on the winner's error.
    let mw = candle_core::Var::new(&[0.1f32, 0.2], &Device::Cpu).unwrap();
    let ml = candle_core::Var::new(&[0.3f32, 0.1], &Device::Cpu).unwrap();
    let grad = |sft_weight: f64| {
        let e2 = PairErrors {
            model_w: mw.as_tensor().clone(),
            model_l: ml.as_tensor().clone(),
            ..e.clone()
        };
        let cfg = DpoLossConfig {
            sft_weight,
            ..Default::default()
        };
        let g = pair_loss(&cfg, &e2, None).unwrap().0.backward().unwrap();
        (
            g.get(mw.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            g.get(ml.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
        )
    };
    let ((w0, l0), (w1, l1)) = (grad(0.0), grad(1000.0));
    for i in 0..2 {
        // d(λ·mean(m))/dm_i = λ/2 for two pairs.
        assert!(
            (w1[i] - w0[i] - 500.0).abs() < 1e-2,
            "{} vs {}",
            w1[i],
            w0[i]
        );
        assert!((l1[i] - l0[i]).abs() < 1e-3);
    }
    assert!(DpoLossConfig {
        sft_weight: -1.0,
        ..Default::default()
    }
    .validate()
    .is_err());
}

#[test]
fn uncond_anchor_adds_gamma_times_the_mean_drift() {
    let drift = candle_core::Var::new(&[0.02f32, 0.04], &Device::Cpu).unwrap();
    let e = PairErrors {
        uncond_drift: Some(drift.as_tensor().clone()),
        ..errors(&[0.1, 0.2], &[0.3, 0.1], &[0.12, 0.2], &[0.3, 0.1])
    };
    let run = |kind, uncond_anchor| {
        let cfg = DpoLossConfig {
            kind,
            uncond_anchor,
            ..Default::default()
        };
        cfg.validate().unwrap();
        let (l, s) = pair_loss(&cfg, &e, None).unwrap();
        (l, s.uncond_drift)
    };
    for kind in [LossKind::Sigmoid, LossKind::Ipo, LossKind::Kto] {
        let (plain, d0) = run(kind, 0.0);
        let (anchored, d1) = run(kind, 100.0);
        let (plain, anchored) = (
            plain.to_scalar::<f32>().unwrap() as f64,
            anchored.to_scalar::<f32>().unwrap() as f64,
        );
        // γ·mean(drift) = 100 · 0.03.
        assert!(
            (anchored - plain - 3.0).abs() < 1e-5,
            "{kind:?}: {plain} -> {anchored}"
        );
        assert!((d0 - 0.03).abs() < 1e-7 && (d1 - 0.03).abs() < 1e-7);
        // d(γ·mean(drift))/d drift_i = γ/P.
        let g = run(kind, 100.0).0.backward().unwrap();
        let g = g.get(drift.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert!(g.iter().all(|&v| (v - 50.0).abs() < 1e-4), "{g:?}");
    }
    // Without unconditional predictions the anchor adds nothing.
    let none = errors(&[0.1, 0.2], &[0.3, 0.1], &[0.12, 0.2], &[0.3, 0.1]);
    let cfg = DpoLossConfig {
        uncond_anchor: 100.0,
        ..Default::default()
    };
    let (a, s) = pair_loss(&cfg, &none, None).unwrap();
    let (b, _) = pair_loss(&DpoLossConfig::default(), &none, None).unwrap();
    assert_eq!(a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
    assert_eq!(s.uncond_drift, 0.0);
    // Negative or non-finite weights, and reference-free kinds, are refused by name.
    for (kind, w) in [
        (LossKind::Sigmoid, -1.0),
        (LossKind::Sigmoid, f64::NAN),
        (LossKind::Simpo, 10.0),
    ] {
        let err = DpoLossConfig {
            kind,
            uncond_anchor: w,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("loss.uncond_anchor"), "{err}");
    }
}

/// `golden/loss_family.safetensors` (`parity/make_loss_family_golden.py`): the loss family written in torch
/// float64 from the papers' equations, on 6 pairs with z = 2500·h spanning about [−3, 3].
fn loss_family_golden() -> Golden {
    Golden::load(fixtures().join("golden/loss_family.safetensors")).unwrap()
}

/// One case of the golden's `cases` metadata.
#[derive(serde::Deserialize)]
struct GoldenCase {
    name: String,
    config: DpoLossConfig,
    labels: bool,
    weight: bool,
    reference_free: bool,
}

/// Elementwise `|a − g| ≤ atol + rtol·|g|` with the golden's tolerance for `name`, panicking with `what` in the
/// message; returns the max relative error `|a − g| / |g|` (over g ≠ 0) and the max `|a − g| / (atol + rtol·|g|)`.
fn assert_close(
    g: &Golden,
    name: &str,
    actual: &[f32],
    expected: &[f32],
    what: &str,
) -> (f64, f64) {
    let (atol, rtol) = g
        .tolerance(name)
        .unwrap_or_else(|| panic!("{what}: no tolerance for `{name}`"));
    assert_eq!(actual.len(), expected.len(), "{what}: `{name}` length");
    let (mut max_rel, mut max_ratio): (f64, f64) = (0.0, 0.0);
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let (a, e) = (a as f64, e as f64);
        let err = (a - e).abs();
        assert!(
            a.is_finite() && err <= atol + rtol * e.abs(),
            "{what}: `{name}`[{i}] = {a:e}, golden {e:e} (|err| {err:.3e} > atol {atol:e} + rtol {rtol:e}·|golden|)"
        );
        if e != 0.0 {
            max_rel = max_rel.max(err / e.abs());
        }
        max_ratio = max_ratio.max(err / (atol + rtol * e.abs()));
    }
    (max_rel, max_ratio)
}

fn golden_vec(g: &Golden, name: &str) -> Vec<f32> {
    g.get(name)
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Runs `pair_loss` for one golden case with the policy errors as `Var`s: (loss, d loss/d m_θʷ, d loss/d m_θˡ)
/// (a gradient the graph does not reach is zeros).
fn run_golden_case(g: &Golden, case: &GoldenCase) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let dev = Device::Cpu;
    let mw = candle_core::Var::from_tensor(g.get("model_w").unwrap()).unwrap();
    let ml = candle_core::Var::from_tensor(g.get("model_l").unwrap()).unwrap();
    let p = mw.dim(0).unwrap();
    let e = PairErrors {
        model_w: mw.as_tensor().clone(),
        model_l: ml.as_tensor().clone(),
        ref_w: (!case.reference_free).then(|| g.get("ref_w").unwrap().clone()),
        ref_l: (!case.reference_free).then(|| g.get("ref_l").unwrap().clone()),
        weight: if case.weight {
            g.get("weight").unwrap().clone()
        } else {
            Tensor::ones(p, candle_core::DType::F32, &dev).unwrap()
        },
        uncond_drift: None,
    };
    let labels = case.labels.then(|| g.get("labels").unwrap().clone());
    case.config
        .validate()
        .unwrap_or_else(|err| panic!("{}: {err}", case.name));
    let (loss, stats) = pair_loss(&case.config, &e, labels.as_ref())
        .unwrap_or_else(|err| panic!("{}: {err}", case.name));
    let grads = loss.backward().unwrap();
    let grad = |v: &candle_core::Var| match grads.get(v.as_tensor()) {
        Some(t) => t.to_vec1::<f32>().unwrap(),
        None => vec![0.0; p],
    };
    let l = loss.to_scalar::<f32>().unwrap();
    assert!(
        (stats.loss - l as f64).abs() <= 1e-6 * (1.0 + l.abs() as f64),
        "{}: stats.loss {} vs loss {l}",
        case.name,
        stats.loss
    );
    (vec![l], grad(&mw), grad(&ml))
}

fn golden_cases(g: &Golden) -> Vec<GoldenCase> {
    serde_json::from_str(g.meta("cases").unwrap()).expect("golden `cases` metadata")
}

#[test]
fn loss_family_matches_golden() {
    let g = loss_family_golden();
    assert_eq!(g.kind(), Some("dpo_loss_family"));
    let cases = golden_cases(&g);
    let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    for want in [
        "sigmoid",
        "cdpo_eps0.1",
        "cdpo_eps0.1_labels",
        "sigmoid_weighted",
        "hinge",
        "ipo",
        "robust_eps0.1",
        "simpo_gamma0",
        "simpo_gamma0.5",
        "mapo",
        "kto",
        "sft",
    ] {
        assert!(names.contains(&want), "golden lacks case {want}: {names:?}");
    }
    for case in &cases {
        let (loss, gw, gl) = run_golden_case(&g, case);
        let (mut rel, mut ratio): (f64, f64) = (0.0, 0.0);
        for (key, actual) in [
            ("loss", &loss),
            ("grad_model_w", &gw),
            ("grad_model_l", &gl),
        ] {
            let name = format!("{}.{key}", case.name);
            let expected = golden_vec(&g, &name);
            let what = format!("case {} ({key})", case.name);
            let (r, q) = assert_close(&g, &name, actual, &expected, &what);
            (rel, ratio) = (rel.max(r), ratio.max(q));
        }
        println!("{:<22} max rel err {rel:.2e}, {ratio:.3} x tol", case.name);
    }
}

#[test]
fn loss_family_golden_exercises_every_regime() {
    // The inputs reach the regimes the golden is meant to test: z on both sides of the hinge's kink (z = 1) and
    // of IPO's minimum (z = k/β = ½), and both signs of z.
    let g = loss_family_golden();
    let v = |n: &str| golden_vec(&g, n);
    let (mw, ml, rw, rl) = (v("model_w"), v("model_l"), v("ref_w"), v("ref_l"));
    let z: Vec<f64> = (0..mw.len())
        .map(|i| 2500.0 * ((rw[i] - rl[i]) as f64 - (mw[i] - ml[i]) as f64))
        .collect();
    let count = |f: &dyn Fn(f64) -> bool| z.iter().filter(|&&x| f(x)).count();
    assert!(
        count(&|x| x < 0.0) >= 2 && count(&|x| x > 1.0) >= 2,
        "{z:?}"
    );
    assert!(
        count(&|x| x < 0.5) >= 2 && count(&|x| x > 0.5) >= 2,
        "{z:?}"
    );
    // Hinge: active pairs pull with k/P on each error, the others not at all.
    let hw = v("hinge.grad_model_w");
    for (zi, gi) in z.iter().zip(&hw) {
        let want = if *zi < 1.0 { 2500.0 / 6.0 } else { 0.0 };
        assert!((*gi as f64 - want).abs() < 1e-2, "z {zi}: {gi}");
    }
}

#[test]
fn min_snr_weights_match_golden() {
    use diffpref::methods::dpo::{timestep_weight, TimestepWeighting};
    use diffpref_pipelines::schedulers::{NoiseSchedule, PredictionType, SchedulerConfig};
    let g = loss_family_golden();
    let gamma: f64 = g.meta("min_snr_gamma").unwrap().parse().unwrap();
    assert_eq!(gamma, 5.0);
    let t = g.get("min_snr.timesteps").unwrap();
    for (model, pred, name) in [
        ("tiny-sd", PredictionType::Epsilon, "min_snr.weight_epsilon"),
        (
            "tiny-sd2",
            PredictionType::VPrediction,
            "min_snr.weight_v_prediction",
        ),
    ] {
        let sc = SchedulerConfig::from_file(
            fixtures()
                .join(model)
                .join("scheduler/scheduler_config.json"),
        )
        .unwrap();
        let schedule = NoiseSchedule::new(&sc).unwrap();
        assert_eq!(schedule.prediction_type(), pred, "{model}");
        let snr = schedule.snr(t).unwrap().to_vec1::<f32>().unwrap();
        assert_close(
            &g,
            "min_snr.snr",
            &snr,
            &golden_vec(&g, "min_snr.snr"),
            model,
        );
        let w = timestep_weight(&schedule, TimestepWeighting::MinSnr { gamma }, t)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (rel, ratio) = assert_close(
            &g,
            name,
            &w,
            &golden_vec(&g, name),
            &format!("{model} {name}"),
        );
        println!("{name:<30} max rel err {rel:.2e}, {ratio:.3} x tol");
        // Off: ones.
        let ones = timestep_weight(&schedule, TimestepWeighting::None, t)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(ones.iter().all(|&x| x == 1.0));
    }
}

#[test]
fn timestep_band_is_validated_against_the_scheduler() {
    let band = |r: Option<[u64; 2]>| {
        DpoLossConfig {
            timestep_range: r,
            ..Default::default()
        }
        .timestep_band(1000)
    };
    assert_eq!(band(None).unwrap(), (0, 1000));
    assert_eq!(band(Some([700, 1000])).unwrap(), (700, 1000));
    assert_eq!(band(Some([0, 1])).unwrap(), (0, 1));
    for bad in [[500, 500], [800, 700], [0, 1001], [999, 2000]] {
        let err = band(Some(bad))
            .expect_err(&format!("{bad:?} accepted"))
            .to_string();
        assert!(
            err.contains("loss.timestep_range")
                && err.contains(&format!("[{}, {}]", bad[0], bad[1])),
            "{bad:?}: {err}"
        );
    }
}

/// Reference-free losses read only the policy errors: reference errors passed along change nothing.
#[test]
fn reference_free_losses_ignore_reference_errors() {
    let with_ref = errors(&[0.1, 0.25], &[0.3, 0.2], &[0.2, 0.1], &[0.1, 0.4]);
    let mut without = with_ref.clone();
    without.ref_w = None;
    without.ref_l = None;
    for kind in [LossKind::Simpo, LossKind::Mapo, LossKind::Sft] {
        let cfg = DpoLossConfig {
            kind,
            simpo_gamma: 0.5,
            ..Default::default()
        };
        let (a, _) = pair_loss(&cfg, &with_ref, None).unwrap();
        let (b, _) = pair_loss(&cfg, &without, None).unwrap();
        assert_eq!(
            a.to_scalar::<f32>().unwrap(),
            b.to_scalar::<f32>().unwrap(),
            "{kind:?}"
        );
    }
}
