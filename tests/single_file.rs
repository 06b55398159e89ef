//! Single-file (original LDM layout) checkpoints: the converter writes exactly the files diffusers'
//! `from_single_file` was checked to read (golden digests from `scripts/check_single_file.py`), a single file
//! loads, generates, trains and merges like its folder, and bad files are named.

use common::{fixtures, make_pairs};
use diffpref_pipelines::loading::{LoadOptions, StableDiffusion};
use diffpref_pipelines::pipeline::{GenerateOptions, Pipeline};
use diffpref_pipelines::single_file::{config_files, folder_to_ldm, write_folder};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

const MODELS: [&str; 3] = ["tiny-sd", "tiny-sd2", "tiny-sdxl"];

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diffpref"))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{cmd:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The single file of a fixture model, written by `diffpref convert`, with its configs as `<stem>.config/`.
fn single_file(dir: &Path, model: &str) -> PathBuf {
    let file = dir.join(format!("{model}.safetensors"));
    run_ok(
        bin()
            .args(["convert", "--model"])
            .arg(fixtures().join(model))
            .arg("--out")
            .arg(&file),
    );
    let src = fixtures().join(model);
    for f in config_files(&src).unwrap() {
        let to = dir
            .join(format!("{model}.config"))
            .join(f.strip_prefix(&src).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&f, &to).unwrap();
    }
    file
}

/// sha256 of the tensor's little-endian bytes in its own dtype (as `scripts/check_single_file.py` hashes them).
fn digest(t: &candle_core::Tensor) -> String {
    let mut bytes = Vec::new();
    t.flatten_all().unwrap().write_bytes(&mut bytes).unwrap();
    format!("{:x}", Sha256::digest(&bytes))
}

/// numpy's name of a dtype, as the golden stores it.
fn numpy_dtype(d: candle_core::DType) -> &'static str {
    match d {
        candle_core::DType::F32 => "float32",
        candle_core::DType::F16 => "float16",
        candle_core::DType::BF16 => "bfloat16",
        other => panic!("a checkpoint tensor of dtype {other:?}"),
    }
}

#[test]
fn the_converter_writes_what_diffusers_read() {
    let text = std::fs::read_to_string(fixtures().join("golden/single_file.json")).unwrap();
    // model -> key -> (shape, dtype, sha256)
    type Digests = BTreeMap<String, (Vec<usize>, String, String)>;
    let golden: BTreeMap<String, Digests> = serde_json::from_str(&text).unwrap();
    for model in MODELS {
        let want = &golden[model];
        let (_, tensors) = folder_to_ldm(&fixtures().join(model), None).unwrap();
        let got: Digests = tensors
            .iter()
            .map(|(k, t)| {
                (
                    k.clone(),
                    (
                        t.dims().to_vec(),
                        numpy_dtype(t.dtype()).to_string(),
                        digest(t),
                    ),
                )
            })
            .collect();
        let missing: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).collect();
        let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{model}: missing {missing:?}, extra {extra:?}"
        );
        for (k, w) in want {
            assert_eq!(&got[k], w, "{model}: {k}");
        }
    }
}

fn generate(model: &StableDiffusion) -> Vec<f32> {
    let pipe = Pipeline::new(model).unwrap();
    let out = pipe
        .generate(
            &["a red circle", "two blue squares"],
            &[],
            &GenerateOptions {
                steps: 2,
                seed: 5,
                ..Default::default()
            },
            None,
        )
        .unwrap();
    out.images.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn a_single_file_round_trips_and_generates_like_its_folder() {
    let tmp = tempfile::tempdir().unwrap();
    for model in MODELS {
        let file = single_file(tmp.path(), model);
        let back = tmp.path().join(format!("{model}-back"));
        write_folder(&file, &fixtures().join(model), None, &back).unwrap();
        // Folder -> file -> folder -> file: the same tensors.
        let (_, a) = folder_to_ldm(&back, None).unwrap();
        let b = diffpref_pipelines::single_file::read_tensors(&file).unwrap();
        let a: BTreeMap<String, String> = a.iter().map(|(k, t)| (k.clone(), digest(t))).collect();
        let b: BTreeMap<String, String> = b.iter().map(|(k, t)| (k.clone(), digest(t))).collect();
        assert_eq!(a, b, "{model}");
        // Every component computes exactly what the folder's does: text encoders, UNet, VAE decoder.
        let opts = LoadOptions::default();
        let want = generate(&StableDiffusion::load(&fixtures().join(model), &opts).unwrap());
        let got = generate(&StableDiffusion::load(&back, &opts).unwrap());
        assert_eq!(got, want, "{model}");
    }
}

#[test]
fn bad_single_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let file = single_file(tmp.path(), "tiny-sd");
    let config = fixtures().join("tiny-sd");
    let mut tensors = diffpref_pipelines::single_file::read_tensors(&file).unwrap();
    let save = |name: &str, t: &[(String, candle_core::Tensor)]| {
        let p = tmp.path().join(name);
        let map: std::collections::HashMap<String, candle_core::Tensor> =
            t.iter().cloned().collect();
        candle_core::safetensors::save(&map, &p).unwrap();
        p
    };
    // A key no rule maps.
    let mut bogus = tensors.clone();
    bogus.push((
        "model.diffusion_model.input_blocks.1.0.bogus.weight".into(),
        candle_core::Tensor::zeros(3, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
    ));
    let p = save("bogus.safetensors", &bogus);
    let e = format!(
        "{:#}",
        write_folder(&p, &config, None, &tmp.path().join("x")).unwrap_err()
    );
    assert!(
        e.contains("unmapped key `model.diffusion_model.input_blocks.1.0.bogus.weight`"),
        "{e}"
    );
    // A tensor the VAE needs is missing: loading the converted folder names it.
    tensors.retain(|(k, _)| k != "first_stage_model.decoder.conv_in.weight");
    let p = save("missing.safetensors", &tensors);
    let out = tmp.path().join("missing");
    write_folder(&p, &config, None, &out).unwrap();
    let e = StableDiffusion::load(&out, &LoadOptions::default())
        .err()
        .map(|e| e.to_string())
        .unwrap();
    assert!(e.contains("decoder.conv_in.weight"), "{e}");
    // Not a Stable Diffusion checkpoint at all (a LoRA file), and an SD 1.x file read with SDXL configs.
    let lora = fixtures().join("parity/lora_peft.safetensors");
    let e = format!(
        "{:#}",
        write_folder(&lora, &config, None, &tmp.path().join("y")).unwrap_err()
    );
    assert!(
        e.contains("not a single-file Stable Diffusion checkpoint"),
        "{e}"
    );
    let e = format!(
        "{:#}",
        write_folder(
            &file,
            &fixtures().join("tiny-sdxl"),
            None,
            &tmp.path().join("z")
        )
        .unwrap_err()
    );
    assert!(e.contains("Sd1") && e.contains("Sdxl"), "{e}");
    // The CLI: a folder --out for a single file, and an existing file without --overwrite.
    let e = run_err(
        bin()
            .args(["convert", "--model"])
            .arg(&config)
            .arg("--out")
            .arg(tmp.path().join("o.bin")),
    );
    assert!(e.contains(".safetensors"), "{e}");
    let e = run_err(
        bin()
            .args(["convert", "--model"])
            .arg(&config)
            .arg("--out")
            .arg(&file),
    );
    assert!(e.contains("--overwrite"), "{e}");
}

fn metrics_losses(dir: &Path) -> Vec<f64> {
    diffpref::train::metrics::read_metrics(dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|r| r["loss"].as_f64())
        .collect()
}

/// `--model FILE.safetensors` (converted once into `$DIFFPREF_CACHE`, configs from `FILE.config/`): `generate`
/// draws the folder's image, `train dpo` logs the folder's losses, `lora merge --single-file` writes the folder
/// merge's UNet, and a prediction-type override reaches the scheduler.
#[test]
fn the_cli_generates_trains_and_merges_from_a_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let file = single_file(tmp.path(), "tiny-sd");
    let folder = fixtures().join("tiny-sd");
    let env = |c: &mut Command| {
        c.env("DIFFPREF_CACHE", &cache);
    };
    let gen = |model: &Path, out: &str| {
        let mut c = bin();
        env(&mut c);
        run_ok(
            c.args([
                "generate",
                "--prompt",
                "a red circle",
                "--steps",
                "2",
                "--seed",
                "4",
            ])
            .arg("--model")
            .arg(model)
            .arg("--out")
            .arg(tmp.path().join(out)),
        );
        image::open(tmp.path().join(out).join("000-a-red-circle.png"))
            .unwrap()
            .to_rgb8()
    };
    assert_eq!(gen(&file, "g-file"), gen(&folder, "g-folder"));
    let converted: Vec<PathBuf> = std::fs::read_dir(cache.join("single-file"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(converted.len(), 1, "{converted:?}");
    // Reused, not converted again.
    gen(&file, "g-file-2");
    assert_eq!(
        std::fs::read_dir(cache.join("single-file"))
            .unwrap()
            .count(),
        1
    );

    let manifest = make_pairs(tmp.path(), 3);
    let cfg = tmp.path().join("dpo.toml");
    std::fs::write(
        &cfg,
        format!(
            "[data]\nmanifest = {:?}\nresolution = 32\n[optim]\nmax_steps = 3\nbatch_size = 2\nlr = 1e-2\n\
             warmup_steps = 0\n[log]\nprogress = false\n[lora]\nrank = 4\n",
            manifest.display().to_string()
        ),
    )
    .unwrap();
    let train = |model: &Path, out: &str| {
        let mut c = bin();
        env(&mut c);
        c.args(["train", "dpo", "--config"]).arg(&cfg);
        for s in [
            format!("model={:?}", model.display().to_string()),
            format!(
                "output_dir={:?}",
                tmp.path().join(out).display().to_string()
            ),
        ] {
            c.arg("--set").arg(s);
        }
        let out_text = c.output().unwrap();
        assert!(
            out_text.status.success(),
            "{}",
            String::from_utf8_lossy(&out_text.stderr)
        );
        tmp.path().join(out)
    };
    let (a, b) = (train(&file, "t-file"), train(&folder, "t-folder"));
    let (la, lb) = (metrics_losses(&a), metrics_losses(&b));
    assert_eq!(la.len(), 3);
    assert_eq!(la, lb);

    let lora = b.join("pytorch_lora_weights.safetensors");
    let mut c = bin();
    env(&mut c);
    run_ok(
        c.args(["lora", "merge", "--single-file", "--model"])
            .arg(&file)
            .arg("--lora")
            .arg(&lora)
            .arg("--out")
            .arg(tmp.path().join("merged.safetensors")),
    );
    run_ok(
        bin()
            .args(["lora", "merge", "--model"])
            .arg(&folder)
            .arg("--lora")
            .arg(&lora)
            .arg("--out")
            .arg(tmp.path().join("merged")),
    );
    let back = tmp.path().join("merged-back");
    write_folder(&tmp.path().join("merged.safetensors"), &folder, None, &back).unwrap();
    let unet = |d: &Path| -> BTreeMap<String, String> {
        diffpref_pipelines::single_file::read_tensors(
            &d.join("unet/diffusion_pytorch_model.safetensors"),
        )
        .unwrap()
        .iter()
        .map(|(k, t)| (k.clone(), digest(t)))
        .collect()
    };
    let merged = unet(&tmp.path().join("merged"));
    assert_eq!(unet(&back), merged);
    assert_ne!(merged, unet(&folder), "the LoRA changed the UNet");

    // --prediction-type reaches the converted scheduler config.
    let out = tmp.path().join("vpred");
    run_ok(
        bin()
            .args(["convert", "--prediction-type", "v_prediction", "--model"])
            .arg(&file)
            .arg("--out")
            .arg(&out),
    );
    let s: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("scheduler/scheduler_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(s["prediction_type"], "v_prediction");
}
