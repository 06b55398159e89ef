//! `train grpo` end to end on small settings: the training reward rises on the shapes world, a resumed run
//! (interrupted mid-round) ends with identical weights, the KL term and full fine-tuning, configuration errors.

mod common;

use common::{assets, write_prompts};
use diffpref::methods::grpo::{train, GrpoConfig};
use std::path::Path;

/// As the binary: candle allocates a buffer per op (see `diffpref::alloc`).
#[global_allocator]
static ALLOC: diffpref::alloc::MiMalloc = diffpref::alloc::MiMalloc;

/// A small run on the shapes model: `prompts` trained (and judged), LoRA rank 4.
fn config(dir: &Path, prompts: &Path, extra: &[&str]) -> GrpoConfig {
    diffpref::alloc::retain_freed_memory();
    let mut sets = vec![
        format!(
            "model = {:?}",
            assets().join("tiny-shapes").display().to_string()
        ),
        format!("output_dir = {:?}", dir.join("run").display().to_string()),
        format!("grpo.prompts = {:?}", prompts.display().to_string()),
        "lora.rank = 4".into(),
        "log.progress = false".into(),
        "log.checkpoint_every = 1".into(),
        "rollout.steps = 6".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    GrpoConfig::load(None, &sets).unwrap()
}

#[test]
fn grpo_raises_the_reward_of_its_training_prompts() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = write_prompts(tmp.path(), &["a red circle", "a blue square"]);
    // Rounds of 2 prompts x 8 samples, each passed over twice in micro-batches of 8: 4 updates per round (the
    // first of each round on-policy), on the high-noise steps.
    let cfg = config(
        tmp.path(),
        &prompts,
        &[
            "grpo.prompts_per_round = 2",
            "grpo.group_size = 8",
            "grpo.inner_epochs = 2",
            "grpo.clip_range = 1.0",
            "grpo.timestep_range = [600, 1000]",
            "rollout.steps = 10",
            "optim.batch_size = 8",
            "optim.lr = 1e-3",
            "optim.max_steps = 24",
            "lora.target_modules = [\"to_q\", \"to_k\", \"to_v\", \"to_out.0\", \"proj_in\", \"proj_out\", \"ff.net.0.proj\", \"ff.net.2\"]",
            &format!("eval.prompts = {:?}", prompts.display().to_string()),
            "eval.samples = 16",
            "eval.steps = 10",
            "eval.batch_size = 32",
        ],
    );
    let s = train(&cfg, None).unwrap();
    let e = s.eval.clone().expect("evaluated");
    let c = &e.comparison;
    eprintln!(
        "training prompts: base {:.4} -> {:.4}, change {:+.4} ± {:.4}, win rate {:.2}",
        c.base.reward.mean, c.model.reward.mean, c.difference.mean, c.difference.ci95, c.win_rate
    );
    assert!(
        c.improved_beyond_ci() && c.difference.mean > 0.05,
        "the reward of the training prompts did not rise: {:+.4} ± {:.4}",
        c.difference.mean,
        c.difference.ci95
    );
    let records = diffpref::train::metrics::read_metrics(&s.metrics).unwrap();
    // The first update of each round is on-policy: its ratio is exactly 1.
    let ratios = diffpref::train::metrics::series(&records, "ratio");
    assert_eq!(ratios.len(), 24);
    for (step, r) in &ratios {
        if (*step as u64 - 1).is_multiple_of(4) {
            assert_eq!(*r, 1.0, "step {step}");
        }
    }
    // Later updates raised the log-probability of the better samples (on average over the run).
    let later: Vec<f64> = diffpref::train::metrics::series(&records, "adv_log_ratio")
        .iter()
        .filter(|(s, _)| !(*s as u64 - 1).is_multiple_of(4))
        .map(|(_, v)| *v)
        .collect();
    assert!(later.iter().sum::<f64>() > 0.0, "{later:?}");
    assert_eq!(s.last_metric("reward_calls"), Some(6.0 * 16.0));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&e.report).unwrap()).unwrap();
    assert_eq!(report["method"], "grpo");
    assert_eq!(report["reward_calls"], 96);
    // The shapes judge's report says which of the exact reward's terms moved; its `reward` term is the change.
    let terms = report["terms"].as_array().expect("terms in eval.json");
    let reward = terms.iter().find(|t| t["term"] == "reward").unwrap();
    assert!(
        (reward["change"]["mean"].as_f64().unwrap() - e.comparison.difference.mean).abs() < 1e-6
    );
    assert!(terms.iter().any(|t| t["term"] == "fidelity"));
}

fn lora_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let map = candle_core::safetensors::load(
        dir.join("pytorch_lora_weights.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut v: Vec<(String, Vec<u8>)> = map
        .into_iter()
        .map(|(k, t)| {
            let b = t
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
fn a_run_resumed_mid_round_ends_with_identical_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = write_prompts(
        tmp.path(),
        &["a red circle", "a blue square", "a green triangle"],
    );
    // A round of 2 x 4 trajectories in micro-batches of 2, two per optimizer step: 2 steps per round, and
    // inner_epochs = 2 makes it 4. The interrupted run stops after step 2: inside the first round. Groups share
    // their initial noise and only the high-noise half of the steps is stochastic (the variance options).
    let extra = [
        "grpo.prompts_per_round = 2",
        "grpo.group_size = 4",
        "grpo.shared_noise = true",
        "rollout.stochastic_range = [500, 1000]",
        "grpo.inner_epochs = 2",
        "grpo.train_timesteps = 2",
        "grpo.clip_range = 1e-3",
        "optim.batch_size = 2",
        "optim.grad_accum = 2",
        "optim.lr = 1e-3",
        "optim.max_steps = 6",
    ];
    let full_dir = tmp.path().join("full");
    let cfg = config(&full_dir, &prompts, &extra);
    let full = train(&cfg, None).unwrap();
    let part_dir = tmp.path().join("part");
    let mut part = config(&part_dir, &prompts, &extra);
    part.run.optim.max_steps = 2;
    train(&part, None).unwrap();
    let mut rest = part.clone();
    rest.run.optim.max_steps = 6;
    let resumed = train(&rest, None).unwrap();
    assert_eq!(resumed.steps, 6);
    assert_eq!(
        lora_bytes(&full.output_dir),
        lora_bytes(&resumed.output_dir)
    );
    // The metrics of the resumed steps are the uninterrupted run's.
    let pick = |p: &Path| -> Vec<(f64, f64)> {
        let r = diffpref::train::metrics::read_metrics(p).unwrap();
        diffpref::train::metrics::series(&r, "loss")
    };
    assert_eq!(pick(&full.metrics), pick(&resumed.metrics));
}

#[test]
fn kl_to_the_reference_and_full_fine_tuning() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = write_prompts(tmp.path(), &["a red circle", "a blue square"]);
    let base = [
        "grpo.prompts_per_round = 2",
        "grpo.group_size = 4",
        "grpo.train_timesteps = 1",
        "optim.batch_size = 8",
        "optim.max_steps = 2",
        "rollout.steps = 3",
    ];
    let mut extra: Vec<&str> = base.to_vec();
    extra.extend(["grpo.kl_beta = 0.1", "optim.lr = 1e-2"]);
    let s = train(&config(&tmp.path().join("kl"), &prompts, &extra), None).unwrap();
    let records = diffpref::train::metrics::read_metrics(&s.metrics).unwrap();
    let kl = diffpref::train::metrics::series(&records, "kl");
    assert_eq!(kl.len(), 2);
    // Step 1: the policy is the reference (zero LoRA B). Step 2: it moved.
    assert_eq!(kl[0].1, 0.0);
    assert!(kl[1].1 > 0.0 && kl[1].1.is_finite(), "{kl:?}");
    let adv = diffpref::train::metrics::series(&records, "adv_abs");
    assert!(
        adv[0].1 > 0.0,
        "the first round's samples all scored the same: {adv:?}"
    );

    let mut extra: Vec<&str> = base.to_vec();
    extra.extend(["mode = \"full\"", "optim.lr = 1e-4"]);
    let s = train(&config(&tmp.path().join("full"), &prompts, &extra), None).unwrap();
    assert!(s
        .weights
        .join("diffusion_pytorch_model.safetensors")
        .exists());
    assert!(s.weights.join("config.json").exists());
    assert!(s.last_metric("grad_norm").unwrap() > 0.0);
}

#[test]
fn bad_configurations_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = write_prompts(tmp.path(), &["a red circle"]);
    let err = |extra: &[&str]| -> String {
        let cfg = config(tmp.path(), &prompts, extra);
        format!("{:#}", cfg.validate().unwrap_err())
    };
    assert!(err(&["grpo.group_size = 1"]).contains("group_size"));
    let e = err(&[
        "grpo.prompts_per_round = 3",
        "grpo.group_size = 2",
        "optim.batch_size = 4",
    ]);
    assert!(e.contains("optim.batch_size") && e.contains("6"), "{e}");
    assert!(err(&["rollout.eta = 0.0"]).contains("eta"));
    assert!(err(&["grpo.clip_range = -1.0"]).contains("clip_range"));
    assert!(err(&["reward.kind = \"pickscore\""]).contains("weights"));
    let mut no_prompts = config(tmp.path(), &prompts, &[]);
    no_prompts.grpo.prompts = None;
    assert!(format!("{:#}", no_prompts.validate().unwrap_err()).contains("[grpo] prompts"));
    let e = format!(
        "{:#}",
        GrpoConfig::load(None, &["grpo.group_sise = 2".into()]).unwrap_err()
    );
    assert!(e.contains("group_sise"), "{e}");
    let e = format!(
        "{:#}",
        GrpoConfig::load(None, &["devise = \"cpu\"".into()]).unwrap_err()
    );
    assert!(e.contains("`devise`"), "{e}");
    // Prompts that are not shapes captions, with the shapes reward: the file and line are named.
    let bad = tmp.path().join("bad.txt");
    std::fs::write(&bad, "a red circle\na purple elephant\n").unwrap();
    let mut cfg = config(tmp.path(), &bad, &[]);
    cfg.run.optim.max_steps = 1;
    let e = format!("{:#}", train(&cfg, None).unwrap_err());
    assert!(e.contains("bad.txt") && e.contains("line 2"), "{e}");
}
