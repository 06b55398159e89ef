//! Shapes world on the command line: `data render`, `data make-prefs` (tiny-sd fixture, random weights: plumbing
//! only) and `score --reward shapes`.

use diffpref::data::manifest::{load_manifest, ManifestOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn diffpref(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diffpref"))
        .args(args)
        .output()
        .expect("run diffpref")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "diffpref failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn fails(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// `diffpref score --reward shapes ARGS --json`, parsed.
fn score_shapes(args: &[&str]) -> serde_json::Value {
    let out = diffpref(&[&["score", "--reward", "shapes", "--json"], args].concat());
    serde_json::from_str(&ok(&out)).unwrap()
}

const CAPTIONS: &str =
    "a red circle above a blue square\n\n# comment\ntwo green triangles\na large yellow square\n";

#[test]
fn render_then_score_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, CAPTIONS).unwrap();
    let out = dir.path().join("gt");
    let p = prompts.to_str().unwrap();
    ok(&diffpref(&[
        "data",
        "render",
        "--prompts",
        p,
        "--out",
        out.to_str().unwrap(),
        "--size",
        "48",
    ]));
    let manifest = out.join("manifest.jsonl");
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert_eq!(text.lines().count(), 3);
    assert!(
        text.contains("\"prompt\":\"two green triangles\""),
        "{text}"
    );
    let img = image::open(out.join("00000.png")).unwrap();
    assert_eq!((img.width(), img.height()), (48, 48));
    // Scoring needs no --weights; every ground-truth render scores high for its caption.
    let v = score_shapes(&["--manifest", manifest.to_str().unwrap()]);
    assert_eq!(v["reward"], "shapes");
    for r in v["results"].as_array().unwrap() {
        assert!(r["score"].as_f64().unwrap() > 0.9, "{r}");
    }
    // --terms: a render has every requested object in its colour and nothing else; the relation is only
    // reported for the caption that states one.
    let v = score_shapes(&["--manifest", manifest.to_str().unwrap(), "--terms"]);
    for (i, r) in v["results"].as_array().unwrap().iter().enumerate() {
        let t = &r["terms"];
        assert_eq!(t["colour"], 1.0, "{r}");
        assert_eq!(t["count"], 1.0, "{r}");
        assert!(
            (t["reward"].as_f64().unwrap() - r["score"].as_f64().unwrap()).abs() < 1e-6,
            "{r}"
        );
        assert_eq!(t["relation"].is_null(), i != 0, "{r}");
    }
    // A wrong caption scores lower.
    let v = score_shapes(&[
        "--images",
        out.join("00001.png").to_str().unwrap(),
        "--prompt",
        "a purple circle",
    ]);
    assert!(v["mean"].as_f64().unwrap() < 0.5, "{v}");
    // Random scenes render too, deterministically.
    let r1 = dir.path().join("r1");
    let r2 = dir.path().join("r2");
    for r in [&r1, &r2] {
        ok(&diffpref(&[
            "data",
            "render",
            "--random",
            "5",
            "--seed",
            "3",
            "--out",
            r.to_str().unwrap(),
            "--size",
            "32",
        ]));
    }
    assert_eq!(
        std::fs::read(r1.join("manifest.jsonl")).unwrap(),
        std::fs::read(r2.join("manifest.jsonl")).unwrap()
    );
    assert_eq!(
        std::fs::read(r1.join("00004.png")).unwrap(),
        std::fs::read(r2.join("00004.png")).unwrap()
    );
}

#[test]
fn bad_inputs_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("bad.txt");
    std::fs::write(&prompts, "a red circle\na dog on a sofa\n").unwrap();
    let e = fails(&diffpref(&[
        "data",
        "render",
        "--prompts",
        prompts.to_str().unwrap(),
        "--out",
        dir.path().join("o").to_str().unwrap(),
    ]));
    assert!(
        e.contains("line 2") && e.contains("not a shapes caption"),
        "{e}"
    );
    let e = fails(&diffpref(&[
        "score", "--reward", "clip", "--images", "x.png", "--prompt", "p",
    ]));
    assert!(e.contains("--weights"), "{e}");
    let e = fails(&diffpref(&[
        "score",
        "--reward",
        "clip",
        "--weights",
        "w",
        "--images",
        "x.png",
        "--prompt",
        "p",
        "--terms",
    ]));
    assert!(e.contains("--terms") && e.contains("shapes"), "{e}");
}

#[test]
fn make_prefs_on_tiny_sd() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, CAPTIONS).unwrap();
    let model = fixtures().join("tiny-sd");
    // `data make-prefs` for two pairs of 2-step samples, seed 5, with `extra` arguments.
    let make = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "data",
            "make-prefs",
            "--model",
            model.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--pairs",
            "2",
            "--steps",
            "2",
            "--out",
            out.to_str().unwrap(),
            "--seed",
            "5",
        ];
        args.extend_from_slice(extra);
        diffpref(&args)
    };
    let run = |out: &Path| ok(&make(out, &["--batch-size", "1"]));
    let out = dir.path().join("prefs");
    let stdout = run(&out);
    assert!(stdout.contains("2 pairs"), "{stdout}");
    for name in [
        "img/00000-a.png",
        "img/00000-b.png",
        "img/00001-a.png",
        "img/00001-b.png",
    ] {
        assert!(out.join(name).is_file(), "{name}");
    }
    let manifest = out.join("manifest.jsonl");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["prompt"], "a red circle above a blue square");
    assert_eq!(lines[1]["prompt"], "two green triangles");
    for l in &lines {
        let (rc, rr) = (
            l["reward_chosen"].as_f64().unwrap(),
            l["reward_rejected"].as_f64().unwrap(),
        );
        assert!((0.0..=1.0).contains(&rc) && (0.0..=1.0).contains(&rr));
        let p = l["p_chosen"].as_f64().unwrap();
        let expect = 1.0 / (1.0 + (-(rc - rr) / 0.05).exp());
        assert!((p - expect).abs() < 1e-5, "{l}");
        assert_ne!(l["chosen"], l["rejected"]);
    }
    // The two samples of a pair differ (different noise).
    assert_ne!(
        std::fs::read(out.join("img/00000-a.png")).unwrap(),
        std::fs::read(out.join("img/00000-b.png")).unwrap()
    );
    // The DPO loader reads it (extra keys ignored).
    let (pairs, skipped) = load_manifest(&manifest, &ManifestOptions::default()).unwrap();
    assert_eq!(pairs.len(), 2);
    assert!(skipped.is_empty());
    // Each image's sampler latent is stored next to it and decodes to its PNG.
    let sd = diffpref::pipelines::loading::StableDiffusion::load(
        &model,
        &diffpref::pipelines::loading::LoadOptions::default(),
    )
    .unwrap();
    for (p, l) in pairs.iter().zip(&lines) {
        let (c, _) = p.latents.as_ref().expect("make-prefs names the latents");
        assert_eq!(c, &out.join(l["chosen_latent"].as_str().unwrap()), "{l}");
        let z = diffpref::data::latents::load_latent(c)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let img = sd.vae.decode_to_image01(&z).unwrap();
        let png = diffpref::imaging::load_image(&p.chosen).unwrap();
        let png = diffpref::imaging::images_to_tensor(&[png], &candle_core::Device::Cpu).unwrap();
        let d = (img - png)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            d < 0.02,
            "latent of {} decodes {d} away from the PNG",
            p.source
        );
    }
    // --renders: hard negatives from the renderer, at the model's image size, the chosen scoring higher.
    let rendered = dir.path().join("rendered");
    let stdout = ok(&make(&rendered, &["--renders"]));
    assert!(stdout.contains("2 pairs"), "{stdout}");
    let text_r = std::fs::read_to_string(rendered.join("manifest.jsonl")).unwrap();
    assert_eq!(text_r.lines().count(), 2);
    for l in text_r.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(
            v["reward_chosen"].as_f64() > v["reward_rejected"].as_f64(),
            "{l}"
        );
        let img = image::open(rendered.join(v["chosen"].as_str().unwrap())).unwrap();
        assert_eq!(img.width(), 32);
    }
    // Same arguments, same files.
    let same = dir.path().join("same");
    run(&same);
    assert_eq!(
        std::fs::read_to_string(same.join("manifest.jsonl")).unwrap(),
        text
    );
    assert_eq!(
        std::fs::read(same.join("img/00001-b.png")).unwrap(),
        std::fs::read(out.join("img/00001-b.png")).unwrap()
    );
    // A batch of two pairs samples the same pairs as two batches of one (up to float rounding).
    let again = dir.path().join("again");
    ok(&make(&again, &["--batch-size", "2"]));
    let text2 = std::fs::read_to_string(again.join("manifest.jsonl")).unwrap();
    for (l, m) in lines.iter().zip(text2.lines()) {
        let m: serde_json::Value = serde_json::from_str(m).unwrap();
        assert_eq!(l["prompt"], m["prompt"]);
        let d = (l["reward_chosen"].as_f64().unwrap() + l["reward_rejected"].as_f64().unwrap())
            - (m["reward_chosen"].as_f64().unwrap() + m["reward_rejected"].as_f64().unwrap());
        assert!(d.abs() < 0.02, "{l} vs {m}");
    }
    // --candidates 3 keeps the best and the worst of a superset of the two samples: gaps never shrink.
    let three = dir.path().join("three");
    ok(&make(&three, &["--batch-size", "2", "--candidates", "3"]));
    let gap = |v: &serde_json::Value| {
        (v["reward_chosen"].as_f64().unwrap() - v["reward_rejected"].as_f64().unwrap()).abs()
    };
    let text3 = std::fs::read_to_string(three.join("manifest.jsonl")).unwrap();
    for (m, t) in text2.lines().zip(text3.lines()) {
        let (m, t): (serde_json::Value, serde_json::Value) = (
            serde_json::from_str(m).unwrap(),
            serde_json::from_str(t).unwrap(),
        );
        assert!(gap(&t) >= gap(&m) - 0.02, "{t} vs {m}");
    }
    let bad = make(&dir.path().join("bad"), &["--candidates", "1"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--candidates"));
    // score --pairs agrees with the manifest's rewards.
    let v = score_shapes(&["--pairs", manifest.to_str().unwrap()]);
    assert!(v.get("terms").is_none());
    for (item, l) in v["items"].as_array().unwrap().iter().zip(&lines) {
        assert!(
            (item["score_chosen"].as_f64().unwrap() - l["reward_chosen"].as_f64().unwrap()).abs()
                < 1e-4
        );
    }
    // --terms: per term over the pairs; the reward term's difference is the mean score gap.
    let t = score_shapes(&["--pairs", manifest.to_str().unwrap(), "--terms"]);
    let items = t["items"].as_array().unwrap();
    let gap = items
        .iter()
        .map(|i| i["score_chosen"].as_f64().unwrap() - i["score_rejected"].as_f64().unwrap())
        .sum::<f64>()
        / items.len() as f64;
    let terms = t["terms"].as_array().unwrap();
    let reward = terms.iter().find(|x| x["term"] == "reward").unwrap();
    assert!(
        (reward["difference"]["mean"].as_f64().unwrap() - gap).abs() < 1e-5,
        "{reward} vs {gap}"
    );
    assert!(
        (reward["preferred"].as_f64().unwrap() - reward["other"].as_f64().unwrap() - gap).abs()
            < 1e-5,
        "{reward}"
    );
    assert_eq!(
        terms.len(),
        10 - usize::from(terms.iter().all(|x| x["term"] != "relation"))
    );
}
