//! CLIP score, PickScore, HPSv2 and the LAION aesthetic predictor: golden parity (every tensor of the
//! `clip_hf`, `open_clip` and `aesthetic` goldens), finite-difference gradients, batching, and loader errors.

use candle_core::{DType, Device, Tensor};
use diffpref_pipelines::checks::CheckContext;
use diffpref_pipelines::golden::Golden;
use diffpref_rewards::clip::{ClipLoadOptions, ClipModel, Layout};
use diffpref_rewards::preprocess::ResizeMode;
use diffpref_rewards::{
    checks, input_gradient, Aesthetic, ClipConfig, ClipReward, ClipScoring, Reward,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn golden(name: &str) -> Golden {
    Golden::load(fixtures().join("golden").join(name)).unwrap()
}

/// Runs the golden check and asserts every tensor passes and every toleranced tensor was compared.
fn check_all(name: &str) {
    let g = golden(name);
    let res = checks::run(&g, &CheckContext::cpu(None))
        .unwrap()
        .expect("kind handled by diffpref-rewards");
    let mut worst = 0f64;
    for c in &res {
        println!("{name}: {c}");
        worst = worst.max(c.ratio);
    }
    println!("{name}: worst ratio {worst:.3}");
    let failed: Vec<String> = res
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.to_string())
        .collect();
    assert!(failed.is_empty(), "{name}: failed:\n{}", failed.join("\n"));
    let compared: Vec<&str> = res.iter().map(|c| c.name.as_str()).collect();
    for t in g.tensors.keys() {
        if g.tolerance(t).is_some() {
            assert!(
                compared.contains(&t.as_str()),
                "{name}: `{t}` was not compared"
            );
        }
    }
}

#[test]
fn golden_clip_hf_all_tensors() {
    check_all("clip_hf.safetensors");
}

#[test]
fn golden_open_clip_all_tensors() {
    check_all("open_clip.safetensors");
}

#[test]
fn golden_aesthetic_all_tensors() {
    check_all("aesthetic.safetensors");
}

#[test]
fn golden_tokenization_is_compared_exactly() {
    // tiny-clip-hf has its own tokenizer (pads with <|endoftext|>); tiny-open-clip pads with 0 (its own
    // tokenizer, or the fixtures' CLIP tokenizer beside it when it has none) — both must reproduce the golden ids.
    for name in ["clip_hf.safetensors", "open_clip.safetensors"] {
        let res = checks::run(&golden(name), &CheckContext::cpu(None))
            .unwrap()
            .unwrap();
        let ids = res
            .iter()
            .find(|c| c.name == "input_ids")
            .expect("input_ids compared");
        assert!(ids.passed && ids.ratio == 0.0, "{name}: {ids}");
    }
}

fn hf_dir() -> PathBuf {
    fixtures().join("tiny-clip-hf")
}
fn oc_dir() -> PathBuf {
    fixtures().join("tiny-open-clip")
}
/// The tokenizer of tiny-open-clip: its own (a small CLIP tokenizer) when it has one, else the CLIP tokenizer
/// beside it (open_clip checkpoints ship none).
fn oc_tokenizer() -> PathBuf {
    diffpref_rewards::clip::find_tokenizer_dir(&oc_dir())
        .unwrap_or_else(|| fixtures().join("clip-tokenizer"))
}

fn prompts3(g: &Golden) -> Vec<String> {
    serde_json::from_str(&g.metadata["prompts"]).unwrap()
}

/// Directional derivative of `f` along `v` by central differences vs the autograd gradient, within relative
/// tolerance `tol`.
fn assert_fd_gradient(
    name: &str,
    reward: &dyn Reward,
    images: &Tensor,
    prompts: &[&str],
    tol: f64,
) {
    let images = &images.to_dtype(DType::F64).unwrap();
    let g = input_gradient(images, |x| reward.score(x, prompts)).unwrap();
    assert_eq!(g.dims(), images.dims());
    // A fixed pseudo-random direction in [-1, 1] (deterministic test).
    let n = images.elem_count();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let dir: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    let v = Tensor::from_vec(dir, images.dims(), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let analytic: f64 = (&g * &v)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar()
        .unwrap();
    // Central differences at eps and eps/2, Richardson-extrapolated (truncation error O(eps⁴)); the
    // models compute LayerNorm and attention scores in f32, so eps must stay well above f32 noise.
    let eps = 1e-2;
    let f = |x: &Tensor| -> f64 {
        let x64 = x.to_dtype(DType::F64).unwrap();
        reward
            .score(&x64, prompts)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let central = |e: f64| {
        let plus = f(&(images + (&v * e).unwrap()).unwrap());
        let minus = f(&(images - (&v * e).unwrap()).unwrap());
        (plus - minus) / (2.0 * e)
    };
    let numeric = (4.0 * central(eps / 2.0) - central(eps)) / 3.0;
    let rel = (analytic - numeric).abs() / numeric.abs().max(1e-12);
    println!("{name}: analytic {analytic:.6e} numeric {numeric:.6e} rel {rel:.2e}");
    assert!(analytic.abs() > 1e-6, "{name}: zero gradient");
    assert!(
        rel < tol,
        "{name}: gradient {analytic} vs finite differences {numeric} (rel {rel:.2e} >= {tol:.0e})"
    );
}

#[test]
fn image_gradients_match_finite_differences() {
    let g = golden("clip_hf.safetensors");
    let prompts = prompts3(&g);
    let refs: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
    let images = g.get("images").unwrap().clone();
    let dev = Device::Cpu;
    let dt = DType::F64;
    let pick = ClipReward::load_pickscore(hf_dir(), dt, &dev).unwrap();
    assert_fd_gradient("pickscore", &pick, &images, &refs, 2e-3);
    // CLIP score: 100 max(cos, 0) — use the pairs with a positive cosine so the gradient is not zero.
    let clip = ClipReward::load_clip_score(hf_dir(), dt, &dev).unwrap();
    let s = clip
        .score(&images, &refs)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let pos: Vec<usize> = (0..3).filter(|&i| s[i] > 1.0).collect();
    assert!(!pos.is_empty(), "no positive CLIP score among {s:?}");
    let idx = Tensor::new(pos.iter().map(|&i| i as u32).collect::<Vec<_>>(), &dev).unwrap();
    let sub = images.index_select(&idx, 0).unwrap();
    let sub_p: Vec<&str> = pos.iter().map(|&i| refs[i]).collect();
    assert_fd_gradient("clip score", &clip, &sub, &sub_p, 2e-3);
    let hps = ClipReward::load_hps(oc_dir(), dt, &dev).unwrap();
    let mut hps = hps;
    let mut m = ClipModel::load(oc_dir(), dt, &dev).unwrap();
    m.set_tokenizer(
        diffpref_pipelines::tokenizer::ClipTokenizer::from_dir(oc_tokenizer()).unwrap(),
    );
    m.config.preprocess.mode = ResizeMode::LongestSidePad;
    hps.model = std::sync::Arc::new(m);
    assert_fd_gradient("hps", &hps, &images, &refs, 2e-3);
    let aes = Aesthetic::load(fixtures().join("tiny-aesthetic"), hf_dir(), dt, &dev).unwrap();
    let portrait = golden("aesthetic.safetensors")
        .get("images")
        .unwrap()
        .clone();
    // The aesthetic head's directional derivative (~3e-2) is ~10x smaller than CLIP score's and HPS's while the f32
    // rounding of the score is not, so the finite differences' noise is ~2e-3 of it on this CPU (measured
    // 3.4e-3 here): a wrong gradient is off by O(1), so 1e-2 still catches it.
    assert_fd_gradient("aesthetic", &aes, &portrait, &[], 1e-2);
}

#[test]
fn batched_scores_and_gradients_equal_one_shot() {
    let g = golden("clip_hf.safetensors");
    let prompts = prompts3(&g);
    let refs: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
    let images = g.get("images").unwrap();
    let pick = ClipReward::load_pickscore(hf_dir(), DType::F32, &Device::Cpu).unwrap();
    let all = pick.score(images, &refs).unwrap();
    let chunked = pick.score_batched(images, &refs, 2).unwrap();
    let diff: f32 = (&all - &chunked)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff < 1e-4, "batched scores differ by {diff}");
    // The golden's PickScore (image i with prompt i), through the tokenizer and the text cache.
    let c = g.compare("pickscore", &all, 1.0).unwrap();
    assert!(c.passed, "{c}");
    let (s, gr) = pick.score_and_grad(images, &refs, 1).unwrap();
    let c = g.compare("grad_images", &gr, 1.0).unwrap();
    assert!(c.passed, "{c}");
    let c = g.compare("pickscore", &s, 1.0).unwrap();
    assert!(c.passed, "{c}");
    // Prompt count must match the images.
    let err = pick.score(images, &refs[..2]).unwrap_err().to_string();
    assert!(err.contains("3 images but 2 prompts"), "{err}");
}

#[test]
fn text_side_is_constant_and_scores_use_the_checkpoint_logit_scale() {
    let m = ClipModel::load(hf_dir(), DType::F32, &Device::Cpu).unwrap();
    let ls: f32 = m.logit_scale().unwrap().to_scalar().unwrap();
    assert!((ls - 4.1).abs() < 1e-6, "logit_scale {ls}");
    let t = m.text_embeds(&["a red cube", "a red cube"]).unwrap();
    assert!(!t.is_variable() && t.dims() == [2, 16]);
    let n: Vec<f32> = t.sqr().unwrap().sum(1).unwrap().to_vec1().unwrap();
    assert!(n.iter().all(|v| (v - 1.0).abs() < 1e-5), "{n:?}");
}

/// A writable copy of a fixture model folder whose weights are edited by `edit`.
fn edited_copy(
    src: &Path,
    weights: &str,
    edit: impl FnOnce(&mut HashMap<String, Tensor>),
) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != weights {
            std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    let mut map = candle_core::safetensors::load(src.join(weights), &Device::Cpu).unwrap();
    edit(&mut map);
    candle_core::safetensors::save(&map, tmp.path().join(weights)).unwrap();
    tmp
}

#[test]
fn missing_logit_scale_is_an_error_not_a_default() {
    for (src, weights) in [
        (hf_dir(), "model.safetensors"),
        (oc_dir(), "open_clip_model.safetensors"),
    ] {
        let tmp = edited_copy(&src, weights, |m| {
            m.remove("logit_scale");
        });
        let err = match ClipModel::load(tmp.path(), DType::F32, &Device::Cpu) {
            Ok(_) => panic!("{}: loaded without logit_scale", src.display()),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("`logit_scale`") && err.contains(weights),
            "{err}"
        );
        let err = ClipReward::load_pickscore(tmp.path(), DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("logit_scale"), "{err}");
    }
    // The aesthetic predictor only needs the image tower: no logit_scale required there.
    let tmp = edited_copy(&hf_dir(), "model.safetensors", |m| {
        m.remove("logit_scale");
    });
    let aes = Aesthetic::load(
        fixtures().join("tiny-aesthetic"),
        tmp.path(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let g = golden("aesthetic.safetensors");
    let s = aes.score(g.get("images").unwrap(), &[]).unwrap();
    assert!(g.compare("score", &s, 1.0).unwrap().passed);
}

#[test]
fn missing_class_embedding_is_an_error() {
    for (src, weights, key) in [
        (
            hf_dir(),
            "model.safetensors",
            "vision_model.embeddings.class_embedding",
        ),
        (
            oc_dir(),
            "open_clip_model.safetensors",
            "visual.class_embedding",
        ),
    ] {
        let tmp = edited_copy(&src, weights, |m| {
            m.remove(key);
        });
        let err = ClipModel::load(tmp.path(), DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(&format!("`{key}`")) && err.contains(weights),
            "{err}"
        );
    }
}

#[test]
fn misshaped_key_error_names_key_and_both_shapes() {
    let tmp = edited_copy(&hf_dir(), "model.safetensors", |m| {
        m.insert(
            "visual_projection.weight".into(),
            Tensor::zeros((8, 32), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = ClipModel::load(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("visual_projection.weight")
            && err.contains("[8, 32]")
            && err.contains("[16, 32]"),
        "{err}"
    );
    // open_clip's visual.proj is [W, E] (x @ proj): a Linear-style [E, W] tensor is rejected.
    let tmp = edited_copy(&oc_dir(), "open_clip_model.safetensors", |m| {
        m.insert(
            "visual.proj".into(),
            Tensor::zeros((16, 32), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = ClipModel::load(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("visual.proj") && err.contains("[16, 32]") && err.contains("[32, 16]"),
        "{err}"
    );
    // A head whose input size disagrees with the backbone's projection.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("tiny-aesthetic/model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(tmp.path().join("config.json"), r#"{"input_size": 768}"#).unwrap();
    let err = Aesthetic::load(tmp.path(), hf_dir(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("layers.0.weight")
            && err.contains("[1024, 768]")
            && err.contains("[1024, 16]"),
        "{err}"
    );
}

#[test]
fn configs_follow_the_files_and_presets() {
    let hf = ClipConfig::from_hf_files(
        &hf_dir().join("config.json"),
        Some(&hf_dir().join("preprocessor_config.json")),
    )
    .unwrap();
    assert_eq!(hf.layout, Layout::HuggingFace);
    assert_eq!(
        (
            hf.vision.tower.width,
            hf.vision.tower.layers,
            hf.vision.tower.heads,
            hf.vision.tower.mlp_dim
        ),
        (32, 3, 4, 48)
    );
    assert_eq!(
        (hf.text.tower.mlp_dim, hf.embed_dim, hf.vision.patch_size),
        (37, 16, 8)
    );
    assert_eq!(hf.vision.tower.hidden_act, "quick_gelu");
    assert_eq!(hf.preprocess.mode, ResizeMode::ShortestSideCrop);
    let oc = ClipConfig::from_open_clip_file(&oc_dir().join("open_clip_config.json")).unwrap();
    assert_eq!(oc.layout, Layout::OpenClip);
    assert_eq!(
        (
            oc.vision.tower.heads,
            oc.vision.tower.mlp_dim,
            oc.text.tower.heads,
            oc.text.tower.mlp_dim
        ),
        (4, 128, 2, 64)
    );
    assert_eq!(oc.vision.tower.hidden_act, "gelu");
    assert_eq!(oc.text.pad_id, Some(0));
    assert_eq!(oc.preprocess.mode, ResizeMode::LongestSidePad);
    let h = ClipConfig::open_clip_vit_h_14();
    assert_eq!(
        (
            h.vision.tower.width,
            h.vision.tower.layers,
            h.vision.tower.heads,
            h.vision.tower.mlp_dim
        ),
        (1280, 32, 16, 5120)
    );
    assert_eq!(
        (
            h.text.tower.width,
            h.text.tower.layers,
            h.embed_dim,
            h.vision.num_positions()
        ),
        (1024, 24, 1024, 257)
    );
    let l = ClipConfig::hf_vit_l_14();
    assert_eq!(
        (
            l.vision.tower.width,
            l.vision.tower.layers,
            l.embed_dim,
            l.vision.patch_size
        ),
        (1024, 24, 768, 14)
    );
    // Unsupported open_clip features are refused by name.
    let err = ClipConfig::from_open_clip_json(
        r#"{"model_cfg": {"embed_dim": 16, "vision_cfg": {"timm_model_name": "convnext"}, "text_cfg": {}}}"#,
        "x.json",
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("x.json") && err.contains("timm_model_name"),
        "{err}"
    );
    // A folder without any config is an error naming it.
    let tmp = tempfile::tempdir().unwrap();
    let err = ClipModel::load_with(
        tmp.path(),
        &ClipLoadOptions::default(),
        DType::F32,
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("open_clip_config.json") && err.contains("config.json"),
        "{err}"
    );
}

#[test]
fn hps_without_a_tokenizer_says_what_is_missing() {
    // The model alone, as open_clip checkpoints ship it: config and weights, no tokenizer.
    let tmp = tempfile::tempdir().unwrap();
    for f in ["open_clip_config.json", "open_clip_model.safetensors"] {
        std::fs::copy(oc_dir().join(f), tmp.path().join(f)).unwrap();
    }
    let hps = ClipReward::load_hps(tmp.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(hps.scoring, ClipScoring::Hps);
    let images = golden("open_clip.safetensors")
        .get("images")
        .unwrap()
        .clone();
    let err = hps
        .score(&images, &["a", "b", "c"])
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("no tokenizer") && err.contains("open_clip_model.safetensors"),
        "{err}"
    );
    // With its tokenizer the score is the golden's HPS score.
    let hps = ClipReward::load(
        tmp.path(),
        ClipScoring::Hps,
        &ClipLoadOptions {
            tokenizer: Some(oc_tokenizer()),
            ..Default::default()
        },
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let g = golden("open_clip.safetensors");
    let prompts = prompts3(&g);
    let refs: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
    let s = hps.score(&images, &refs).unwrap();
    let c = g.compare("hps_score", &s, 1.0).unwrap();
    assert!(c.passed, "{c}");
}

/// Writes `tensors` (f32) as a PyTorch zip checkpoint `{"state_dict": OrderedDict(prefix + name: tensor)}`,
/// pickled by hand with the opcodes `torch.save` emits (protocol 2).
fn write_torch_checkpoint(path: &Path, tensors: &HashMap<String, Tensor>, prefix: &str) {
    use std::io::Write;
    fn unicode(o: &mut Vec<u8>, s: &str) {
        o.push(b'X');
        o.extend((s.len() as u32).to_le_bytes());
        o.extend(s.as_bytes());
    }
    fn int(o: &mut Vec<u8>, v: usize) {
        o.push(b'J');
        o.extend((v as i32).to_le_bytes());
    }
    fn global(o: &mut Vec<u8>, module: &str, name: &str) {
        o.push(b'c');
        o.extend(format!("{module}\n{name}\n").bytes());
    }
    fn ordered_dict(o: &mut Vec<u8>) {
        global(o, "collections", "OrderedDict");
        o.extend(b")R");
    }
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut pkl = vec![0x80, 2, b'}'];
    unicode(&mut pkl, "state_dict");
    ordered_dict(&mut pkl);
    pkl.push(b'(');
    let mut blobs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let t = &tensors[*name];
        let dims = t.dims().to_vec();
        unicode(&mut pkl, &format!("{prefix}{name}"));
        global(&mut pkl, "torch._utils", "_rebuild_tensor_v2");
        pkl.extend(b"((");
        unicode(&mut pkl, "storage");
        global(&mut pkl, "torch", "FloatStorage");
        unicode(&mut pkl, &i.to_string());
        unicode(&mut pkl, "cpu");
        int(&mut pkl, t.elem_count());
        pkl.extend(b"tQ");
        int(&mut pkl, 0);
        pkl.push(b'(');
        for &d in &dims {
            int(&mut pkl, d);
        }
        pkl.push(b't');
        pkl.push(b'(');
        for k in 0..dims.len() {
            int(&mut pkl, dims[k + 1..].iter().product());
        }
        pkl.push(b't');
        pkl.push(0x89);
        ordered_dict(&mut pkl);
        pkl.extend(b"tR");
        let data: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        blobs.push(
            data.iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
    }
    pkl.extend(b"us.");
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(&pkl).unwrap();
    for (i, b) in blobs.iter().enumerate() {
        z.start_file(format!("archive/data/{i}"), opts).unwrap();
        z.write_all(b).unwrap();
    }
    z.start_file("archive/version", opts).unwrap();
    z.write_all(b"3\n").unwrap();
    z.finish().unwrap();
}

#[test]
fn pytorch_checkpoints_load_like_safetensors() {
    let dev = Device::Cpu;
    // The aesthetic head as the original `.pth` (DDP `module.` prefix, `state_dict` entry), no config: the
    // input size comes from layers.0.weight.
    let tmp = tempfile::tempdir().unwrap();
    let head = tmp.path().join("sac+logos+ava1-l14-linearMSE.pth");
    let map =
        candle_core::safetensors::load(fixtures().join("tiny-aesthetic/model.safetensors"), &dev)
            .unwrap();
    write_torch_checkpoint(&head, &map, "module.");
    let aes = Aesthetic::load(&head, hf_dir(), DType::F32, &dev).unwrap();
    assert_eq!(aes.head.input_size, 16);
    let g = golden("aesthetic.safetensors");
    let s = aes.score(g.get("images").unwrap(), &[]).unwrap();
    let c = g.compare("score", &s, 1.0).unwrap();
    assert!(c.passed, "{c}");
    // An HPSv2-style `.pt` of the open_clip model next to its open_clip_config.json.
    let dir = tmp.path().join("hps");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(
        oc_dir().join("open_clip_config.json"),
        dir.join("open_clip_config.json"),
    )
    .unwrap();
    let mut map =
        candle_core::safetensors::load(oc_dir().join("open_clip_model.safetensors"), &dev).unwrap();
    write_torch_checkpoint(&dir.join("HPS_v2.1_tiny.pt"), &map, "");
    let m = ClipModel::load(&dir, DType::F32, &dev).unwrap();
    let og = golden("open_clip.safetensors");
    let e = m
        .encode_image(og.get("pixel_values").unwrap())
        .unwrap()
        .embeds;
    let c = og.compare("image_features_unnorm", &e, 1.0).unwrap();
    assert!(c.passed, "{c}");
    // Errors name the checkpoint file, the key and both shapes.
    map.insert(
        "visual.proj".into(),
        Tensor::zeros((16, 32), DType::F32, &dev).unwrap(),
    );
    write_torch_checkpoint(&dir.join("HPS_v2.1_tiny.pt"), &map, "");
    let err = ClipModel::load(&dir, DType::F32, &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("HPS_v2.1_tiny.pt") && err.contains("visual.proj") && err.contains("[16, 32]"),
        "{err}"
    );
}

#[test]
fn half_precision_models_pass_the_goldens_at_the_f16_tolerance() {
    // f16 weights and activations (preprocessing, LayerNorm and softmax in f32): the f32 tolerances x 500, as
    // `diffpref verify --dtype f16` uses.
    let ctx = CheckContext {
        dtype: DType::F16,
        tolerance_scale: 500.0,
        ..CheckContext::cpu(None)
    };
    for name in [
        "clip_hf.safetensors",
        "open_clip.safetensors",
        "aesthetic.safetensors",
    ] {
        let res = checks::run(&golden(name), &ctx).unwrap().unwrap();
        let failed: Vec<String> = res
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.to_string())
            .collect();
        assert!(failed.is_empty(), "{name} in f16:\n{}", failed.join("\n"));
    }
}
