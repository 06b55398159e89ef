//! `diffpref score` (images, manifests, preference pairs) and `diffpref verify` on the reward goldens.

use candle_core::{DType, Device};
use diffpref::imaging::images_to_tensor;
use diffpref_pipelines::golden::Golden;
use diffpref_rewards::metrics::{wilson_interval, Z95};
use diffpref_rewards::{Aesthetic, ClipLoadOptions, ClipReward, ClipScoring, Reward};
use image::{Rgb, RgbImage};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn fx(name: &str) -> String {
    fixtures().join(name).display().to_string()
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
    assert!(
        !out.status.success(),
        "expected a failure, got:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// A w x h test image with a seed-dependent pattern.
fn pattern(w: u32, h: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            ((x * 7 + y * 3 + seed * 50) % 256) as u8,
            ((x * y + seed * 20) % 256) as u8,
            ((y * 5 + seed * 90) % 256) as u8,
        ])
    })
}

/// Writes `n` 64x48 PNGs (and one 40x40) into `dir`; returns their paths in name order.
fn write_pngs(dir: &Path, n: u32) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        let p = dir.join(format!("img{i}.png"));
        pattern(64, 48, i).save(&p).unwrap();
        out.push(p);
    }
    let p = dir.join(format!("img{n}.png"));
    pattern(40, 40, n).save(&p).unwrap();
    out.push(p);
    out
}

/// Library PickScore of one PNG with one prompt.
fn pickscore(path: &Path, prompt: &str) -> f64 {
    let r = ClipReward::load_pickscore(fixtures().join("tiny-clip-hf"), DType::F32, &Device::Cpu)
        .unwrap();
    let img = image::open(path).unwrap().to_rgb8();
    let x = images_to_tensor(&[img], &Device::Cpu).unwrap();
    r.score(&x, &[prompt]).unwrap().to_vec1::<f32>().unwrap()[0] as f64
}

/// The tokenizer of tiny-open-clip: its own (a small CLIP tokenizer) when it has one, else the CLIP tokenizer
/// beside it (open_clip checkpoints ship none).
fn oc_tokenizer() -> std::path::PathBuf {
    diffpref_rewards::clip::find_tokenizer_dir(&fixtures().join("tiny-open-clip"))
        .unwrap_or_else(|| fixtures().join("clip-tokenizer"))
}

/// The library's HPS scorer as `diffpref score --reward hps --weights tiny-open-clip --tokenizer TOK` builds it
/// (the model ships an open_clip config, so no fallback config).
fn hps_reward() -> ClipReward {
    ClipReward::load(
        fixtures().join("tiny-open-clip"),
        ClipScoring::Hps,
        &ClipLoadOptions {
            tokenizer: Some(oc_tokenizer()),
            ..Default::default()
        },
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

/// The library's aesthetic predictor as `diffpref score --reward aesthetic --weights tiny-aesthetic --clip
/// tiny-clip-hf` builds it.
fn aesthetic_reward() -> Aesthetic {
    Aesthetic::load(
        fixtures().join("tiny-aesthetic"),
        fixtures().join("tiny-clip-hf"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

/// `reward`'s score of one PNG (with `prompt`, if any), from the decoded pixels as the CLI reads them.
fn library_score(reward: &dyn Reward, path: &Path, prompt: Option<&str>) -> f64 {
    let img = image::open(path).unwrap().to_rgb8();
    let x = images_to_tensor(&[img], &Device::Cpu).unwrap();
    let prompts: Vec<&str> = prompt.into_iter().collect();
    reward
        .score(&x, &prompts)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0] as f64
}

/// The CLI's JSON `results`: (image, score) in output order, and the reported mean.
fn cli_results(v: &serde_json::Value) -> (Vec<(String, f64)>, f64) {
    let r = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["image"].as_str().unwrap().to_string(),
                x["score"].as_f64().unwrap(),
            )
        })
        .collect();
    (r, v["mean"].as_f64().unwrap())
}

#[test]
fn score_json_matches_the_library_for_files_and_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let files = write_pngs(&tmp.path().join("imgs"), 3);
    let prompt = "a red cube on a blue sphere";
    let out = ok(&diffpref(&[
        "score",
        "--reward",
        "pickscore",
        "--weights",
        &fx("tiny-clip-hf"),
        "--images",
        tmp.path().join("imgs").to_str().unwrap(),
        "--prompt",
        prompt,
        "--batch-size",
        "2",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["reward"], "pickscore");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 4, "3 landscape PNGs and one square one");
    let mut sum = 0.0;
    for (r, f) in results.iter().zip(&files) {
        assert_eq!(r["image"].as_str().unwrap(), f.display().to_string());
        assert_eq!(r["prompt"], prompt);
        let s = r["score"].as_f64().unwrap();
        let expected = pickscore(f, prompt);
        assert!(
            (s - expected).abs() < 1e-4 * (1.0 + expected.abs()),
            "{}: {s} vs {expected}",
            f.display()
        );
        sum += s;
    }
    assert!((v["mean"].as_f64().unwrap() - sum / 4.0).abs() < 1e-9);
    // Distinct images score differently (the reward looks at the pixels).
    let s0 = results[0]["score"].as_f64().unwrap();
    assert!(results[1..]
        .iter()
        .all(|r| r["score"].as_f64().unwrap() != s0));

    // --prompts FILE (one per image) and plain-text output.
    let pf = tmp.path().join("prompts.txt");
    std::fs::write(&pf, "a\nb\n").unwrap();
    let out = ok(&diffpref(&[
        "score",
        "--reward",
        "clip",
        "--weights",
        &fx("tiny-clip-hf"),
        "--images",
        files[0].to_str().unwrap(),
        files[1].to_str().unwrap(),
        "--prompts",
        pf.to_str().unwrap(),
    ]));
    assert!(
        out.contains("img0.png  a") && out.contains("img1.png  b") && out.contains("clip: mean"),
        "{out}"
    );
    // Mismatched prompt count is an error naming the file.
    std::fs::write(&pf, "only one\n").unwrap();
    let err = fails(&diffpref(&[
        "score",
        "--reward",
        "clip",
        "--weights",
        &fx("tiny-clip-hf"),
        "--images",
        files[0].to_str().unwrap(),
        files[1].to_str().unwrap(),
        "--prompts",
        pf.to_str().unwrap(),
    ]));
    assert!(
        err.contains("prompts.txt") && err.contains("1 prompts for 2 images"),
        "{err}"
    );
}

#[test]
fn score_manifest_hps_and_aesthetic() {
    let tmp = tempfile::tempdir().unwrap();
    write_pngs(&tmp.path().join("imgs"), 2);
    let manifest = tmp.path().join("m.jsonl");
    std::fs::write(
        &manifest,
        "{\"image\": \"imgs/img0.png\", \"prompt\": \"a horse\"}\n\n{\"image\": \"imgs/img2.png\", \"prompt\": \"a lighthouse\"}\n",
    )
    .unwrap();
    let out = ok(&diffpref(&[
        "score",
        "--reward",
        "hps",
        "--weights",
        &fx("tiny-open-clip"),
        "--tokenizer",
        oc_tokenizer().to_str().unwrap(),
        "--manifest",
        manifest.to_str().unwrap(),
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["reward"], "hps");
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0]["prompt"], "a horse");
    assert_eq!(r[1]["prompt"], "a lighthouse");
    // The library scorer the CLI should be running is the golden one: on the golden's own images and prompts it
    // reproduces `hps_score` of tests/fixtures/golden/open_clip.safetensors (whose float images no PNG can hold).
    let hps = hps_reward();
    let g = Golden::load(fixtures().join("golden/open_clip.safetensors")).unwrap();
    let gp: Vec<String> = serde_json::from_str(&g.metadata["prompts"]).unwrap();
    let gp: Vec<&str> = gp.iter().map(|s| s.as_str()).collect();
    let c = g
        .compare(
            "hps_score",
            &hps.score(g.get("images").unwrap(), &gp).unwrap(),
            1.0,
        )
        .unwrap();
    assert!(c.passed, "{c}");
    // Each CLI score is the library's HPS of that manifest row's image and prompt, to 1e-5.
    let (scores, mean) = cli_results(&v);
    let dir = tmp.path();
    let mut sum = 0.0;
    for ((image, s), (file, prompt)) in scores.iter().zip([
        ("imgs/img0.png", "a horse"),
        ("imgs/img2.png", "a lighthouse"),
    ]) {
        assert_eq!(Path::new(image), dir.join(file), "row order");
        let want = library_score(&hps, &dir.join(file), Some(prompt));
        assert!(
            (s - want).abs() < 1e-5,
            "{file}: CLI HPS {s} vs library {want}"
        );
        assert!(s.abs() <= 1.0 + 1e-6, "HPS is a cosine: {s}");
        sum += s;
    }
    assert!((mean - sum / 2.0).abs() < 1e-9, "mean {mean} of {scores:?}");
    assert!(
        (scores[0].1 - scores[1].1).abs() > 1e-4,
        "two images and prompts, one score: {scores:?}"
    );
    // The aesthetic predictor needs no prompt but its backbone.
    let imgs = tmp.path().join("imgs");
    let err = fails(&diffpref(&[
        "score",
        "--reward",
        "aesthetic",
        "--weights",
        &fx("tiny-aesthetic"),
        "--images",
        imgs.to_str().unwrap(),
    ]));
    assert!(err.contains("--clip"), "{err}");
    let out = ok(&diffpref(&[
        "score",
        "--reward",
        "aesthetic",
        "--weights",
        &fx("tiny-aesthetic"),
        "--clip",
        &fx("tiny-clip-hf"),
        "--images",
        imgs.to_str().unwrap(),
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["reward"], "aesthetic");
    // Likewise: the library predictor reproduces the aesthetic golden's `score`, and the CLI's scores of the
    // three PNGs (two 64x48, one 40x40, in name order) are the library's, to 1e-5.
    let aes = aesthetic_reward();
    let g = Golden::load(fixtures().join("golden/aesthetic.safetensors")).unwrap();
    let c = g
        .compare(
            "score",
            &aes.score(g.get("images").unwrap(), &[]).unwrap(),
            1.0,
        )
        .unwrap();
    assert!(c.passed, "{c}");
    let (scores, mean) = cli_results(&v);
    assert_eq!(scores.len(), 3);
    let mut sum = 0.0;
    for (i, (image, s)) in scores.iter().enumerate() {
        let file = imgs.join(format!("img{i}.png"));
        assert_eq!(Path::new(image), file, "row order");
        let want = library_score(&aes, &file, None);
        assert!(
            (s - want).abs() < 1e-5,
            "{}: CLI aesthetic {s} vs library {want}",
            file.display()
        );
        sum += s;
    }
    assert!((mean - sum / 3.0).abs() < 1e-9, "mean {mean} of {scores:?}");
    assert!(
        scores.iter().any(|(_, s)| (s - scores[0].1).abs() > 1e-6),
        "three images, one aesthetic score: {scores:?}"
    );
    let err = fails(&diffpref(&[
        "score",
        "--reward",
        "shapes",
        "--weights",
        "x",
        "--images",
        imgs.to_str().unwrap(),
    ]));
    // The shapes reward needs no weights but does need prompts.
    assert!(err.contains("scores images against prompts"), "{err}");
}

#[test]
fn pairs_report_accuracy_with_wilson_interval() {
    let tmp = tempfile::tempdir().unwrap();
    let files = write_pngs(&tmp.path().join("imgs"), 3);
    let prompt = "a photograph of an astronaut riding a horse";
    let s: Vec<f64> = files.iter().map(|f| pickscore(f, prompt)).collect();
    let name = |i: usize| format!("imgs/img{i}.png");
    // (hi, lo): the image with the higher score first.
    let order = |i: usize, j: usize| if s[i] > s[j] { (i, j) } else { (j, i) };
    let (a, b) = order(0, 1);
    let (c, d) = order(2, 3);
    let (e, f) = order(0, 3);
    let lines = [
        // The reward agrees: the higher-scored image is chosen (default label 1).
        format!("{{\"prompt\": \"{prompt}\", \"chosen\": \"{}\", \"rejected\": \"{}\"}}", name(a), name(b)),
        // Agrees: label 0 says `rejected` is preferred, and it scores higher.
        format!("{{\"prompt\": \"{prompt}\", \"chosen\": \"{}\", \"rejected\": \"{}\", \"label\": 0}}", name(d), name(c)),
        // Disagrees: the lower-scored image is chosen.
        format!("{{\"prompt\": \"{prompt}\", \"chosen\": \"{}\", \"rejected\": \"{}\", \"label\": 1.0}}", name(f), name(e)),
        // A tie label: left out.
        format!("{{\"prompt\": \"{prompt}\", \"chosen\": \"{}\", \"rejected\": \"{}\", \"label\": 0.5}}", name(0), name(1)),
    ];
    let pairs = tmp.path().join("pairs.jsonl");
    std::fs::write(&pairs, lines.join("\n")).unwrap();
    let out = ok(&diffpref(&[
        "score",
        "--reward",
        "pickscore",
        "--weights",
        &fx("tiny-clip-hf"),
        "--pairs",
        pairs.to_str().unwrap(),
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["pairs"], 3);
    assert_eq!(v["correct"], 2);
    assert_eq!(v["label_ties"], 1);
    assert_eq!(v["ci_method"], "wilson");
    assert!((v["accuracy"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12);
    let (lo, hi) = wilson_interval(2.0, 3.0, Z95);
    assert!(
        (v["ci95"][0].as_f64().unwrap() - lo).abs() < 1e-12
            && (v["ci95"][1].as_f64().unwrap() - hi).abs() < 1e-12
    );
    assert!(
        (lo - 0.2077).abs() < 1e-3 && (hi - 0.9385).abs() < 1e-3,
        "({lo}, {hi})"
    );
    let items = v["items"].as_array().unwrap();
    assert!((items[0]["score_chosen"].as_f64().unwrap() - s[a]).abs() < 1e-4 * (1.0 + s[a].abs()));
    // Text output carries the same summary.
    let out = ok(&diffpref(&[
        "score",
        "--reward",
        "pickscore",
        "--weights",
        &fx("tiny-clip-hf"),
        "--pairs",
        pairs.to_str().unwrap(),
    ]));
    assert!(
        out.contains("2 of 3 pairs") && out.contains("accuracy 0.6667") && out.contains("Wilson"),
        "{out}"
    );
    // A bad label names the file and line.
    std::fs::write(&pairs, format!("{}\n{{\"prompt\": \"p\", \"chosen\": \"imgs/img0.png\", \"rejected\": \"imgs/img1.png\", \"label\": 3}}\n", lines[0])).unwrap();
    let err = fails(&diffpref(&[
        "score",
        "--reward",
        "pickscore",
        "--weights",
        &fx("tiny-clip-hf"),
        "--pairs",
        pairs.to_str().unwrap(),
    ]));
    assert!(
        err.contains("pairs.jsonl line 2") && err.contains("label"),
        "{err}"
    );
}

#[test]
fn verify_runs_the_reward_goldens() {
    let g = |n: &str| fixtures().join("golden").join(n).display().to_string();
    let out = ok(&diffpref(&[
        "verify",
        &g("clip_hf.safetensors"),
        &g("open_clip.safetensors"),
        &g("aesthetic.safetensors"),
    ]));
    assert!(out.contains(" 0 failed, 0 errors"), "{out}");
    for t in [
        "grad_images",
        "pickscore",
        "hps_score",
        "head_collapsed_w",
        "resize_weight_h",
        "text_pooled",
    ] {
        assert!(out.contains(t), "`{t}` not reported:\n{out}");
    }
}

#[test]
fn score_with_a_latent_reward_model_on_images_at_a_timestep_and_pairs_per_band() {
    use diffpref_rewards::lrm::{LatentRewardModel, Trainable};
    let tmp = tempfile::tempdir().unwrap();
    let lrm_dir = tmp.path().join("lrm");
    std::fs::create_dir_all(&lrm_dir).unwrap();
    let lrm = LatentRewardModel::new_trainable(
        &fixtures().join("tiny-sd"),
        7.5,
        Trainable {
            unet: true,
            text_encoders: false,
        },
        3,
        &Device::Cpu,
    )
    .unwrap();
    lrm.save(&lrm_dir).unwrap();
    let imgs = tmp.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    for i in 0..3u32 {
        pattern(32, 32, i)
            .save(imgs.join(format!("{i}.png")))
            .unwrap();
    }
    let w = lrm_dir.display().to_string();
    let i = imgs.display().to_string();
    let score = |extra: &[&str]| -> Vec<f64> {
        let mut args = vec![
            "score",
            "--reward",
            "lrm",
            "--weights",
            &w,
            "--images",
            &i,
            "--prompt",
            "a red circle",
            "--json",
        ];
        args.extend_from_slice(extra);
        let doc: serde_json::Value = serde_json::from_str(&ok(&diffpref(&args))).unwrap();
        doc["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["score"].as_f64().unwrap())
            .collect()
    };
    let clean = score(&[]);
    // The library at t = 0 gives the same scores.
    let loaded = LatentRewardModel::load(&lrm_dir, DType::F32, &Device::Cpu).unwrap();
    let files: Vec<_> = (0..3)
        .map(|k| {
            image::open(imgs.join(format!("{k}.png")))
                .unwrap()
                .to_rgb8()
        })
        .collect();
    let x = images_to_tensor(&files, &Device::Cpu).unwrap();
    let lib: Vec<f32> = loaded
        .score(&x, &["a red circle"; 3])
        .unwrap()
        .to_vec1()
        .unwrap();
    for (a, b) in clean.iter().zip(&lib) {
        assert!((a - *b as f64).abs() < 1e-4, "{clean:?} vs {lib:?}");
    }
    // A timestep noises the latents: other scores, the same for the same seed.
    let noisy = score(&["--timestep", "500"]);
    assert_ne!(noisy, clean);
    assert_eq!(noisy, score(&["--timestep", "500"]));
    assert_ne!(noisy, score(&["--timestep", "500", "--seed", "1"]));

    // Pairs: accuracy per band with Wilson intervals.
    let pairs = tmp.path().join("pairs.jsonl");
    std::fs::write(
        &pairs,
        "{\"prompt\":\"a red circle\",\"chosen\":\"imgs/0.png\",\"rejected\":\"imgs/1.png\"}\n\
         {\"prompt\":\"a blue square\",\"chosen\":\"imgs/2.png\",\"rejected\":\"imgs/1.png\"}\n",
    )
    .unwrap();
    let p = pairs.display().to_string();
    let out = ok(&diffpref(&[
        "score",
        "--reward",
        "lrm",
        "--weights",
        &w,
        "--pairs",
        &p,
        "--bands",
        "0:300,300:1000",
        "--json",
    ]));
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let bands = doc["bands"].as_array().unwrap();
    assert_eq!(bands.len(), 2);
    for b in bands {
        assert_eq!(b["pairs"], 2);
        let (a, lo, hi) = (
            b["accuracy"].as_f64().unwrap(),
            b["ci"][0].as_f64().unwrap(),
            b["ci"][1].as_f64().unwrap(),
        );
        let right = (a * 2.0).round();
        let (wl, wh) = wilson_interval(right, 2.0, Z95);
        assert!((lo - wl).abs() < 1e-9 && (hi - wh).abs() < 1e-9);
    }
    let err = fails(&diffpref(&[
        "score",
        "--reward",
        "lrm",
        "--weights",
        &w,
        "--pairs",
        &p,
        "--bands",
        "500:100",
    ]));
    assert!(err.contains("--bands"), "{err}");
    let err = fails(&diffpref(&[
        "score",
        "--reward",
        "clip",
        "--weights",
        &w,
        "--images",
        &i,
        "--prompt",
        "x",
        "--timestep",
        "3",
    ]));
    assert!(err.contains("--timestep"), "{err}");
}

#[test]
fn score_with_a_step_aware_preference_model_on_images_at_a_timestep_and_pairs_per_band() {
    use diffpref_rewards::spm::{SpmBackbone, StepAwarePreferenceModel};
    let tmp = tempfile::tempdir().unwrap();
    let spm_dir = tmp.path().join("spm");
    std::fs::create_dir_all(&spm_dir).unwrap();
    let spm = StepAwarePreferenceModel::new_trainable(
        &SpmBackbone::Clip {
            path: fixtures().join("tiny-clip-hf"),
            tokenizer: None,
        },
        &fixtures().join("tiny-sd"),
        5.0,
        3,
        &Device::Cpu,
    )
    .unwrap();
    spm.save(&spm_dir).unwrap();
    let imgs = tmp.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    for i in 0..3u32 {
        pattern(32, 32, i)
            .save(imgs.join(format!("{i}.png")))
            .unwrap();
    }
    let w = spm_dir.display().to_string();
    let i = imgs.display().to_string();
    let score = |extra: &[&str]| -> Vec<f64> {
        let mut args = vec![
            "score",
            "--reward",
            "spm",
            "--weights",
            &w,
            "--images",
            &i,
            "--prompt",
            "a red circle",
            "--json",
        ];
        args.extend_from_slice(extra);
        let doc: serde_json::Value = serde_json::from_str(&ok(&diffpref(&args))).unwrap();
        doc["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["score"].as_f64().unwrap())
            .collect()
    };
    // At t = 0 an untrained SPM is its CLIP backbone: PickScore's exp(logit_scale) · cos.
    let clean = score(&[]);
    let files: Vec<_> = (0..3)
        .map(|k| {
            image::open(imgs.join(format!("{k}.png")))
                .unwrap()
                .to_rgb8()
        })
        .collect();
    let x = images_to_tensor(&files, &Device::Cpu).unwrap();
    let clip = diffpref_rewards::ClipModel::load(
        fixtures().join("tiny-clip-hf"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let pick = diffpref_rewards::ClipReward::new(
        std::sync::Arc::new(clip),
        diffpref_rewards::ClipScoring::PickScore,
    )
    .unwrap();
    let lib: Vec<f32> = pick
        .score(&x, &["a red circle"; 3])
        .unwrap()
        .to_vec1()
        .unwrap();
    for (a, b) in clean.iter().zip(&lib) {
        assert!((a - *b as f64).abs() < 1e-3, "{clean:?} vs {lib:?}");
    }
    // A timestep scores the x0 the diffusion model predicts from the noised image: other scores, the same for
    // the same seed.
    let noisy = score(&["--timestep", "500"]);
    assert_ne!(noisy, clean);
    assert_eq!(noisy, score(&["--timestep", "500"]));
    assert_ne!(noisy, score(&["--timestep", "500", "--seed", "1"]));
    // Pairs: accuracy per band.
    let pairs = tmp.path().join("pairs.jsonl");
    std::fs::write(
        &pairs,
        "{\"prompt\":\"a red circle\",\"chosen\":\"imgs/0.png\",\"rejected\":\"imgs/1.png\"}\n\
         {\"prompt\":\"a blue square\",\"chosen\":\"imgs/2.png\",\"rejected\":\"imgs/1.png\"}\n",
    )
    .unwrap();
    let p = pairs.display().to_string();
    let out = ok(&diffpref(&[
        "score",
        "--reward",
        "spm",
        "--weights",
        &w,
        "--pairs",
        &p,
        "--bands",
        "0:300,300:1000",
        "--json",
    ]));
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["reward"], "spm");
    let bands = doc["bands"].as_array().unwrap();
    assert_eq!(bands.len(), 2);
    assert!(bands.iter().all(|b| b["pairs"] == 2));
    // Not an SPM folder: named.
    let clip_dir = fixtures().join("tiny-clip-hf").display().to_string();
    let err = fails(&diffpref(&[
        "score",
        "--reward",
        "spm",
        "--weights",
        &clip_dir,
        "--images",
        &i,
        "--prompt",
        "x",
    ]));
    assert!(err.contains("spm_config.json"), "{err}");
}
