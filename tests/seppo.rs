//! `train seppo` end to end on the tiny model: the checkpoint pool (real earlier snapshots, drawn as the
//! strategy says, restored on resume), bit-identical resume, the online best-of-k winners, bad configs.

use common::{fixtures, make_pairs};
use diffpref::methods::seppo::{train, SeppoConfig};
use std::path::Path;

mod common;

fn config(dir: &Path, manifest: &Path, steps: u64, extra: &[&str]) -> SeppoConfig {
    let mut sets = vec![
        format!("model = \"{}\"", fixtures().join("tiny-sd").display()),
        format!("output_dir = \"{}\"", dir.join("run").display()),
        format!("data.manifest = \"{}\"", manifest.display()),
        "data.resolution = 32".into(),
        "optim.lr = 1e-2".into(),
        "optim.batch_size = 2".into(),
        format!("optim.max_steps = {steps}"),
        "optim.warmup_steps = 0".into(),
        "optim.schedule = \"constant\"".into(),
        "log.checkpoint_every = 3".into(),
        "log.progress = false".into(),
        "lora.rank = 4".into(),
        "loss.beta = 5000".into(),
        "seppo.pool_every = 2".into(),
        "seppo.sample_steps = 2".into(),
        "seppo.guidance = 3.0".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    SeppoConfig::load(None, &sets).unwrap()
}

fn records(run: &Path) -> Vec<serde_json::Value> {
    diffpref::train::metrics::read_metrics(run.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.get("loss").is_some())
        .collect()
}

fn load(p: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap()
}

fn max_diff(
    a: &std::collections::HashMap<String, candle_core::Tensor>,
    b: &std::collections::HashMap<String, candle_core::Tensor>,
) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(k, ta)| {
            let f32 = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
            (f32(ta) - f32(&b[k]))
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0.0, f32::max)
}

#[test]
fn the_pool_holds_earlier_snapshots_and_a_resumed_run_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let m = make_pairs(tmp.path(), 5);
    let (straight, resumed, short) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    let extra = ["data.caption_dropout = 0.3"];
    let s = train(&config(&straight, &m, 7, &extra), None).unwrap();
    // Interrupted after 3 steps (a checkpoint), then resumed to 7.
    train(&config(&resumed, &m, 3, &extra), None).unwrap();
    train(&config(&resumed, &m, 7, &extra), None).unwrap();
    let ck = |d: &Path| load(&d.join("run/checkpoint-7/trainable.safetensors"));
    assert_eq!(max_diff(&ck(&straight), &ck(&resumed)), 0.0);
    let strip = |v: Vec<serde_json::Value>| {
        v.into_iter()
            .map(|mut r| {
                r.as_object_mut()
                    .unwrap()
                    .retain(|k, _| !k.ends_with("_per_s") && k != "step_s");
                r
            })
            .collect::<Vec<_>>()
    };
    let recs = records(&straight.join("run"));
    assert_eq!(strip(recs.clone()), strip(records(&resumed.join("run"))));

    // The pool: steps 2, 4, 6 joined it; every drawn reference is the base or a snapshot taken before the step.
    for st in [2, 4, 6] {
        assert!(straight
            .join(format!("run/seppo-pool/step-{st:06}.safetensors"))
            .is_file());
    }
    let mut drawn = std::collections::BTreeSet::new();
    for r in &recs {
        let step = r["step"].as_u64().unwrap();
        let ref_step = r["ref_step"].as_f64().unwrap() as u64;
        let pool = r["pool_size"].as_f64().unwrap() as u64;
        assert_eq!(pool, 1 + (step - 1) / 2, "step {step}");
        assert!(
            ref_step.is_multiple_of(2) && ref_step < step,
            "step {step} drew {ref_step}"
        );
        drawn.insert(ref_step);
        let flip = r["flip_rate"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&flip));
        assert!((r["dpo_rate"].as_f64().unwrap() + flip - 1.0).abs() < 1e-12);
    }
    assert!(drawn.len() >= 2, "random replay drew only {drawn:?}");
    assert_eq!(s.last_metric("samples"), Some(14.0));

    // The snapshot of step 2 is exactly the weights a 2-step run trains.
    let c = train(&config(&short, &m, 2, &extra), None).unwrap();
    let snap = load(&straight.join("run/seppo-pool/step-000002.safetensors"));
    assert_eq!(max_diff(&snap, &load(&c.weights)), 0.0);
}

#[test]
fn base_and_latest_references_and_the_flipper_ablation() {
    let tmp = tempfile::tempdir().unwrap();
    let m = make_pairs(tmp.path(), 4);
    let latest = train(
        &config(
            &tmp.path().join("l"),
            &m,
            5,
            &[
                "seppo.reference = \"latest\"",
                "seppo.flipper = \"indicator\"",
            ],
        ),
        None,
    )
    .unwrap();
    for r in records(&latest.output_dir) {
        let step = r["step"].as_u64().unwrap();
        // The newest snapshot: the largest multiple of 2 below the step.
        assert_eq!(
            r["ref_step"].as_f64().unwrap() as u64,
            (step - 1) / 2 * 2,
            "step {step}"
        );
    }
    let base = train(
        &config(
            &tmp.path().join("b"),
            &m,
            4,
            &["seppo.reference = \"base\"", "seppo.flipper = \"off\""],
        ),
        None,
    )
    .unwrap();
    for r in records(&base.output_dir) {
        assert_eq!(r["ref_step"].as_f64(), Some(0.0));
        assert_eq!(r["flip_rate"].as_f64(), Some(0.0));
    }
}

#[test]
fn best_of_k_winners_are_scored_and_the_reward_diagnostics_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "a red square\na blue circle to the left of a green triangle\n",
    )
    .unwrap();
    let cfg = config(
        tmp.path(),
        Path::new("unused.jsonl"),
        2,
        &[
            "seppo.winners = \"best_of_k\"",
            &format!("seppo.prompts = \"{}\"", prompts.display()),
            "seppo.k = 3",
            "seppo.resolution = 32",
            "reward.kind = \"shapes\"",
        ],
    );
    let s = train(&cfg, None).unwrap();
    // Per step: 2 prompts x 3 candidates scored, and the 2 reference samples (diagnostics).
    assert_eq!(s.last_metric("reward_calls"), Some(16.0));
    assert_eq!(s.last_metric("samples"), Some(16.0));
    for r in records(&s.output_dir) {
        for k in [
            "winner_reward",
            "ref_sample_reward",
            "flip_agreement",
            "ref_better_rate",
        ] {
            assert!(r[k].as_f64().unwrap().is_finite(), "{k}: {r}");
        }
    }
}

#[test]
fn bad_settings_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let m = make_pairs(tmp.path(), 2);
    let err = |extra: &[&str]| {
        train(&config(tmp.path(), &m, 2, extra), None)
            .unwrap_err()
            .to_string()
    };
    assert!(err(&["loss.kind = \"simpo\""]).contains("loss.kind"));
    assert!(err(&["seppo.winners = \"best_of_k\""]).contains("prompts"));
    assert!(err(&["seppo.dead_zone = -1.0"]).contains("dead_zone"));
    assert!(err(&["seppo.pool_every = 0"]).contains("pool_every"));
    assert!(err(&["seppo.resolution = 64"]).contains("[seppo] resolution"));
    let e = SeppoConfig::load(None, &["seppo.flip = \"sign\"".into()]).unwrap_err();
    assert!(format!("{e:#}").contains("seppo.flip"), "{e:#}");
}

#[test]
fn full_fine_tuning_replays_full_weight_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let m = make_pairs(tmp.path(), 3);
    let s = train(
        &config(
            tmp.path(),
            &m,
            3,
            &[
                "mode = \"full\"",
                "optim.lr = 1e-4",
                "seppo.pool_every = 1",
                "seppo.reference = \"latest\"",
            ],
        ),
        None,
    )
    .unwrap();
    let recs = records(&s.output_dir);
    let refs: Vec<f64> = recs
        .iter()
        .map(|r| r["ref_step"].as_f64().unwrap())
        .collect();
    assert_eq!(refs, [0.0, 1.0, 2.0]);
    // A snapshot holds every UNet weight (the reference of a full run is a whole UNet).
    let snap = load(&s.output_dir.join("seppo-pool/step-000001.safetensors"));
    let unet = load(&s.weights.join("diffusion_pytorch_model.safetensors"));
    assert_eq!(snap.len(), unet.len());
    assert!(max_diff(&snap, &unet) > 0.0, "the final weights moved on");
    // The latest snapshot, taken after the previous update, is exactly the current weights: the policy and
    // its reference agree on every error (the loss is ln 2), while the weights did move from the base.
    for r in &recs[1..] {
        assert_eq!(r["model_mse_w"].as_f64(), r["ref_mse_w"].as_f64(), "{r}");
        assert_eq!(
            r["model_mse_ref"].as_f64(),
            r["ref_mse_ref"].as_f64(),
            "{r}"
        );
    }
    let base = load(&fixtures().join("tiny-sd/unet/diffusion_pytorch_model.safetensors"));
    assert!(max_diff(&snap, &base) > 0.0);
}
