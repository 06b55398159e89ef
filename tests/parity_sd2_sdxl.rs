//! Parity with diffusers on SD2-style (v-prediction, linear projections, per-block heads, upcast attention,
//! `!` padding, exact GELU text encoder) and SDXL-style (two text encoders, pooled projection, text_time
//! micro-conditioning, Euler) tiny models, and the embedded `assets/tiny-shapes`. Goldens: `tests/fixtures/parity/`
//! (made by the scripts there).

use candle_core::Device;
use diffpref_pipelines::checks::{self, CheckContext};
use diffpref_pipelines::golden::Golden;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn run_all(model: &str, goldens: &[&str]) {
    let ctx = CheckContext::cpu(Some(fixtures().join(model)));
    for name in goldens {
        let g = Golden::load(fixtures().join("parity").join(name)).unwrap();
        let res = checks::run(&g, &ctx).unwrap().expect("known kind");
        for c in &res {
            println!("{name}: {c}");
        }
        assert!(
            !res.is_empty() && res.iter().all(|c| c.passed),
            "{name} failed"
        );
    }
}

#[test]
fn sd2_style_model_matches_diffusers() {
    run_all(
        "tiny-sd2",
        &[
            "sd2/tokenizer.safetensors",
            "sd2/text_encoder.safetensors",
            "sd2/unet.safetensors",
            "sd2/vae.safetensors",
            "pipeline_sd2.safetensors",
        ],
    );
}

#[test]
fn sdxl_style_model_matches_diffusers() {
    run_all(
        "tiny-sdxl",
        &[
            "sdxl/text_encoder.safetensors",
            "sdxl/text_encoder_2.safetensors",
            "sdxl/vae.safetensors",
            "pipeline_sdxl.safetensors",
        ],
    );
}

/// The embedded shapes-world model (`assets/tiny-shapes`, written by `diffpref pretrain`) loads in diffusers'
/// StableDiffusionPipeline and generates what diffpref generates.
#[test]
fn embedded_tiny_shapes_model_matches_diffusers() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-shapes");
    let ctx = CheckContext::cpu(Some(model));
    let g = Golden::load(fixtures().join("parity/pipeline_tiny_shapes.safetensors")).unwrap();
    let res = checks::run(&g, &ctx).unwrap().expect("known kind");
    for c in &res {
        println!("tiny-shapes: {c}");
    }
    assert!(!res.is_empty() && res.iter().all(|c| c.passed));
}

#[test]
fn sdxl_generate_trace_from_the_cli_matches_diffusers() {
    let g = Golden::load(fixtures().join("parity/pipeline_sdxl.safetensors")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let init = tmp.path().join("init.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([(
            "init_latents".to_string(),
            g.get("init_latents").unwrap().clone(),
        )]),
        &init,
    )
    .unwrap();
    let trace = tmp.path().join("trace.safetensors");
    let prompts: Vec<String> = serde_json::from_str(g.meta("prompts").unwrap()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_diffpref"))
        .args([
            "generate",
            "--model",
            fixtures().join("tiny-sdxl").to_str().unwrap(),
        ])
        .args([
            "--prompt",
            &prompts[0],
            "--prompt",
            &prompts[1],
            "--steps",
            "8",
            "--guidance",
            "7.5",
        ])
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
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = candle_core::safetensors::load(&trace, &Device::Cpu).unwrap();
    for name in ["latents_per_step", "final_latents", "image", "image_raw"] {
        let c = g.compare(name, &t[name], 1.0).unwrap();
        println!("{c}");
        assert!(c.passed, "{c}");
    }
}
