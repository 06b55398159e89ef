//! CLIP tokenizer and text encoder: goldens, the vocab+merges path, `!` padding, gradient coverage, errors.

mod common;
use candle_core::{DType, Device, Tensor};
use common::randn;
use diffpref_pipelines::checks::{self, CheckContext};
use diffpref_pipelines::golden::Golden;
use diffpref_pipelines::models::clip_text::{ClipTextConfig, ClipTextModel};
use diffpref_pipelines::tokenizer::ClipTokenizer;
use diffpref_pipelines::weights::find_weight_files;
use diffpref_pipelines::Params;
use std::path::{Path, PathBuf};

type R = Result<(), Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn run_golden(name: &str, model: &str) -> R {
    let g = Golden::load(fixtures().join("golden").join(name))?;
    let res =
        checks::run(&g, &CheckContext::cpu(Some(fixtures().join(model))))?.expect("known kind");
    assert!(!res.is_empty());
    for c in &res {
        println!("{c}");
    }
    for c in &res {
        assert!(c.passed, "{name}: {c}");
    }
    Ok(())
}

#[test]
fn tokenizer_golden() -> R {
    // The real CLIP tokenizer (the tiny models use a small one; `tests/parity_sd2_sdxl.rs` checks that).
    run_golden("tokenizer.safetensors", "clip-tokenizer")
}

#[test]
fn text_encoder_golden() -> R {
    run_golden("text_encoder.safetensors", "tiny-sd")
}

/// Copies the tokenizer folder into a temp dir, optionally without `tokenizer.json`.
fn copy_tokenizer(with_json: bool) -> std::io::Result<tempfile::TempDir> {
    let tmp = tempfile::tempdir()?;
    for f in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "tokenizer.json",
    ] {
        if f == "tokenizer.json" && !with_json {
            continue;
        }
        std::fs::copy(
            fixtures().join("clip-tokenizer").join(f),
            tmp.path().join(f),
        )?;
    }
    Ok(tmp)
}

fn golden_prompts() -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let g = Golden::load(fixtures().join("golden/tokenizer.safetensors"))?;
    Ok(serde_json::from_str(g.meta("prompts")?)?)
}

#[test]
fn vocab_merges_path_matches_tokenizer_json() -> R {
    let tmp = copy_tokenizer(false)?;
    assert!(!tmp.path().join("tokenizer.json").exists());
    let from_bpe = ClipTokenizer::from_dir(tmp.path())?;
    let from_json = ClipTokenizer::from_dir(fixtures().join("clip-tokenizer"))?;
    let mut prompts = golden_prompts()?;
    prompts.extend(
        [
            "hello<|endoftext|>world",
            "Ünïcödé ﬁ ligature e\u{301} combining, tabs\t\tand   <|startoftext|>",
            "it's we'll they've I'm you'd 'quoted' don't",
            "x!!!y?? ...",
        ]
        .map(String::from),
    );
    let refs: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
    let (a, la) = from_bpe.encode_batch(&refs)?;
    let (b, lb) = from_json.encode_batch(&refs)?;
    assert_eq!(a.dims(), &[refs.len(), 77]);
    assert_eq!(a.to_vec2::<u32>()?, b.to_vec2::<u32>()?);
    assert_eq!(la, lb);
    // Same as the golden ids.
    let g = Golden::load(fixtures().join("golden/tokenizer.safetensors"))?;
    let n = golden_prompts()?.len();
    let c = g.compare("input_ids", &a.narrow(0, 0, n)?.to_dtype(DType::I64)?, 1.0)?;
    assert!(c.passed, "{c}");
    assert_eq!(
        (from_bpe.bos_id, from_bpe.eos_id, from_bpe.pad_id),
        (49406, 49407, 49407)
    );
    Ok(())
}

#[test]
fn bang_pad_token_pads_with_zero() -> R {
    for with_json in [true, false] {
        let tmp = copy_tokenizer(with_json)?;
        std::fs::write(
            tmp.path().join("tokenizer_config.json"),
            r#"{"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": "!", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}"#,
        )?;
        let tok = ClipTokenizer::from_dir(tmp.path())?;
        assert_eq!(tok.pad_id, 0);
        let reference = ClipTokenizer::from_dir(fixtures().join("clip-tokenizer"))?;
        let (ids, lens) = tok.encode_batch(&["a photograph of an astronaut", "wow!"])?;
        let ids = ids.to_vec2::<u32>()?;
        let plain = reference.encode("a photograph of an astronaut")?;
        assert_eq!(lens[0], plain.len());
        assert_eq!(&ids[0][..plain.len()], plain.as_slice());
        assert!(
            ids[0][plain.len()..].iter().all(|&i| i == 0),
            "{:?}",
            ids[0]
        );
        // A literal `!` is the special pad token now: id 0 (with the EOS pad it is the BPE token `!</w>`).
        let wow = &ids[1][..lens[1]];
        assert_eq!(wow.len(), 4, "{wow:?}");
        assert_eq!(wow[0], 49406);
        assert_eq!(wow[2], 0);
        assert_eq!(wow[3], 49407);
        let ref_wow = reference.encode("wow!")?;
        assert_eq!(ref_wow[1], wow[1]);
        assert_ne!(ref_wow[2], 0);
    }
    Ok(())
}

#[test]
fn truncates_to_75_tokens() -> R {
    let tok = ClipTokenizer::from_dir(fixtures().join("clip-tokenizer"))?;
    let long = "word ".repeat(200);
    let (ids, lens) = tok.encode_batch(&[&long, ""])?;
    let ids = ids.to_vec2::<u32>()?;
    assert_eq!(lens, vec![77, 2]);
    assert_eq!(ids[0][0], 49406);
    assert_eq!(ids[0][76], 49407);
    assert_eq!(ids[1][..3], [49406, 49407, 49407]);
    Ok(())
}

#[test]
fn missing_tokenizer_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let err = ClipTokenizer::from_dir(tmp.path())
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("vocab.json"), "{err}");
    std::fs::copy(
        fixtures().join("clip-tokenizer/vocab.json"),
        tmp.path().join("vocab.json"),
    )
    .unwrap();
    let err = ClipTokenizer::from_dir(tmp.path())
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("merges.txt"), "{err}");
}

fn tiny_te_dir() -> PathBuf {
    fixtures().join("tiny-sd/text_encoder")
}

fn assert_full_grad_coverage(p: &Params, loss: &Tensor) -> R {
    let grads = loss.backward()?;
    let vars = p.vars();
    assert!(!vars.is_empty());
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let v: Vec<f32> = g.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        assert!(
            v.iter().all(|x| x.is_finite()),
            "non-finite gradient for {name}"
        );
        assert!(v.iter().any(|&x| x != 0.0), "zero gradient for {name}");
    }
    Ok(())
}

#[test]
fn gradient_reaches_every_parameter() -> R {
    let files = find_weight_files(&tiny_te_dir(), "model", None)?;
    let p = Params::from_files(&files, DType::F32, &Device::Cpu)?.trainable();
    let cfg = ClipTextConfig::from_file(tiny_te_dir().join("config.json"))?;
    let model = ClipTextModel::new(&p, cfg.clone())?;
    // 5 layers x 16 tensors + 2 embeddings + final LN.
    assert_eq!(p.vars().len(), cfg.num_hidden_layers * 16 + 4);
    let tok = ClipTokenizer::from_dir(fixtures().join("tiny-sd/tokenizer"))?;
    let (ids, _) =
        tok.encode_batch(&["a photograph of an astronaut riding a horse", "a red cube"])?;
    let out = model.forward(&ids)?;
    assert_eq!(out.hidden_states.len(), 6);
    assert_eq!(out.pooled.dims(), &[2, 32]);
    assert!(out.text_embeds.is_none());
    let w = randn(
        1,
        1.,
        out.last_hidden_state.dims(),
        &Device::Cpu,
        DType::F32,
    );
    let loss = ((out.last_hidden_state * w)?.sum_all()? + out.pooled.sqr()?.sum_all()?)?;
    assert_full_grad_coverage(&p, &loss)
}

#[test]
fn with_projection_and_gelu_random_weights() -> R {
    // An SDXL text_encoder_2-like config (exact GELU, projection, non-legacy eos id), random weights.
    let cfg: ClipTextConfig = serde_json::from_str(
        r#"{"architectures": ["CLIPTextModelWithProjection"], "hidden_size": 16, "intermediate_size": 24,
            "num_attention_heads": 2, "num_hidden_layers": 2, "max_position_embeddings": 77, "vocab_size": 49408,
            "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 8, "eos_token_id": 49407}"#,
    )?;
    let p = Params::random(3, DType::F32, &Device::Cpu).trainable();
    let model = ClipTextModel::new(&p, cfg)?;
    assert!(p.vars().iter().any(|(n, _)| n == "text_projection.weight"));
    assert!(p
        .vars()
        .iter()
        .any(|(n, _)| n == "text_model.final_layer_norm.weight"));
    // Pads with 0 (`!`): pooling must take the first 49407, not argmax.
    let mut row = vec![49406u32, 320, 1125, 49407];
    row.resize(77, 0);
    let ids = Tensor::from_vec(row, (1, 77), &Device::Cpu)?;
    assert_eq!(model.eos_positions(&ids)?, vec![3]);
    let out = model.forward(&ids)?;
    let pooled_ref = out.last_hidden_state.narrow(1, 3, 1)?.squeeze(1)?;
    let diff = (out.pooled.clone() - pooled_ref)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert_eq!(diff, 0.0);
    let te = out.text_embeds.clone().expect("projection");
    assert_eq!(te.dims(), &[1, 8]);
    let loss = (out.last_hidden_state.sum_all()? + te.sqr()?.sum_all()?)?;
    assert_full_grad_coverage(&p, &loss)
}

#[test]
fn checkpoint_without_text_model_prefix_loads() -> R {
    let files = find_weight_files(&tiny_te_dir(), "model", None)?;
    let tensors = candle_core::safetensors::load(&files[0], &Device::Cpu)?;
    let stripped = tensors
        .iter()
        .map(|(k, v)| {
            (
                k.strip_prefix("text_model.").unwrap_or(k).to_string(),
                v.clone(),
            )
        })
        .collect();
    let cfg = ClipTextConfig::from_file(tiny_te_dir().join("config.json"))?;
    let a = ClipTextModel::new(&Params::from_map(stripped, DType::F32, &Device::Cpu), cfg)?;
    let b = ClipTextModel::load(tiny_te_dir(), None, DType::F32, &Device::Cpu)?;
    let tok = ClipTokenizer::from_dir(fixtures().join("tiny-sd/tokenizer"))?;
    let (ids, _) = tok.encode_batch(&["a red cube"])?;
    let (oa, ob) = (a.forward(&ids)?, b.forward(&ids)?);
    let diff = (oa.last_hidden_state - ob.last_hidden_state)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert_eq!(diff, 0.0);
    Ok(())
}

#[test]
fn missing_tensor_and_bad_activation_are_named() -> R {
    let tmp = tempfile::tempdir()?;
    let files = find_weight_files(&tiny_te_dir(), "model", None)?;
    let mut tensors = candle_core::safetensors::load(&files[0], &Device::Cpu)?;
    tensors.remove("text_model.encoder.layers.3.mlp.fc2.bias");
    let out = tmp.path().join("model.safetensors");
    candle_core::safetensors::save(&tensors, &out)?;
    std::fs::copy(
        tiny_te_dir().join("config.json"),
        tmp.path().join("config.json"),
    )?;
    let err = ClipTextModel::load(tmp.path(), None, DType::F32, &Device::Cpu)
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        err.contains("text_model.encoder.layers.3.mlp.fc2.bias"),
        "{err}"
    );
    assert!(err.contains(&out.display().to_string()), "{err}");

    // No weights at all: the expected file is named.
    let empty = tempfile::tempdir()?;
    std::fs::copy(
        tiny_te_dir().join("config.json"),
        empty.path().join("config.json"),
    )?;
    let err = ClipTextModel::load(empty.path(), None, DType::F32, &Device::Cpu)
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");

    // Unsupported activation: the config file and key are named.
    let text =
        std::fs::read_to_string(tiny_te_dir().join("config.json"))?.replace("quick_gelu", "mish");
    std::fs::write(tmp.path().join("config.json"), text)?;
    let err = ClipTextConfig::from_file(tmp.path().join("config.json"))
        .expect_err("must fail")
        .to_string();
    assert!(
        err.contains("hidden_act") && err.contains("mish") && err.contains("config.json"),
        "{err}"
    );
    Ok(())
}

#[test]
fn text_encoder_runs_in_half_precision() -> R {
    // bf16 / f16 activations (norms and softmax in f32 inside): close to the f32 golden at a loose tolerance.
    let g = Golden::load(fixtures().join("golden/text_encoder.safetensors"))?;
    for (dtype, scale) in [(DType::BF16, 4000.0), (DType::F16, 500.0)] {
        let ctx = CheckContext {
            dtype,
            tolerance_scale: scale,
            ..CheckContext::cpu(Some(fixtures().join("tiny-sd")))
        };
        for c in checks::run(&g, &ctx)?.expect("known kind") {
            println!("{dtype:?} {c}");
            assert!(c.passed, "{dtype:?}: {c}");
        }
    }
    Ok(())
}
