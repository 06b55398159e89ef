//! `diffpref bench align` on the embedded shapes world, in small: the base row and a DPO row evaluated on the
//! same held-out prompts and noise, with paired differences, win rates, diversity and the report files.

use diffpref::align::{format_table, run_align, AlignConfigs, Robustness};
use diffpref::assets::{
    default_adjoint_config, default_dpo_config, default_grpo_config, default_lpo_config,
    default_lrm_config, default_seppo_config, default_spm_config, default_spo_config,
};
use diffpref::eval::{read_prompts, sample_and_score, SampleOptions};
use diffpref::methods::pairwise::DpoConfig;
use diffpref::rewards::shapes::ShapesReward;
use std::path::Path;

/// The embedded DPO default in small (2 steps of 2 pairs, 2 samples per held-out prompt, its feature cache in
/// `out`, then `extra`), judged on the first `n` captions of its held-out list (cut for time; written to
/// `lists`), which it returns.
fn small_dpo(out: &Path, lists: &Path, n: usize, extra: &[&str]) -> (DpoConfig, Vec<String>) {
    let mut set: Vec<String> = [
        "log.progress=false",
        "optim.max_steps=2",
        "optim.batch_size=2",
        "eval.samples=2",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    set.push(format!(
        "data.cache_dir={:?}",
        out.join("cache").display().to_string()
    ));
    let mut cfg = default_dpo_config(&set).unwrap();
    let first: Vec<String> =
        read_prompts(cfg.run.eval.prompts.as_ref().unwrap(), true).unwrap()[..n].to_vec();
    let short = lists.join(format!("heldout-{n}.txt"));
    std::fs::write(&short, first.join("\n") + "\n").unwrap();
    cfg.run.eval.prompts = Some(short);
    (cfg, first)
}

#[test]
fn bench_align_compares_methods_with_the_base_on_equal_noise() {
    let out = tempfile::tempdir().unwrap();
    let lists = tempfile::tempdir().unwrap();
    let (cfg, four) = small_dpo(out.path(), lists.path(), 4, &["eval.steps=4"]);
    let cache = out.path().join("cache");
    // simpo is reference-free: it trains without the default's unconditional anchor instead of failing.
    assert!(cfg.loss.uncond_anchor > 0.0);
    // GRPO in small: one round of 2 prompts x 2 samples, one optimizer step.
    let grpo = default_grpo_config(&[
        "log.progress=false".into(),
        "optim.max_steps=1".into(),
        "optim.batch_size=4".into(),
        "grpo.prompts_per_round=2".into(),
        "grpo.group_size=2".into(),
        "grpo.train_timesteps=1".into(),
        "rollout.steps=4".into(),
    ])
    .unwrap();
    let cfgs = AlignConfigs {
        dpo: cfg.clone(),
        grpo,
        // LPO in small: an LRM of one step (evaluated on 2 made pairs), then one LPO step of 2 tuples.
        lrm: default_lrm_config(&[
            "optim.max_steps=1".into(),
            "optim.batch_size=2".into(),
            "log.progress=false".into(),
            "eval.make.pairs=2".into(),
            "eval.make.steps=2".into(),
        ])
        .unwrap(),
        lpo: default_lpo_config(&[
            "log.progress=false".into(),
            "optim.max_steps=1".into(),
            "optim.batch_size=2".into(),
            "lpo.prompts_per_round=2".into(),
            "lpo.k=2".into(),
            "lpo.threshold=[0.0, 0.0]".into(),
            "rollout.steps=3".into(),
        ])
        .unwrap(),
        // SPO in small: an SPM of one step on 2 made pairs (evaluated on 2 more), then one SPO step.
        spm: default_spm_config(&[
            "optim.max_steps=1".into(),
            "optim.batch_size=2".into(),
            "log.progress=false".into(),
            "pairs.pairs=2".into(),
            "pairs.candidates=2".into(),
            "pairs.steps=2".into(),
            "eval.make.pairs=2".into(),
            "eval.make.steps=2".into(),
        ])
        .unwrap(),
        spo: default_spo_config(&[
            "log.progress=false".into(),
            "optim.max_steps=1".into(),
            "optim.batch_size=2".into(),
            "spo.prompts_per_round=2".into(),
            "spo.k=2".into(),
            "spo.threshold=0.0".into(),
            "rollout.steps=3".into(),
        ])
        .unwrap(),
        // SePPO in small: one step of 2 winners against 2 reference samples of 2 steps.
        seppo: default_seppo_config(&[
            "log.progress=false".into(),
            "optim.max_steps=1".into(),
            "optim.batch_size=2".into(),
            "seppo.sample_steps=2".into(),
            format!("data.cache_dir={:?}", cache.display().to_string()),
        ])
        .unwrap(),
        // Adjoint Matching in small: one step of 2 trajectories of 3 steps.
        adjoint: default_adjoint_config(&[
            "log.progress=false".into(),
            "optim.max_steps=1".into(),
            "optim.batch_size=2".into(),
            "rollout.steps=3".into(),
            "adjoint.early_steps=1".into(),
        ])
        .unwrap(),
        // 2 fresh lists of 2 captions x 2 sampling seeds.
        robustness: Robustness {
            lists: 2,
            seeds: 2,
            prompts: 2,
        },
        train_seeds: 1,
    };
    let methods = [
        "dpo".into(),
        "simpo".into(),
        "grpo".into(),
        "lpo".into(),
        "spo".into(),
        "seppo".into(),
        "seppo-noflip".into(),
        "adjoint".into(),
    ];
    let report = run_align(&cfgs, &methods, out.path(), false).unwrap();
    let table = format_table(&report);
    eprintln!("{table}");
    assert_eq!(report.rows.len(), 9, "{table}");
    let am = &report.rows[8];
    assert_eq!(
        (am.method.as_str(), am.steps, am.reward_calls),
        ("adjoint", 1, Some(2))
    );
    assert!(am.difference.is_some() && am.weights.as_ref().unwrap().exists());
    assert_eq!(
        (report.rows[7].method.as_str(), report.rows[7].steps),
        ("seppo-noflip", 1)
    );
    let sp = &report.rows[6];
    assert_eq!((sp.method.as_str(), sp.steps), ("seppo", 1));
    // Data winners need no reward: SePPO's reference samples are scored by nothing.
    assert_eq!(sp.reward_calls, Some(0));
    assert!(sp.difference.is_some() && sp.weights.as_ref().unwrap().exists());
    let o = &report.rows[5];
    assert_eq!((o.method.as_str(), o.steps), ("spo", 1));
    // The SPM scored 2 prompts x 2 children at the one step of 3 (667, 334, 1) inside the default's [600, 1000).
    assert_eq!(o.reward_calls, Some(4));
    assert!(out.path().join("spo-spm/spm/spm_config.json").exists());
    assert!(out.path().join("spo-spm/spm_eval.json").exists());
    assert!(o.difference.is_some() && o.weights.as_ref().unwrap().exists());
    let l = &report.rows[4];
    assert_eq!((l.method.as_str(), l.steps), ("lpo", 1));
    // The LRM scored 2 prompts x 2 children at the one step of 3 (t = 667) inside the default's timestep_range.
    assert_eq!(l.reward_calls, Some(4));
    assert!(out.path().join("lpo-lrm/lrm/lrm_config.json").exists());
    assert!(l.difference.is_some() && l.weights.as_ref().unwrap().exists());
    assert_eq!(report.rows[2].method, "simpo");
    let g = &report.rows[3];
    assert_eq!(
        (g.method.as_str(), g.steps, g.reward_calls),
        ("grpo", 1, Some(4))
    );
    assert!(g.difference.is_some() && g.weights.as_ref().unwrap().exists());
    assert!(table.contains("reward calls"), "{table}");
    assert!(report.rows[1].reward_calls.is_none());
    let (base, dpo) = (&report.rows[0], &report.rows[1]);
    assert_eq!((base.method.as_str(), dpo.method.as_str()), ("base", "dpo"));
    assert!(base.difference.is_none() && base.win_rate.is_none());
    let prompts = read_prompts(cfg.run.eval.prompts.as_ref().unwrap(), true).unwrap();
    assert_eq!((report.prompts, &prompts), (4, &four));
    assert_eq!(base.reward.n, prompts.len() * 2);
    // The paired change is the difference of the two means (same images per row, same noise).
    let d = dpo.difference.unwrap();
    assert!((d.mean - (dpo.reward.mean - base.reward.mean)).abs() < 1e-9);
    assert!(d.ci95.is_finite() && d.ci95 >= 0.0);
    let (w, (lo, hi)) = (dpo.win_rate.unwrap(), dpo.win_rate_ci95.unwrap());
    assert!((0.0..=1.0).contains(&w) && lo <= w && w <= hi, "{table}");
    assert!(base.diversity.unwrap() > 0.0 && dpo.diversity.unwrap() > 0.0);
    assert!((0.0..=1.0).contains(&base.reward.mean));
    assert_eq!(dpo.steps, 2);
    assert!(dpo.weights.as_ref().unwrap().exists());
    assert!(report.report.exists() && report.grid.exists());

    // Robustness: every trained row judged on 2 fresh lists x 2 seeds; the lists share no caption with the
    // held-out list, the training prompts or the manifest; pooled = all cells' samples.
    assert_eq!(report.robustness.len(), 8, "{table}");
    assert!(table.contains("fresh prompt lists"), "{table}");
    let r = &report.robustness[0];
    assert_eq!(r.method, "dpo");
    let seeds: Vec<(u64, u64)> = r
        .cells
        .iter()
        .map(|c| (c.list_seed, c.sample_seed))
        .collect();
    let s0 = cfg.run.eval.seed;
    assert_eq!(
        seeds,
        vec![
            (1000, s0 + 1),
            (1000, s0 + 2),
            (1001, s0 + 1),
            (1001, s0 + 2)
        ]
    );
    assert_eq!(r.pooled.n, 4 * 2 * 2);
    let cell_mean = r.cells.iter().map(|c| c.change.mean).sum::<f64>() / 4.0;
    assert!((r.pooled.mean - cell_mean).abs() < 1e-9);
    assert_eq!(
        r.every_cell_beyond_ci,
        r.cells.iter().all(|c| c.change.mean > c.change.ci95)
    );
    let train = read_prompts(cfgs.grpo.grpo.prompts.as_ref().unwrap(), true).unwrap();
    let manifest = std::fs::read_to_string(cfg.data.manifest.as_ref().unwrap()).unwrap();
    assert_eq!(report.fresh_lists.len(), 2);
    for (seed, list) in &report.fresh_lists {
        assert_eq!(list.len(), 2, "list {seed}");
        for c in list {
            assert!(
                !train.contains(c)
                    && !prompts.contains(c)
                    && !manifest.contains(&format!("\"{c}\"")),
                "{c}"
            );
        }
    }
    assert!(report.fresh_lists[0]
        .1
        .iter()
        .all(|c| !report.fresh_lists[1].1.contains(c)));

    // The base row is reproducible: the same prompts and seeds sampled again give the same mean reward.
    let model = diffpref::pipelines::loading::StableDiffusion::load(
        cfg.run.model.as_ref(),
        &Default::default(),
    )
    .unwrap();
    let opts = SampleOptions {
        samples_per_prompt: 2,
        steps: 4,
        guidance: cfg.run.eval.guidance,
        scheduler: None,
        seed: cfg.run.eval.seed,
        batch_size: 32,
    };
    let again = sample_and_score(&model, &prompts, &opts, &ShapesReward::new(), None).unwrap();
    let mean = again.rewards.iter().sum::<f64>() / again.rewards.len() as f64;
    assert!(
        (mean - base.reward.mean).abs() < 1e-6,
        "{mean} vs {}",
        base.reward.mean
    );
}

/// `--train-seeds 2`: every method trained twice with its seeds + 0 and + 1 (different LoRAs, one row each on
/// the same base noise), and a summary per method whose changes are the rows' and whose interval is the
/// Student-t one across seeds; with a fresh list, the per-seed pooled fresh changes too.
#[test]
fn bench_align_trains_each_method_with_several_seeds() {
    let out = tempfile::tempdir().unwrap();
    let lists = tempfile::tempdir().unwrap();
    let (cfg, _) = small_dpo(out.path(), lists.path(), 2, &["eval.steps=3", "seed=5"]);
    let q: &[String] = &["log.progress=false".into()];
    let cfgs = AlignConfigs {
        dpo: cfg.clone(),
        grpo: default_grpo_config(q).unwrap(),
        lrm: default_lrm_config(q).unwrap(),
        lpo: default_lpo_config(q).unwrap(),
        spm: default_spm_config(q).unwrap(),
        spo: default_spo_config(q).unwrap(),
        seppo: default_seppo_config(q).unwrap(),
        adjoint: default_adjoint_config(q).unwrap(),
        robustness: Robustness {
            lists: 1,
            seeds: 1,
            prompts: 2,
        },
        train_seeds: 2,
    };
    // Zero seeds is refused before anything is written.
    let none = out.path().join("none");
    let zero = AlignConfigs {
        train_seeds: 0,
        ..cfgs.clone()
    };
    let err = run_align(&zero, &["dpo".into()], &none, false).unwrap_err();
    assert!(format!("{err:#}").contains("--train-seeds"), "{err:#}");
    assert!(!none.exists());
    let report = run_align(&cfgs, &["dpo".into()], out.path(), false).unwrap();
    let table = format_table(&report);
    eprintln!("{table}");
    let names: Vec<&str> = report.rows.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(names, ["base", "dpo@seed5", "dpo@seed6"], "{table}");
    assert_eq!(
        report.rows.iter().map(|r| r.seed).collect::<Vec<_>>(),
        [None, Some(5), Some(6)]
    );
    // The two seeds trained different LoRAs (another draw of pairs, timesteps and noise).
    let load = |r: &diffpref::align::AlignRow| {
        candle_core::safetensors::load(r.weights.as_ref().unwrap(), &candle_core::Device::Cpu)
            .unwrap()
    };
    let (a, b) = (load(&report.rows[1]), load(&report.rows[2]));
    assert_eq!(a.len(), b.len());
    let differs = a.iter().any(|(k, t)| {
        let d = (t - &b[k]).unwrap().abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap() > 0.0
    });
    assert!(differs, "the two seeds' LoRAs are identical");
    assert_eq!(report.seed_summaries.len(), 1);
    let s = &report.seed_summaries[0];
    assert_eq!(
        (s.method.as_str(), s.seeds.as_slice()),
        ("dpo", &[5, 6][..])
    );
    let row_changes: Vec<f64> = report.rows[1..]
        .iter()
        .map(|r| r.difference.unwrap().mean)
        .collect();
    assert_eq!(s.changes, row_changes);
    let mean = (row_changes[0] + row_changes[1]) / 2.0;
    assert!((s.change.mean - mean).abs() < 1e-12);
    // Two seeds: the t quantile with one degree of freedom (12.706) times the standard error.
    let sd = (row_changes[0] - row_changes[1]).abs() / 2f64.sqrt();
    assert!((s.change.std - sd).abs() < 1e-12);
    assert!((s.change.ci95 - 12.706 * sd / 2f64.sqrt()).abs() < 1e-3 * (1.0 + sd));
    let fresh: Vec<f64> = report.robustness.iter().map(|r| r.pooled.mean).collect();
    assert_eq!(fresh.len(), 2);
    assert_eq!(s.fresh_changes, fresh);
    assert!(s.fresh_change.is_some());
    assert!(table.contains("over training seeds"), "{table}");
    // A shapes judge: each trained row carries the exact reward's terms; their `reward` is the row's change.
    assert!(report.rows[0].terms.is_none());
    for r in &report.rows[1..] {
        let t = r.terms.as_ref().unwrap();
        let reward = t.iter().find(|t| t.term == "reward").unwrap();
        assert!((reward.change.mean - r.difference.unwrap().mean).abs() < 1e-6);
    }
    assert!(out.path().join("dpo@seed6").exists());
}
