//! The step-level methods on small settings: the latent reward model and LPO (every trainable LRM parameter
//! gets a gradient, a saved LRM scores as the trained one, SD2/SDXL-style backbones, `train lrm` and `train
//! lpo` end to end on tiny-sd with bit-identical resume, the sampler's σ on SD1.5's 20-step grid (the
//! threshold's input), the step range), and the step-aware preference model and SPO (`train spm` with the tiny
//! CLIP as its backbone and `train spo` end to end with bit-identical resume, the step range, bad settings).

use candle_core::{DType, Device, Tensor};
use diffpref::methods::lpo::{self, LpoConfig};
use diffpref::methods::lrm::{self, LrmConfig};
use diffpref::methods::spm::{self, SpmConfig};
use diffpref::methods::spo::{self, SpoConfig};
use diffpref_rewards::lrm::{LatentRewardModel, Trainable};
use diffpref_rewards::Reward;
use std::path::{Path, PathBuf};

#[global_allocator]
static ALLOC: diffpref::alloc::MiMalloc = diffpref::alloc::MiMalloc;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets")
}

fn randn(seed: u64, shape: &[usize]) -> Tensor {
    diffpref_pipelines::pipeline::seeded_noise(seed, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

#[test]
fn every_trainable_lrm_parameter_gets_a_finite_nonzero_gradient() {
    for name in ["tiny-sd", "tiny-sdxl"] {
        let lrm = LatentRewardModel::new_trainable(
            &fixture(name),
            7.5,
            Trainable {
                unet: true,
                text_encoders: true,
            },
            0,
            &Device::Cpu,
        )
        .unwrap();
        let x = randn(1, &[2, 4, 16, 16]);
        let t = Tensor::new(&[100f32, 700.0], &Device::Cpu).unwrap();
        let s = lrm
            .score_latents(&x, &t, &["a red circle", "a blue square"])
            .unwrap();
        assert_eq!(s.dims(), &[2]);
        // A loss that depends on both scores differently.
        let loss = ((s.get(0).unwrap() * 1.7).unwrap() - s.get(1).unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        let vars = lrm.trainable_vars();
        assert!(vars.len() > 10, "{name}: {} vars", vars.len());
        for (n, v) in &vars {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient reached {n}"));
            let a = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(a.is_finite() && a > 0.0, "{name}: {n} has gradient sum {a}");
        }
    }
}

#[test]
fn a_saved_lrm_scores_as_the_trained_one_and_is_a_reward() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["tiny-sd", "tiny-sd2", "tiny-sdxl"] {
        let lrm = LatentRewardModel::new_trainable(
            &fixture(name),
            3.0,
            Trainable {
                unet: true,
                text_encoders: name != "tiny-sd2",
            },
            5,
            &Device::Cpu,
        )
        .unwrap();
        let x = randn(2, &[3, 4, 16, 16]);
        let t = Tensor::new(&[1f32, 500.0, 951.0], &Device::Cpu).unwrap();
        let prompts = ["a red circle", "two green squares", ""];
        let before: Vec<f32> = lrm
            .score_latents(&x, &t, &prompts)
            .unwrap()
            .to_vec1()
            .unwrap();
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        lrm.save(&dir).unwrap();
        let back = LatentRewardModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(back.config, lrm.config);
        let after: Vec<f32> = back
            .score_latents(&x, &t, &prompts)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in before.iter().zip(&after) {
            assert!((a - b).abs() < 1e-5, "{name}: {before:?} vs {after:?}");
        }
        // Scores are a scaled cosine: |s| <= exp(τ) = 1/0.07.
        assert!(
            after.iter().all(|s| s.abs() <= 1.0 / 0.07 + 1e-3),
            "{after:?}"
        );
        // As a Reward on images (encoded by the backbone's VAE, scored at t = 0).
        let images = ((randn(3, &[2, 3, 32, 32]) * 0.2).unwrap() + 0.5).unwrap();
        let r = back
            .score(&images, &["a red circle", "a blue square"])
            .unwrap();
        assert_eq!(r.dims(), &[2]);
        assert_eq!(back.name(), "lrm");
        // The guidance matters: VFE off gives other scores.
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("lrm_config.json")).unwrap())
                .unwrap();
        cfg["guidance_scale"] = 1.0.into();
        std::fs::write(dir.join("lrm_config.json"), cfg.to_string()).unwrap();
        let off = LatentRewardModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let s_off: Vec<f32> = off
            .score_latents(&x, &t, &prompts)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_ne!(s_off, after);
    }
}

#[test]
fn bad_lrm_folders_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let err = LatentRewardModel::load(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("lrm_config.json"), "{err}");
    let lrm = LatentRewardModel::new_trainable(
        &fixture("tiny-sd"),
        7.5,
        Trainable {
            unet: false,
            text_encoders: false,
        },
        0,
        &Device::Cpu,
    )
    .unwrap();
    lrm.save(tmp.path()).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("lrm_config.json")).unwrap())
            .unwrap();
    cfg["backbone"] = "/nonexistent/model".into();
    std::fs::write(tmp.path().join("lrm_config.json"), cfg.to_string()).unwrap();
    let err = LatentRewardModel::load(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("backbone"), "{err}");
}

/// A few shapes-captioned pairs sampled from `model` (labelled by the ground truth), as `data make-prefs`.
fn make_pairs(model_dir: &Path, out: &Path, n: usize, seed: u64) -> PathBuf {
    let model = diffpref_pipelines::loading::StableDiffusion::load(
        model_dir,
        &diffpref_pipelines::loading::LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            variant: None,
        },
    )
    .unwrap();
    std::fs::create_dir_all(out).unwrap();
    let captions: Vec<String> = ["a red circle", "a blue square", "a green triangle"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let opts = diffpref::data::prefs::MakePrefsOptions {
        pairs: n,
        candidates: 2,
        temperature: 0.05,
        seed,
        steps: 3,
        guidance: 7.5,
        scheduler: None,
        batch_size: 4,
        all_pairs: false,
    };
    diffpref::data::prefs::make_prefs(&model, &captions, &opts, out, &|| {}).unwrap();
    out.join("manifest.jsonl")
}

fn lrm_config(dir: &Path, manifest: &Path, eval: &Path, extra: &[&str]) -> LrmConfig {
    diffpref::alloc::retain_freed_memory();
    let mut sets = vec![
        format!("model = {:?}", fixture("tiny-sd").display().to_string()),
        format!("output_dir = {:?}", dir.display().to_string()),
        format!("data.manifest = {:?}", manifest.display().to_string()),
        format!("eval.manifest = {:?}", eval.display().to_string()),
        "data.resolution = 32".into(),
        "eval.bands = [[0, 500], [500, 1000]]".into(),
        "optim.batch_size = 2".into(),
        "optim.lr = 1e-3".into(),
        "log.progress = false".into(),
        "log.checkpoint_every = 1".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    LrmConfig::load(None, &sets).unwrap()
}

/// The f32 values of every tensor of every safetensors file under `dir`, as bytes, by file and name.
fn dir_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in walk(dir) {
        if e.extension().is_some_and(|x| x == "safetensors") {
            let file = e.strip_prefix(dir).unwrap().display().to_string();
            out.extend(
                dir_bytes_file(&e)
                    .into_iter()
                    .map(|(k, b)| (format!("{file}:{k}"), b)),
            );
        }
    }
    out.sort();
    out
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}

#[test]
fn train_lrm_then_lpo_end_to_end_with_bit_identical_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let train_pairs = make_pairs(&fixture("tiny-sd"), &tmp.path().join("pairs"), 6, 0);
    let eval_pairs = make_pairs(&fixture("tiny-sd"), &tmp.path().join("eval"), 4, 9);

    // LRM: 4 steps straight, or 2 then resumed to 4: the same LRM.
    let full = lrm::train(
        &lrm_config(
            &tmp.path().join("lrm-full"),
            &train_pairs,
            &eval_pairs,
            &["optim.max_steps = 4"],
        ),
        None,
    )
    .unwrap();
    assert_eq!(full.steps, 4);
    let after = full.after.as_ref().unwrap();
    assert_eq!(after.len(), 2);
    assert!(after
        .iter()
        .all(|b| b.pairs == 4 && b.ci[0] <= b.accuracy && b.accuracy <= b.ci[1]));
    assert!(full.before.is_some());
    let part_dir = tmp.path().join("lrm-part");
    lrm::train(
        &lrm_config(
            &part_dir,
            &train_pairs,
            &eval_pairs,
            &["optim.max_steps = 2"],
        ),
        None,
    )
    .unwrap();
    let resumed = lrm::train(
        &lrm_config(
            &part_dir,
            &train_pairs,
            &eval_pairs,
            &["optim.max_steps = 4"],
        ),
        None,
    )
    .unwrap();
    assert_eq!(resumed.steps, 4);
    assert_eq!(dir_bytes(&full.weights), dir_bytes(&resumed.weights));
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(full.output_dir.join("lrm_eval.json")).unwrap(),
    )
    .unwrap();
    assert!(report["after"][0]["accuracy"].is_number());

    // LPO with that LRM: every tuple kept (threshold 0), K = 3, a round of 2 prompts, 3 steps of 2 tuples.
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "a red circle\na blue square\n").unwrap();
    let lpo_cfg = |dir: &Path, steps: u64, extra: &[&str]| -> LpoConfig {
        diffpref::alloc::retain_freed_memory();
        let mut sets = vec![
            format!("model = {:?}", fixture("tiny-sd").display().to_string()),
            format!("output_dir = {:?}", dir.display().to_string()),
            format!("lpo.prompts = {:?}", prompts.display().to_string()),
            format!("lpo.lrm = {:?}", full.weights.display().to_string()),
            "lpo.prompts_per_round = 2".into(),
            "lpo.k = 3".into(),
            "lpo.threshold = [0.0, 0.0]".into(),
            "lora.rank = 2".into(),
            "rollout.steps = 4".into(),
            "optim.batch_size = 2".into(),
            "optim.lr = 1e-3".into(),
            format!("optim.max_steps = {steps}"),
            "log.progress = false".into(),
            "log.checkpoint_every = 1".into(),
        ];
        sets.extend(extra.iter().map(|s| s.to_string()));
        LpoConfig::load(None, &sets).unwrap()
    };
    let a = lpo::train(&lpo_cfg(&tmp.path().join("lpo-full"), 5, &[]), None).unwrap();
    assert_eq!(a.steps, 5);
    let part = tmp.path().join("lpo-part");
    lpo::train(&lpo_cfg(&part, 2, &[]), None).unwrap();
    let b = lpo::train(&lpo_cfg(&part, 5, &[]), None).unwrap();
    assert_eq!(b.steps, 5);
    let lora = |s: &diffpref::engine::run::TrainSummary| dir_bytes_file(&s.weights);
    assert_eq!(lora(&a), lora(&b));
    let series = |p: &Path, k: &str| {
        diffpref::train::metrics::series(&diffpref::train::metrics::read_metrics(p).unwrap(), k)
    };
    assert_eq!(series(&a.metrics, "loss"), series(&b.metrics, "loss"));
    // The first step trains on-policy tuples: policy = reference, so the loss is log 2 exactly.
    let l = series(&a.metrics, "loss");
    assert!((l[0].1 - 2f64.ln()).abs() < 1e-6, "{l:?}");
    // The LoRA moved.
    assert!(lora(&a).iter().any(|(_, v)| v.iter().any(|&x| x != 0)));

    // The step range: tuples only from steps at t >= 500.
    let c = lpo::train(
        &lpo_cfg(
            &tmp.path().join("lpo-range"),
            2,
            &["lpo.timestep_range = [500, 1000]"],
        ),
        None,
    )
    .unwrap();
    assert!(series(&c.metrics, "mean_t")
        .iter()
        .all(|(_, t)| *t >= 500.0));
}

fn dir_bytes_file(f: &Path) -> Vec<(String, Vec<u8>)> {
    let map = candle_core::safetensors::load(f, &Device::Cpu).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = map
        .into_iter()
        .map(|(k, t)| {
            let b = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            (k, b)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn the_threshold_sees_the_samplers_sigma_on_sd15s_20_step_grid() {
    // tiny-shapes has SD1.5's scheduler (scaled_linear 0.00085-0.012, leading spacing, steps_offset 1).
    let model = diffpref_pipelines::loading::StableDiffusion::load(
        &assets().join("tiny-shapes"),
        &diffpref_pipelines::loading::LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            variant: None,
        },
    )
    .unwrap();
    let cfg = diffpref::rollout::RolloutConfig {
        steps: 20,
        ..Default::default()
    };
    let rule = diffpref::rollout::StepRule::new(&model, &cfg).unwrap();
    assert_eq!(rule.timesteps[0], 951.0);
    let s = lpo::step_sigmas(&rule).unwrap();
    // The LPO code's hard-coded table (compare_funcs.py), t = 951 first.
    assert!((s[0] - 0.6444).abs() < 1e-3, "{s:?}");
    assert!((s[19] - 0.0206).abs() < 1e-3, "{s:?}");
    assert!((s[9] - 0.4293).abs() < 1e-3, "t = 501: {s:?}");
    assert!(s.windows(2).all(|w| w[0] > w[1]));
    let th = |k: usize| lpo::dynamic_threshold(s[k], [s[19], s[0]], [0.35, 0.5]);
    assert!((th(0) - 0.5).abs() < 1e-9 && (th(19) - 0.35).abs() < 1e-9);
    // The spec's th(501) ≈ 0.448.
    assert!((th(9) - 0.448).abs() < 1e-3, "{}", th(9));
}

#[test]
fn bad_lrm_and_lpo_configurations_are_named() {
    let e = LrmConfig::load(None, &["model = \"x\"".into()])
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("[data] manifest"), "{e}");
    let e = LrmConfig::load(
        None,
        &[
            "model = \"x\"".into(),
            "data.manifest = \"m\"".into(),
            "lrm.guidance_scale = -1".into(),
        ],
    )
    .unwrap()
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("guidance_scale"), "{e}");
    let base = [
        "model = \"x\"".to_string(),
        "lpo.prompts = \"p\"".into(),
        "lpo.lrm = \"l\"".into(),
    ];
    for (set, key) in [
        ("lpo.k = 1", "[lpo] k"),
        ("lpo.threshold = [0.6, 0.4]", "[lpo] threshold"),
        ("lpo.clip_range = 1.5", "[lpo] clip_range"),
        ("lpo.beta = 0", "[lpo] beta"),
        ("lpo.timestep_range = [800, 200]", "[lpo] timestep_range"),
    ] {
        let mut s = base.to_vec();
        s.push(set.into());
        let e = LpoConfig::load(None, &s)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{set}: {e}");
    }
    let e = LpoConfig::load(
        None,
        &["model = \"x\"".into(), "lpo.prompts = \"p\"".into()],
    )
    .unwrap()
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("[lpo] lrm"), "{e}");
}

#[test]
fn lrm_train_score_and_an_lpo_step_on_sd2_and_sdxl_style_models() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["tiny-sd2", "tiny-sdxl"] {
        let root = tmp.path().join(name);
        let pairs = make_pairs(&fixture(name), &root.join("pairs"), 2, 1);
        let mut cfg = lrm_config(&root.join("lrm"), &pairs, &pairs, &["optim.max_steps = 1"]);
        cfg.model = fixture(name).display().to_string();
        let s = lrm::train(&cfg, None).unwrap();
        assert_eq!(s.steps, 1);
        let back = LatentRewardModel::load(&s.weights, DType::F32, &Device::Cpu).unwrap();
        let images = ((randn(4, &[1, 3, 32, 32]) * 0.2).unwrap() + 0.5).unwrap();
        assert!(back
            .score(&images, &["a red circle"])
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0]
            .is_finite());
        let prompts = root.join("prompts.txt");
        std::fs::write(&prompts, "a red circle\n").unwrap();
        diffpref::alloc::retain_freed_memory();
        let sets: Vec<String> = vec![
            format!("model = {:?}", fixture(name).display().to_string()),
            format!("output_dir = {:?}", root.join("lpo").display().to_string()),
            format!("lpo.prompts = {:?}", prompts.display().to_string()),
            format!("lpo.lrm = {:?}", s.weights.display().to_string()),
            "lpo.prompts_per_round = 2".into(),
            "lpo.k = 2".into(),
            "lpo.threshold = [0.0, 0.0]".into(),
            "lora.rank = 2".into(),
            "rollout.steps = 3".into(),
            "optim.batch_size = 2".into(),
            "optim.max_steps = 1".into(),
            "log.progress = false".into(),
        ];
        let t = lpo::train(&LpoConfig::load(None, &sets).unwrap(), None).unwrap();
        assert_eq!(t.steps, 1);
        assert!(t.last_metric("loss").unwrap().is_finite());
        assert!(t.weights.exists());
    }
}

#[test]
fn lpo_with_an_image_reward_on_each_childs_prediction_as_the_step_scorer() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "a red circle\na blue square\n").unwrap();
    diffpref::alloc::retain_freed_memory();
    let sets: Vec<String> = vec![
        format!("model = {:?}", fixture("tiny-sd").display().to_string()),
        format!(
            "output_dir = {:?}",
            tmp.path().join("run").display().to_string()
        ),
        format!("lpo.prompts = {:?}", prompts.display().to_string()),
        "lpo.scorer = \"reward\"".into(),
        "lpo.score_scale = 20.0".into(),
        "lpo.prompts_per_round = 2".into(),
        "lpo.k = 3".into(),
        "lpo.threshold = [0.0, 0.0]".into(),
        "reward.kind = \"shapes\"".into(),
        "lora.rank = 2".into(),
        "rollout.steps = 3".into(),
        "optim.batch_size = 2".into(),
        "optim.max_steps = 2".into(),
        "log.progress = false".into(),
    ];
    let cfg = LpoConfig::load(None, &sets).unwrap();
    cfg.validate().unwrap();
    let s = lpo::train(&cfg, None).unwrap();
    assert_eq!(s.steps, 2);
    assert!(s.last_metric("loss").unwrap().is_finite());
    // Each round scores 2 prompts x 3 children at each of the 3 steps.
    assert_eq!(s.last_metric("scorer_calls").unwrap() as u64 % 18, 0);
    // Without an LRM, scorer = "lrm" is refused naming the key.
    let mut bad = sets.clone();
    bad[3] = "lpo.scorer = \"lrm\"".into();
    let e = LpoConfig::load(None, &bad)
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("[lpo] lrm"), "{e}");
}

fn spm_config(dir: &Path, manifest: &Path, eval: &Path, extra: &[&str]) -> SpmConfig {
    diffpref::alloc::retain_freed_memory();
    let mut sets = vec![
        format!("model = {:?}", fixture("tiny-sd").display().to_string()),
        format!("output_dir = {:?}", dir.display().to_string()),
        format!(
            "spm.clip = {:?}",
            fixture("tiny-clip-hf").display().to_string()
        ),
        format!("data.manifest = {:?}", manifest.display().to_string()),
        format!("eval.manifest = {:?}", eval.display().to_string()),
        "data.resolution = 32".into(),
        "eval.bands = [[0, 500], [500, 1000]]".into(),
        "optim.batch_size = 2".into(),
        "optim.lr = 1e-3".into(),
        "log.progress = false".into(),
        "log.checkpoint_every = 1".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    SpmConfig::load(None, &sets).unwrap()
}

#[test]
fn train_spm_then_spo_end_to_end_with_bit_identical_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let train_pairs = make_pairs(&fixture("tiny-sd"), &tmp.path().join("pairs"), 6, 0);
    let eval_pairs = make_pairs(&fixture("tiny-sd"), &tmp.path().join("eval"), 4, 9);

    // SPM (the tiny CLIP as a PickScore-like backbone): 3 steps straight, or 1 then resumed to 3.
    let full = spm::train(
        &spm_config(
            &tmp.path().join("spm-full"),
            &train_pairs,
            &eval_pairs,
            &["optim.max_steps = 3"],
        ),
        None,
    )
    .unwrap();
    assert_eq!(full.steps, 3);
    let after = full.after.as_ref().unwrap();
    assert_eq!(after.len(), 2);
    assert!(after
        .iter()
        .all(|b| b.pairs == 4 && b.ci[0] <= b.accuracy && b.accuracy <= b.ci[1]));
    let part_dir = tmp.path().join("spm-part");
    spm::train(
        &spm_config(
            &part_dir,
            &train_pairs,
            &eval_pairs,
            &["optim.max_steps = 1"],
        ),
        None,
    )
    .unwrap();
    let resumed = spm::train(
        &spm_config(
            &part_dir,
            &train_pairs,
            &eval_pairs,
            &["optim.max_steps = 3"],
        ),
        None,
    )
    .unwrap();
    assert_eq!(dir_bytes(&full.weights), dir_bytes(&resumed.weights));
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(full.output_dir.join("spm_eval.json")).unwrap(),
    )
    .unwrap();
    assert!(report["after"][1]["accuracy"].is_number());
    // The trained timestep conditioning moved off its zero init.
    let heads = dir_bytes_file(&full.weights.join(diffpref_rewards::spm::HEADS_FILE));
    let w = heads.iter().find(|(k, _)| k == "adaln.0.weight").unwrap();
    assert!(w.1.iter().any(|&b| b != 0));

    // SPO with that SPM: every pair kept (threshold 0), K = 3, a round of 2 prompts, 4 steps.
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "a red circle\na blue square\n").unwrap();
    let spo_cfg = |dir: &Path, steps: u64, extra: &[&str]| -> SpoConfig {
        diffpref::alloc::retain_freed_memory();
        let mut sets = vec![
            format!("model = {:?}", fixture("tiny-sd").display().to_string()),
            format!("output_dir = {:?}", dir.display().to_string()),
            format!("spo.prompts = {:?}", prompts.display().to_string()),
            format!("spo.spm = {:?}", full.weights.display().to_string()),
            "spo.prompts_per_round = 2".into(),
            "spo.k = 3".into(),
            "spo.threshold = 0.0".into(),
            "spo.timestep_range = [0, 1000]".into(),
            "lora.rank = 2".into(),
            "rollout.steps = 4".into(),
            "optim.batch_size = 2".into(),
            "optim.lr = 1e-3".into(),
            format!("optim.max_steps = {steps}"),
            "log.progress = false".into(),
            "log.checkpoint_every = 1".into(),
        ];
        sets.extend(extra.iter().map(|s| s.to_string()));
        SpoConfig::load(None, &sets).unwrap()
    };
    let a = spo::train(&spo_cfg(&tmp.path().join("spo-full"), 5, &[]), None).unwrap();
    assert_eq!(a.steps, 5);
    let part = tmp.path().join("spo-part");
    spo::train(&spo_cfg(&part, 2, &[]), None).unwrap();
    let b = spo::train(&spo_cfg(&part, 5, &[]), None).unwrap();
    let lora = |s: &diffpref::engine::run::TrainSummary| dir_bytes_file(&s.weights);
    assert_eq!(lora(&a), lora(&b));
    let series = |p: &Path, k: &str| {
        diffpref::train::metrics::series(&diffpref::train::metrics::read_metrics(p).unwrap(), k)
    };
    assert_eq!(series(&a.metrics, "loss"), series(&b.metrics, "loss"));
    // On-policy first step: policy = reference, the loss is log 2 exactly.
    let l = series(&a.metrics, "loss");
    assert!((l[0].1 - 2f64.ln()).abs() < 1e-6, "{l:?}");
    assert!(lora(&a).iter().any(|(_, v)| v.iter().any(|&x| x != 0)));
    // A round scores 2 prompts x 3 children at each of the 4 steps.
    assert_eq!(a.last_metric("scorer_calls").unwrap() as u64 % 24, 0);

    // The step range: pairs only from steps with t < 500 (the paper trains the low-noise steps).
    let c = spo::train(
        &spo_cfg(
            &tmp.path().join("spo-range"),
            2,
            &["spo.timestep_range = [0, 500]"],
        ),
        None,
    )
    .unwrap();
    assert!(series(&c.metrics, "mean_t").iter().all(|(_, t)| *t < 500.0));
}

#[test]
fn bad_spm_and_spo_configurations_are_named() {
    let base = ["model = \"x\"".to_string(), "data.manifest = \"m\"".into()];
    for (sets, key) in [
        (vec![], "[spm] needs a backbone"),
        (
            vec!["spm.clip = \"c\"", "spm.scratch = { image_size = 32, patch_size = 4, width = 64, layers = 2, heads = 4 }"],
            "not both",
        ),
        (
            vec!["spm.scratch = { image_size = 30, patch_size = 4, width = 64, layers = 2, heads = 4 }"],
            "[spm.scratch] image_size",
        ),
        (vec!["spm.clip = \"c\"", "spm.guidance = -2"], "[spm] guidance"),
    ] {
        let mut s = base.to_vec();
        s.extend(sets.iter().map(|x| x.to_string()));
        let e = SpmConfig::load(None, &s)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{sets:?}: {e}");
    }
    let base = [
        "model = \"x\"".to_string(),
        "spo.prompts = \"p\"".into(),
        "spo.spm = \"s\"".into(),
    ];
    for (set, key) in [
        ("spo.k = 1", "[spo] k"),
        ("spo.threshold = 1.5", "[spo] threshold"),
        ("spo.clip_range = 1.5", "[spo] clip_range"),
        ("spo.beta = 0", "[spo] beta"),
        ("spo.timestep_range = [800, 200]", "[spo] timestep_range"),
    ] {
        let mut s = base.to_vec();
        s.push(set.into());
        let e = SpoConfig::load(None, &s)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{set}: {e}");
    }
    let e = SpoConfig::load(
        None,
        &["model = \"x\"".into(), "spo.prompts = \"p\"".into()],
    )
    .unwrap()
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("[spo] spm"), "{e}");
    // A folder that is not an SPM is named when the run loads it.
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.txt");
    std::fs::write(&prompts, "a red circle\n").unwrap();
    let cfg = SpoConfig::load(
        None,
        &[
            format!("model = {:?}", fixture("tiny-sd").display().to_string()),
            format!(
                "output_dir = {:?}",
                tmp.path().join("run").display().to_string()
            ),
            format!("spo.prompts = {:?}", prompts.display().to_string()),
            format!(
                "spo.spm = {:?}",
                fixture("tiny-clip-hf").display().to_string()
            ),
            "log.progress = false".into(),
        ],
    )
    .unwrap();
    let e = format!("{:#}", spo::train(&cfg, None).unwrap_err());
    assert!(
        e.contains("[spo] spm") && e.contains("spm_config.json"),
        "{e}"
    );
}
