//! The main command in full: `diffpref train dpo` with no arguments (the embedded default,
//! assets/shapes/dpo.toml) raises the held-out shapes reward beyond its 95% confidence interval without
//! collapsing diversity, and writes its report files. About 9 minutes on 2 cores: the suite's longest test.

use diffpref::assets::default_dpo_config;
use diffpref::methods::pairwise::train;

/// As the binary: candle allocates a buffer per op, and glibc's malloc returns large ones to the kernel on
/// every free (see `diffpref::alloc`).
#[global_allocator]
static ALLOC: diffpref::alloc::MiMalloc = diffpref::alloc::MiMalloc;

#[test]
fn the_embedded_default_improves_the_held_out_reward_beyond_its_ci() {
    diffpref::alloc::retain_freed_memory();
    let out = tempfile::tempdir().unwrap();
    let cfg = default_dpo_config(&[
        "log.progress=false".into(),
        format!(
            "output_dir={:?}",
            out.path().join("run").display().to_string()
        ),
        format!(
            "data.cache_dir={:?}",
            out.path().join("cache").display().to_string()
        ),
    ])
    .unwrap();
    let s = train(&cfg, None).unwrap();
    assert_eq!(s.steps, cfg.run.optim.max_steps);
    let e = s.eval.expect("the default evaluates on held-out prompts");
    let c = &e.comparison;
    println!(
        "base {:.4} ± {:.4} (diversity {:?}), tuned {:.4} ± {:.4} (diversity {:?}), change {:+.4} ± {:.4}, \
         win rate {:.3}",
        c.base.reward.mean,
        c.base.reward.ci95,
        c.base.diversity,
        c.model.reward.mean,
        c.model.reward.ci95,
        c.model.diversity,
        c.difference.mean,
        c.difference.ci95,
        c.win_rate
    );
    assert_eq!(e.samples_per_prompt, cfg.run.eval.samples);
    assert!(
        c.improved_beyond_ci(),
        "held-out change {:+.4} ± {:.4} is within its 95% interval",
        c.difference.mean,
        c.difference.ci95
    );
    // Not by collapsing onto one image per prompt.
    let (b, m) = (c.base.diversity.unwrap(), c.model.diversity.unwrap());
    assert!(m > 0.8 * b, "diversity {b} -> {m}");
    for f in [
        "pytorch_lora_weights.safetensors",
        "metrics.jsonl",
        "curves.png",
        "before_after.png",
        "eval.json",
    ] {
        assert!(s.output_dir.join(f).exists(), "{f} missing");
    }
}
