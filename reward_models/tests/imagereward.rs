//! ImageReward parity with the reference (`tests/fixtures/golden/imagereward.safetensors`, made by
//! image-reward 1.5's own BLIP / MED code on `tests/fixtures/tiny-imagereward`), gradients (autograd vs the
//! golden and vs finite differences) and loader errors.

use candle_core::{DType, Device, Tensor, Var};
use diffpref_pipelines::checks::CheckContext;
use diffpref_pipelines::golden::{Comparison, Golden};
use diffpref_rewards::imagereward::{check_imagereward, ImageReward, ImageRewardTokenizer};
use diffpref_rewards::Reward;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn model_dir() -> PathBuf {
    fixtures().join("tiny-imagereward")
}

fn golden() -> Golden {
    Golden::load(fixtures().join("golden/imagereward.safetensors")).expect("golden loads")
}

fn prompts(g: &Golden) -> Vec<String> {
    serde_json::from_str(g.meta("prompts").unwrap()).unwrap()
}

fn load() -> ImageReward {
    ImageReward::load(&model_dir(), DType::F32, &Device::Cpu).expect("tiny-imagereward loads")
}

fn assert_pass(c: &Comparison) {
    println!("{c}");
    assert!(c.passed, "{c}");
}

#[test]
fn tokenizer_matches_reference_ids_and_mask() {
    let g = golden();
    let model = load();
    let p = prompts(&g);
    let refs: Vec<&str> = p.iter().map(|s| s.as_str()).collect();
    let (ids, mask) = model.tokenize(&refs).unwrap();
    assert_eq!(ids.dims(), &[3, 35]);
    assert_pass(&g.compare("input_ids", &ids, 1.0).unwrap());
    assert_pass(&g.compare("attention_mask", &mask, 1.0).unwrap());
    // [CLS] first; the third prompt is truncated (no padding, [SEP] last).
    let rows: Vec<Vec<i64>> = ids.to_vec2().unwrap();
    let cls = model.tokenizer.token_to_id("[CLS]").unwrap() as i64;
    let sep = model.tokenizer.token_to_id("[SEP]").unwrap() as i64;
    assert!(rows.iter().all(|r| r[0] == cls));
    assert_eq!(rows[2][34], sep);
    // BLIP's added special tokens.
    assert_eq!(model.tokenizer.token_to_id("[DEC]"), Some(177));
    assert_eq!(model.tokenizer.token_to_id("[ENC]"), Some(178));
}

#[test]
fn tokenizer_from_vocab_txt_matches_tokenizer_json() {
    let g = golden();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        model_dir().join("tokenizer/vocab.txt"),
        dir.path().join("vocab.txt"),
    )
    .unwrap();
    let tok = ImageRewardTokenizer::from_dir(dir.path(), 35).unwrap();
    let p = prompts(&g);
    let refs: Vec<&str> = p.iter().map(|s| s.as_str()).collect();
    let (ids, mask) = tok.encode(&refs, &Device::Cpu).unwrap();
    assert_pass(&g.compare("input_ids", &ids, 1.0).unwrap());
    assert_pass(&g.compare("attention_mask", &mask, 1.0).unwrap());
    assert_eq!(tok.token_to_id("[DEC]"), Some(177));
    assert_eq!(tok.token_to_id("[ENC]"), Some(178));

    let empty = tempfile::tempdir().unwrap();
    let err = ImageRewardTokenizer::from_dir(empty.path(), 35)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("vocab.txt"),
        "{err}"
    );
}

#[test]
fn model_matches_reference_on_pixel_values() {
    let g = golden();
    let model = load();
    let dev = Device::Cpu;
    let pv = Var::from_tensor(&g.get_on("pixel_values", &dev).unwrap()).unwrap();
    let ids = g.get_on("input_ids", &dev).unwrap();
    let mask = g.get_on("attention_mask", &dev).unwrap();
    let out = model
        .forward_pixel_values(pv.as_tensor(), &ids, &mask)
        .unwrap();
    assert_pass(&g.compare("image_embeds", &out.image_embeds, 1.0).unwrap());
    assert_pass(
        &g.compare("text_last_hidden_state", &out.text_last_hidden_state, 1.0)
            .unwrap(),
    );
    assert_pass(&g.compare("text_features", &out.text_features, 1.0).unwrap());
    assert_pass(&g.compare("raw_score", &out.raw_score, 1.0).unwrap());
    assert_pass(&g.compare("reward", &out.reward, 1.0).unwrap());
    let grads = out.reward.sum_all().unwrap().backward().unwrap();
    let gpv = grads
        .get(pv.as_tensor())
        .expect("gradient reaches pixel_values");
    assert_pass(&g.compare("grad_pixel_values", gpv, 1.0).unwrap());
}

#[test]
fn padding_mask_and_cross_attention_matter() {
    // Discrimination: without the padding mask, or with another image, the reward must change far beyond
    // the tolerance (guards against a mask / cross-attention that is silently ignored).
    let g = golden();
    let model = load();
    let dev = Device::Cpu;
    let pv = g.get_on("pixel_values", &dev).unwrap();
    let ids = g.get_on("input_ids", &dev).unwrap();
    let mask = g.get_on("attention_mask", &dev).unwrap();
    let ones = mask.ones_like().unwrap();
    let out = model.forward_pixel_values(&pv, &ids, &ones).unwrap();
    let c = g.compare("reward", &out.reward, 1.0).unwrap();
    assert!(c.ratio > 10.0, "padding mask ignored? {c}");
    let flipped = pv.flip(&[3]).unwrap();
    let out = model.forward_pixel_values(&flipped, &ids, &mask).unwrap();
    let c = g.compare("reward", &out.reward, 1.0).unwrap();
    assert!(c.ratio > 10.0, "image ignored? {c}");
}

#[test]
fn score_from_images_matches_reference() {
    let g = golden();
    let model = load();
    let dev = Device::Cpu;
    let p = prompts(&g);
    let refs: Vec<&str> = p.iter().map(|s| s.as_str()).collect();
    let images = Var::from_tensor(&g.get_on("images", &dev).unwrap()).unwrap();
    let pixel_values = model.preprocess(images.as_tensor()).unwrap();
    assert_pass(&g.compare("pixel_values", &pixel_values, 1.0).unwrap());
    let reward = model.score(images.as_tensor(), &refs).unwrap();
    assert_eq!(reward.dims(), &[3]);
    assert_eq!(reward.dtype(), DType::F32);
    assert_pass(&g.compare("reward", &reward, 1.0).unwrap());
    let grads = reward.sum_all().unwrap().backward().unwrap();
    let gi = grads
        .get(images.as_tensor())
        .expect("gradient reaches the images");
    assert_pass(&g.compare("grad_images", gi, 1.0).unwrap());
    // Batched scoring keeps the graph and the values.
    let batched = model.score_batched(images.as_tensor(), &refs, 2).unwrap();
    assert_pass(&g.compare("reward", &batched, 1.0).unwrap());
}

#[test]
fn check_function_passes_every_tensor() {
    let g = golden();
    let res = check_imagereward(&g, &model_dir(), &CheckContext::cpu(Some(model_dir()))).unwrap();
    let names: Vec<&str> = res.iter().map(|c| c.name.as_str()).collect();
    for want in [
        "input_ids",
        "attention_mask",
        "image_embeds",
        "text_last_hidden_state",
        "text_features",
        "raw_score",
        "reward",
        "grad_pixel_values",
        "resize_weight_h",
        "resize_weight_w",
        "resized",
        "pixel_values",
        "reward (from images)",
        "grad_images",
    ] {
        assert!(names.contains(&want), "{want} not compared: {names:?}");
    }
    for c in &res {
        assert_pass(c);
    }
}

/// Σ reward along a random direction: autograd's directional derivative vs a central difference.
#[test]
fn image_gradient_matches_finite_differences() {
    let g = golden();
    let model = load();
    let dev = Device::Cpu;
    let p = prompts(&g);
    let refs: Vec<&str> = p.iter().map(|s| s.as_str()).collect();
    let images = g.get_on("images", &dev).unwrap();
    let (ids, mask) = model.tokenize(&refs).unwrap();
    let x = Var::from_tensor(&images).unwrap();
    let total = |t: &Tensor| -> Tensor {
        model
            .forward_images(t, &ids, &mask)
            .unwrap()
            .reward
            .sum_all()
            .unwrap()
    };
    let grads = total(x.as_tensor()).backward().unwrap();
    let grad = grads.get(x.as_tensor()).unwrap().clone();
    for seed_dir in 0..2u64 {
        // A fixed pseudo-random direction (no RNG dependency), values in [-1, 1].
        let n = images.elem_count();
        let mut s = 0x2545_F491_4F6C_DD1Du64 ^ seed_dir;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        let v = Tensor::from_vec(v, images.dims(), &dev).unwrap();
        let analytic: f32 = (&grad * &v)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let eps = 1e-2;
        let plus = (&images + (&v * eps).unwrap()).unwrap();
        let minus = (&images - (&v * eps).unwrap()).unwrap();
        let fp: f32 = total(&plus).to_scalar().unwrap();
        let fm: f32 = total(&minus).to_scalar().unwrap();
        let numeric = (fp - fm) / (2.0 * eps as f32);
        let rel = (analytic - numeric).abs() / analytic.abs().max(1e-6);
        println!("direction {seed_dir}: autograd {analytic:.6e}, finite difference {numeric:.6e}, rel {rel:.2e}");
        assert!(
            analytic.abs() > 1e-4,
            "directional derivative {analytic} suspiciously small"
        );
        assert!(
            rel < 1e-2,
            "autograd {analytic} vs finite difference {numeric}"
        );
    }
}

#[test]
fn prompts_must_match_images() {
    let g = golden();
    let model = load();
    let images = g.get_on("images", &Device::Cpu).unwrap();
    let err = model
        .score(&images, &["one prompt"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("3 images") && err.contains("1 prompts"),
        "{err}"
    );
    let wrong_size = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let (ids, mask) = model.tokenize(&["x"]).unwrap();
    let err = model
        .forward_pixel_values(&wrong_size, &ids, &mask)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[1, 3, 16, 16]") && err.contains("32"),
        "{err}"
    );
}

/// A copy of the tiny model folder with `edit` applied to its weights.
fn edited_model_dir(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let src = model_dir();
    let dir = tempfile::tempdir().unwrap();
    for f in ["med_config.json", "config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::create_dir(dir.path().join("tokenizer")).unwrap();
    for e in std::fs::read_dir(src.join("tokenizer")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join("tokenizer").join(e.file_name())).unwrap();
    }
    let mut w =
        candle_core::safetensors::load(src.join("ImageReward.safetensors"), &Device::Cpu).unwrap();
    edit(&mut w);
    candle_core::safetensors::save(&w, dir.path().join("ImageReward.safetensors")).unwrap();
    dir
}

#[test]
fn missing_tensor_is_named() {
    let key = "blip.visual_encoder.blocks.1.attn.qkv.bias";
    let dir = edited_model_dir(|w| {
        w.remove(key);
    });
    let err = ImageReward::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .expect("load fails")
        .to_string();
    assert!(
        err.contains(key) && err.contains("ImageReward.safetensors"),
        "{err}"
    );
    let key = "mlp.layers.7.weight";
    let dir = edited_model_dir(|w| {
        w.remove(key);
    });
    let err = ImageReward::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(key), "{err}");
}

#[test]
fn misshaped_tensor_names_both_shapes() {
    let key = "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight";
    let dir = edited_model_dir(|w| {
        w.insert(
            key.to_string(),
            Tensor::zeros((32, 25), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = ImageReward::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .expect("load fails")
        .to_string();
    assert!(
        err.contains(key) && err.contains("[32, 25]") && err.contains("[32, 24]"),
        "{err}"
    );
}

#[test]
fn missing_files_are_named() {
    let dir = edited_model_dir(|_| {});
    std::fs::remove_file(dir.path().join("med_config.json")).unwrap();
    let err = ImageReward::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("med_config.json"), "{err}");

    let dir = edited_model_dir(|_| {});
    std::fs::remove_file(dir.path().join("ImageReward.safetensors")).unwrap();
    let err = ImageReward::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("ImageReward.safetensors"), "{err}");

    let err = ImageReward::load(&dir.path().join("nope"), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn config_json_sizes_are_used() {
    // Without config.json the real model's sizes (ViT-L/16 at 224, width 1024) are assumed, which the tiny
    // weights do not have: the loader must say which tensor disagrees rather than run.
    let dir = edited_model_dir(|_| {});
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = ImageReward::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .expect("tiny weights are not ViT-L")
        .to_string();
    assert!(
        err.contains("blip.visual_encoder") && err.contains("1024"),
        "{err}"
    );
}

#[test]
fn half_precision_runs_close() {
    // f16 weights and activations (LayerNorm statistics and softmax in f32 inside; candle's CPU matmul has
    // no bf16): close to the f32 golden at a loose tolerance, gradient still reaching the pixels.
    let g = golden();
    let model = ImageReward::load(&model_dir(), DType::F16, &Device::Cpu).unwrap();
    let dev = Device::Cpu;
    let pv = Var::from_tensor(&g.get_on("pixel_values", &dev).unwrap()).unwrap();
    let ids = g.get_on("input_ids", &dev).unwrap();
    let mask = g.get_on("attention_mask", &dev).unwrap();
    let out = model
        .forward_pixel_values(pv.as_tensor(), &ids, &mask)
        .unwrap();
    assert_eq!(out.image_embeds.dtype(), DType::F16);
    assert_eq!(out.reward.dtype(), DType::F32);
    let grads = out.reward.sum_all().unwrap().backward().unwrap();
    let gpv = grads
        .get(pv.as_tensor())
        .expect("f16 gradient reaches pixel_values");
    assert_eq!(gpv.dtype(), DType::F32);
    let c = g.compare("grad_pixel_values", gpv, 1.0).unwrap();
    println!("f16, loose bound 1000 x tol: {c}");
    assert!(c.ratio < 1e3, "f16 gradient far off: {c}");
    let expect: Vec<f32> = g.get("reward").unwrap().to_vec1().unwrap();
    let got: Vec<f32> = out.reward.to_vec1().unwrap();
    for (a, b) in got.iter().zip(&expect) {
        assert!(
            (a - b).abs() < 0.02 * b.abs().max(1.0),
            "f16 {got:?} vs f32 {expect:?}"
        );
    }
}
