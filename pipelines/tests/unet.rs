//! UNet parity with diffusers and gradient coverage.

mod common;
use candle_core::{DType, Device, Tensor, Var};
use common::randn;
use diffpref_pipelines::checks::{self, CheckContext};
use diffpref_pipelines::golden::Golden;
use diffpref_pipelines::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use diffpref_pipelines::weights::{find_weight_files, Params};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

#[test]
fn unet_matches_diffusers() {
    let g = Golden::load(fixtures().join("golden/unet.safetensors")).unwrap();
    let res = checks::run(&g, &CheckContext::cpu(Some(fixtures().join("tiny-sd"))))
        .unwrap()
        .unwrap();
    for c in &res {
        println!("{c}");
    }
    assert_eq!(res.len(), 3);
    assert!(res.iter().all(|c| c.passed), "UNet parity failed");
}

#[test]
fn every_unet_parameter_and_input_gets_a_gradient() {
    let dir = fixtures().join("tiny-sd/unet");
    let cfg = UNet2DConditionConfig::load(&dir.join("config.json")).unwrap();
    let files = find_weight_files(&dir, "diffusion_pytorch_model", None).unwrap();
    let p = Params::from_files(&files, DType::F32, &Device::Cpu)
        .unwrap()
        .trainable();
    let unet = UNet2DConditionModel::new(&p, cfg).unwrap();
    let x = Var::from_tensor(&randn(1, 1., (2, 4, 16, 16), &Device::Cpu, DType::F32)).unwrap();
    let ctx = Var::from_tensor(&randn(2, 1., (2, 7, 32), &Device::Cpu, DType::F32)).unwrap();
    let t = Tensor::new(&[10f32, 700.], &Device::Cpu).unwrap();
    let y = unet
        .forward(x.as_tensor(), &t, ctx.as_tensor(), None)
        .unwrap();
    let w = randn(3, 1., y.shape(), &Device::Cpu, DType::F32);
    let loss = (y * w).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let vars = p.vars();
    assert!(vars.len() > 100);
    let mut bad = Vec::new();
    for (name, v) in vars.iter() {
        match grads.get(v.as_tensor()) {
            Some(g) => {
                let s = g
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                if !(s.is_finite() && s > 0.0) {
                    bad.push(format!("{name}: |grad| = {s}"));
                }
            }
            None => bad.push(format!("{name}: no gradient")),
        }
    }
    assert!(
        bad.is_empty(),
        "parameters without a usable gradient:\n{}",
        bad.join("\n")
    );
    for input in [&x, &ctx] {
        let g = grads.get(input.as_tensor()).expect("input gradient");
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }
}

#[test]
fn per_sample_timesteps_equal_one_at_a_time() {
    let unet = UNet2DConditionModel::load(
        fixtures().join("tiny-sd/unet"),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let x = randn(4, 1., (2, 4, 8, 8), &Device::Cpu, DType::F32);
    let c = randn(5, 1., (2, 5, 32), &Device::Cpu, DType::F32);
    let t = Tensor::new(&[3i64, 900], &Device::Cpu).unwrap();
    let both = unet.forward(&x, &t, &c, None).unwrap();
    for i in 0..2 {
        let one = unet
            .forward(
                &x.narrow(0, i, 1).unwrap(),
                &t.narrow(0, i, 1).unwrap(),
                &c.narrow(0, i, 1).unwrap(),
                None,
            )
            .unwrap();
        let d = (both.narrow(0, i, 1).unwrap() - one)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-4);
    }
}

#[test]
fn features_are_returned_per_block() {
    let unet = UNet2DConditionModel::load(
        fixtures().join("tiny-sd/unet"),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let x = randn(6, 1., (1, 4, 16, 16), &Device::Cpu, DType::F32);
    let c = randn(7, 1., (1, 77, 32), &Device::Cpu, DType::F32);
    let t = Tensor::new(&[500f32], &Device::Cpu).unwrap();
    let full = unet.forward_with_features(&x, &t, &c, None).unwrap();
    let feats = unet.forward_features(&x, &t, &c, None).unwrap();
    assert_eq!(full.down_features.len(), 2);
    assert_eq!(full.down_features[0].dims(), &[1, 32, 16, 16]);
    assert_eq!(full.down_features[1].dims(), &[1, 64, 8, 8]);
    let mid = full.mid_feature.unwrap();
    assert_eq!(mid.dims(), &[1, 64, 8, 8]);
    let d = (mid - feats.mid_feature.unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn unsupported_config_and_bad_weights_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-sd/unet");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["class_embed_type"] = "timestep".into();
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        src.join("diffusion_pytorch_model.safetensors"),
        tmp.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let err = UNet2DConditionModel::load(tmp.path(), None, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("class_embed_type") && err.contains("timestep"),
        "{err}"
    );

    cfg["class_embed_type"] = serde_json::Value::Null;
    cfg["cross_attention_dim"] = 48.into();
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let err = UNet2DConditionModel::load(tmp.path(), None, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("attn2.to_k.weight") && err.contains("[32, 48]") && err.contains("[32, 32]"),
        "{err}"
    );

    std::fs::remove_file(tmp.path().join("diffusion_pytorch_model.safetensors")).unwrap();
    let err = UNet2DConditionModel::load(tmp.path(), None, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
}
