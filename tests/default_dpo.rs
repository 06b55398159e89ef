//! The main command's path: `diffpref train dpo`'s embedded default (assets/shapes/dpo.toml: the tiny shapes
//! model, the demo preference set, its loss, timestep band, unconditional anchor, optimizer and budget) trained on
//! 350 of the demo set's 400 pairs prefers the chosen image of the 50 pairs it never saw, judged by the DPO
//! implicit accuracy and margin on those pairs (4 fixed noise and timestep draws each, the base model as
//! reference: exactly 1/2 and 0 for the base itself), and keeps the unconditional prediction at the base's.
//! Measured here: accuracy 0.59 of 200 draws, mean margin z +0.156, unconditional drift 4e-6 (without the anchor
//! a LoRA drifts ~7e-4). A broken path gives 1/2 and 0 exactly (no-op weights) or less (a sign error). The claim
//! about the held-out *reward* lives in the README and `bench align --fresh-lists` (measured, with intervals),
//! not in a test: its margin depends on the float trajectory.

use diffpref::assets::default_dpo_config;
use diffpref::methods::pairwise::{evaluate_pairs, train};
use std::path::Path;

/// As the binary: candle allocates a buffer per op, and glibc's malloc returns large ones to the kernel on
/// every free (see `diffpref::alloc`).
#[global_allocator]
static ALLOC: diffpref::alloc::MiMalloc = diffpref::alloc::MiMalloc;

/// The demo manifest's lines `range`, with their image and latent paths made absolute, as `dir/name`.
fn split(
    manifest: &Path,
    range: std::ops::Range<usize>,
    dir: &Path,
    name: &str,
) -> std::path::PathBuf {
    let manifest = manifest.canonicalize().unwrap();
    let base = manifest.parent().unwrap();
    let text = std::fs::read_to_string(&manifest).unwrap();
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()[range]
        .iter()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            for k in ["chosen", "rejected", "chosen_latent", "rejected_latent"] {
                if let Some(p) = v[k].as_str() {
                    v[k] = base.join(p).display().to_string().into();
                }
            }
            v.to_string()
        })
        .collect();
    let out = dir.join(name);
    std::fs::write(&out, lines.join("\n") + "\n").unwrap();
    out
}

#[test]
fn the_embedded_default_learns_preferences_that_hold_on_unseen_pairs() {
    diffpref::alloc::retain_freed_memory();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = default_dpo_config(&[
        "log.progress=false".into(),
        format!(
            "output_dir={:?}",
            tmp.path().join("run").display().to_string()
        ),
        format!(
            "data.cache_dir={:?}",
            tmp.path().join("cache").display().to_string()
        ),
    ])
    .unwrap();
    let demo = cfg.data.manifest.clone().unwrap();
    let n = std::fs::read_to_string(&demo)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    assert!(n >= 100, "{n} demo pairs");
    let held = n - 50;
    cfg.data.manifest = Some(split(&demo, 0..held, tmp.path(), "train.jsonl"));
    cfg.run.eval.prompts = None;
    let s = train(&cfg, None).unwrap();
    assert_eq!(s.steps, cfg.run.optim.max_steps);
    assert!(s
        .output_dir
        .join("pytorch_lora_weights.safetensors")
        .exists());

    let mut unseen = cfg.clone();
    unseen.data.manifest = Some(split(&demo, held..n, tmp.path(), "unseen.jsonl"));
    let base = evaluate_pairs(&unseen, None, 7, 4).unwrap();
    let tuned = evaluate_pairs(&unseen, Some(&s.weights), 7, 4).unwrap();
    println!("base {base:?}\ntuned {tuned:?}");
    assert!((base.loss - std::f64::consts::LN_2).abs() < 1e-6 && base.implicit_acc == 0.5);
    assert_eq!(tuned.pairs, (n - held) * 4);
    assert!(
        tuned.implicit_acc > 0.5,
        "unseen-pair accuracy {}",
        tuned.implicit_acc
    );
    assert!(tuned.margin > 0.0, "unseen-pair margin {}", tuned.margin);
    assert!(
        tuned.reward_chosen > tuned.reward_rejected,
        "implicit rewards {} (chosen) vs {} (rejected)",
        tuned.reward_chosen,
        tuned.reward_rejected
    );
    assert!(
        tuned.uncond_drift < 5e-5,
        "unconditional drift {}",
        tuned.uncond_drift
    );
}
