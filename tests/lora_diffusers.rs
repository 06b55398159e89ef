//! A LoRA trained by `diffpref train dpo` has the same effect in diffusers (`load_lora_weights`) as in diffpref:
//! the PEFT and kohya files in `tests/fixtures/parity/` (rank 4, alpha 8, attention + proj_in/proj_out 1×1 convs +
//! feed-forward), loaded by diffusers 0.42.1, gave the UNet outputs and the pipeline run stored in
//! `lora_diffusers.safetensors` (kind `lora_unet`, made by `make_lora_golden.py`; tolerances: 10× the float32 vs
//! float64 difference of diffusers itself).

use candle_core::{DType, Device, Tensor};
use diffpref::pipelines::models::unet::UNet2DConditionModel;
use diffpref::train::lora::{LoadMode, LoraSet};
use diffpref_pipelines::golden::{Comparison, Golden};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn parity(name: &str) -> PathBuf {
    fixtures().join("parity").join(name)
}

fn golden() -> Golden {
    let g = Golden::load(parity("lora_diffusers.safetensors")).unwrap();
    assert_eq!(g.kind(), Some("lora_unet"));
    g
}

fn check(c: Comparison) {
    println!("{c}");
    assert!(c.passed, "{c}");
}

/// The number of adapted modules in a LoRA file (its `lora_A` / `lora_down` tensors).
fn modules_in_file(path: &Path) -> usize {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .keys()
        .filter(|k| k.ends_with(".lora_A.weight") || k.ends_with(".lora_down.weight"))
        .count()
}

#[test]
fn unet_with_diffpref_lora_files_matches_diffusers_load_lora_weights() {
    let g = golden();
    let unet = UNet2DConditionModel::load(
        fixtures().join("tiny-sd/unet"),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let x = g.get("sample").unwrap();
    let t = g.get("timesteps").unwrap();
    let c = g.get("encoder_hidden_states").unwrap();
    let run = || -> Tensor { unet.forward(x, t, c, None).unwrap() };

    let base = run();
    check(g.compare("unet_out_base", &base, 1.0).unwrap());
    for (file, name) in [
        ("lora_peft.safetensors", "unet_out_lora_peft"),
        ("lora_kohya.safetensors", "unet_out_lora_kohya"),
    ] {
        let path = parity(file);
        let set = LoraSet::load(&unet, &path, LoadMode::Frozen { scale: 1.0 }).unwrap();
        // diffusers wrapped every module of the file (checked by the script); so must we.
        assert_eq!(set.len(), modules_in_file(&path), "{file}");
        assert_eq!(set.len(), 72, "{file}");
        check(g.compare(name, &run(), 1.0).unwrap());
        // the LoRA's effect is far above the tolerance (a file applied with the wrong scale would fail)
        let effect = (g.get(name).unwrap() - g.get("unet_out_base").unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(effect > 0.1, "{name}: LoRA effect {effect}");
        set.detach_from(&unet);
        let again = run();
        assert_eq!(
            (again - &base)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0,
            "{file}: detaching did not restore the base UNet"
        );
    }
}

#[test]
fn generate_with_diffpref_lora_matches_the_diffusers_pipeline() {
    let g = golden();
    let prompts: Vec<String> = serde_json::from_str(g.meta("prompts").unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let init = tmp.path().join("init.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([(
            "init_latents".to_string(),
            g.get("init_latents").unwrap().clone(),
        )]),
        &init,
    )
    .unwrap();
    // The golden ran diffusers with the PEFT file; the kohya file holds the same LoRA.
    for file in ["lora_peft.safetensors", "lora_kohya.safetensors"] {
        let trace = tmp.path().join(format!("trace-{file}"));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_diffpref"))
            .args([
                "generate",
                "--model",
                fixtures().join("tiny-sd").to_str().unwrap(),
            ])
            .args(["--prompt", &prompts[0], "--prompt", &prompts[1]])
            .args(["--steps", "8", "--guidance", "7.5"])
            .args(["--lora", parity(file).to_str().unwrap()])
            .args([
                "--init-latents",
                init.to_str().unwrap(),
                "--trace",
                trace.to_str().unwrap(),
            ])
            .args(["--out", tmp.path().join("o").to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let t = candle_core::safetensors::load(&trace, &Device::Cpu).unwrap();
        println!("generate --lora {file}:");
        for (golden_name, trace_name) in [
            ("latents_per_step", "latents_per_step"),
            ("latents_final", "final_latents"),
            ("image", "image"),
        ] {
            check(g.compare(golden_name, &t[trace_name], 1.0).unwrap());
        }
    }
}
