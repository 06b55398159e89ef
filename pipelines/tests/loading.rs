//! Loading diffusers folders: fp16 variants, sharded checkpoints, whole-model loading and its errors.

use candle_core::{DType, Device, Tensor};
use diffpref_pipelines::loading::{resolve_model, LoadOptions, StableDiffusion};
use diffpref_pipelines::models::unet::UNet2DConditionModel;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

fn unet_out(dir: &Path, variant: Option<&str>) -> Tensor {
    let unet = UNet2DConditionModel::load(dir, variant, DType::F32, &Device::Cpu).unwrap();
    let c = Tensor::ones((2, 5, 32), DType::F32, &Device::Cpu).unwrap();
    let t = Tensor::new(&[10f32, 500.], &Device::Cpu).unwrap();
    let x = Tensor::arange(0f32, 512., &Device::Cpu)
        .unwrap()
        .reshape((2, 4, 8, 8))
        .unwrap()
        .sin()
        .unwrap();
    unet.forward(&x, &t, &c, None).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn fp16_variant_and_shards_load_like_the_plain_file() {
    let src = fixtures().join("tiny-sd/unet");
    let reference = unet_out(&src, None);
    let weights = candle_core::safetensors::load(
        src.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();

    // fp16 variant only: picked for variant "fp16" and as the fallback when no plain file exists.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let half: HashMap<String, Tensor> = weights
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::F16).unwrap()))
        .collect();
    candle_core::safetensors::save(
        &half,
        tmp.path().join("diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    let out16 = unet_out(tmp.path(), Some("fp16"));
    let d = max_diff(&out16, &reference);
    assert!(
        d > 0.0 && d < 5e-2,
        "fp16 weights should be close but not identical: {d}"
    );
    assert_eq!(max_diff(&unet_out(tmp.path(), None), &out16), 0.0);

    // Two shards and their index.
    let sh = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), sh.path().join("config.json")).unwrap();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("diffusion_pytorch_model-00001-of-00002.safetensors", a),
        ("diffusion_pytorch_model-00002-of-00002.safetensors", b),
    ] {
        let m: HashMap<String, Tensor> = part
            .iter()
            .map(|k| ((*k).clone(), weights[*k].clone()))
            .collect();
        candle_core::safetensors::save(&m, sh.path().join(file)).unwrap();
        for k in part.iter() {
            map.insert((*k).clone(), file.into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(
        sh.path()
            .join("diffusion_pytorch_model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert_eq!(max_diff(&unet_out(sh.path(), None), &reference), 0.0);

    // A shard listed in the index but missing is named.
    std::fs::remove_file(
        sh.path()
            .join("diffusion_pytorch_model-00002-of-00002.safetensors"),
    )
    .unwrap();
    let err = UNet2DConditionModel::load(sh.path(), None, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("00002-of-00002"), "{err}");
}

#[test]
fn whole_model_loads_in_each_dtype() {
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let m = StableDiffusion::load(
            &fixtures().join("tiny-sd"),
            &LoadOptions {
                dtype: dt,
                device: Device::Cpu,
                variant: None,
            },
        )
        .unwrap();
        assert_eq!(m.dtype(), dt);
        assert_eq!(m.vae_scale_factor(), 2);
        let e = m.encode_prompts(&["a red cube", ""]).unwrap();
        assert_eq!(e.hidden_states.dims(), &[2, 77, 32]);
        assert!(e.pooled.is_none());
    }
}

#[test]
fn missing_parts_are_named() {
    let err = resolve_model("./no/such/folder", None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no/such/folder"), "{err}");
    let tmp = tempfile::tempdir().unwrap();
    let err = resolve_model(tmp.path().to_str().unwrap(), None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model_index.json"), "{err}");
    let m = tmp.path().join("m");
    copy_dir(&fixtures().join("tiny-sd"), &m);
    std::fs::remove_file(m.join("scheduler/scheduler_config.json")).unwrap();
    let err = StableDiffusion::load(&m, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("scheduler_config.json"), "{err}");
    std::fs::remove_dir_all(m.join("tokenizer")).unwrap();
    let err = StableDiffusion::load(&m, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("tokenizer"), "{err}");
}
