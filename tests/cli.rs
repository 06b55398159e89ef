//! End-to-end tests of the `diffpref` binary on the tiny test model.

use candle_core::{DType, Device, Tensor};
use common::{differing_pixels, upscale, GridLayout};
use diffpref_pipelines::golden::Golden;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn diffpref(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diffpref"))
        .args(args)
        .output()
        .expect("run diffpref")
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "diffpref failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn tiny() -> String {
    fixtures().join("tiny-sd").display().to_string()
}

#[test]
fn generate_writes_pngs_trace_and_step_strips() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    let trace = tmp.path().join("trace.safetensors");
    let steps_dir = tmp.path().join("steps");
    let o = diffpref(&[
        "generate",
        "--model",
        &tiny(),
        "--prompt",
        "a red cube",
        "--prompt",
        "a blue sphere",
        "--negative-prompt",
        "blurry",
        "--steps",
        "4",
        "--seed",
        "3",
        "--trace",
        trace.to_str().unwrap(),
        "--every-step",
        steps_dir.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    ok(&o);
    // Two PNGs (and the output marker).
    let pngs: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("png".as_ref()))
        .collect();
    assert_eq!(pngs.len(), 2);
    let img = image::open(out_dir.join("000-a-red-cube.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(img.dimensions(), (32, 32));
    let t = candle_core::safetensors::load(&trace, &Device::Cpu).unwrap();
    assert_eq!(t["timesteps"].dims(), &[4]);
    assert_eq!(t["latents_per_step"].dims(), &[4, 2, 4, 16, 16]);
    assert_eq!(t["final_latents"].dims(), &[2, 4, 16, 16]);
    assert_eq!(t["image"].dims(), &[2, 3, 32, 32]);
    let last = t["latents_per_step"].get(3).unwrap();
    let d = (last - &t["final_latents"])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
    let im = &t["image"];
    assert!(im.min_all().unwrap().to_scalar::<f32>().unwrap() >= 0.0);
    assert!(im.max_all().unwrap().to_scalar::<f32>().unwrap() <= 1.0);
    let strip = image::open(steps_dir.join("001-a-blue-sphere.png"))
        .unwrap()
        .to_rgb8();
    assert!(strip.width() >= 4 * 32, "strip holds one frame per step");

    // The same seed gives the same images.
    let out2 = tmp.path().join("out2");
    ok(&diffpref(&[
        "generate",
        "--model",
        &tiny(),
        "--prompt",
        "a red cube",
        "--prompt",
        "a blue sphere",
        "--negative-prompt",
        "blurry",
        "--steps",
        "4",
        "--seed",
        "3",
        "--out",
        out2.to_str().unwrap(),
    ]));
    let a = image::open(out_dir.join("000-a-red-cube.png"))
        .unwrap()
        .to_rgb8();
    let b = image::open(out2.join("000-a-red-cube.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(a.as_raw(), b.as_raw());
}

#[test]
fn generate_with_init_latents_matches_the_diffusers_pipeline() {
    let g = Golden::load(fixtures().join("golden/pipeline_sd15.safetensors")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let lat = tmp.path().join("init.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([(
            "init_latents".to_string(),
            g.get("init_latents").unwrap().clone(),
        )]),
        &lat,
    )
    .unwrap();
    let trace = tmp.path().join("trace.safetensors");
    ok(&diffpref(&[
        "generate",
        "--model",
        &tiny(),
        "--prompt",
        "a photograph of an astronaut riding a horse",
        "--prompt",
        "a red cube on a blue sphere",
        "--steps",
        "8",
        "--scheduler",
        "ddim",
        "--guidance",
        "7.5",
        "--init-latents",
        lat.to_str().unwrap(),
        "--trace",
        trace.to_str().unwrap(),
        "--out",
        tmp.path().join("o").to_str().unwrap(),
    ]));
    let t = candle_core::safetensors::load(&trace, &Device::Cpu).unwrap();
    for (name, golden) in [
        ("latents_per_step", "latents_per_step"),
        ("final_latents", "final_latents"),
        ("image", "image"),
    ] {
        let c = g.compare(golden, &t[name], 1.0).unwrap();
        println!("{c}");
        assert!(c.passed, "{c}");
    }
    let c = g.compare("timesteps", &t["timesteps"], 1.0).unwrap();
    assert!(c.passed, "{c}");
}

#[test]
fn bad_model_folder_and_bad_latents_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let o = diffpref(&[
        "generate",
        "--model",
        tmp.path().to_str().unwrap(),
        "--prompt",
        "x",
        "--out",
        "unused",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("model_index.json"), "{}", stderr(&o));

    // A model folder whose UNet weights are missing.
    let broken = tmp.path().join("broken");
    copy_dir(&fixtures().join("tiny-sd"), &broken);
    std::fs::remove_file(broken.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let o = diffpref(&[
        "generate",
        "--model",
        broken.to_str().unwrap(),
        "--prompt",
        "x",
        "--out",
        "unused",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unet/diffusion_pytorch_model.safetensors"),
        "{}",
        stderr(&o)
    );

    // Latents file without `init_latents`, then with a wrong shape, then not safetensors at all.
    let lat = tmp.path().join("lat.safetensors");
    let z = Tensor::zeros((1, 4, 16, 16), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents".to_string(), z)]),
        &lat,
    )
    .unwrap();
    let o = diffpref(&[
        "generate",
        "--model",
        &tiny(),
        "--prompt",
        "x",
        "--steps",
        "2",
        "--init-latents",
        lat.to_str().unwrap(),
        "--out",
        "unused",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("init_latents") && stderr(&o).contains("lat.safetensors"),
        "{}",
        stderr(&o)
    );

    let z = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("init_latents".to_string(), z)]),
        &lat,
    )
    .unwrap();
    let o = diffpref(&[
        "generate",
        "--model",
        &tiny(),
        "--prompt",
        "x",
        "--steps",
        "2",
        "--init-latents",
        lat.to_str().unwrap(),
        "--out",
        "unused",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("[1, 4, 8, 8]") && stderr(&o).contains("[1, 4, 16, 16]"),
        "{}",
        stderr(&o)
    );

    std::fs::write(&lat, b"not a tensor file").unwrap();
    let o = diffpref(&[
        "generate",
        "--model",
        &tiny(),
        "--prompt",
        "x",
        "--init-latents",
        lat.to_str().unwrap(),
        "--out",
        "unused",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("lat.safetensors"), "{}", stderr(&o));
}

#[test]
fn grid_has_one_labelled_cell_per_prompt_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("grid.png");
    let prompts = ["a red cube", "a green ball"];
    ok(&diffpref(&[
        "grid",
        "--model",
        &tiny(),
        "--prompt",
        prompts[0],
        "--prompt",
        prompts[1],
        "--guidance",
        "1",
        "--guidance",
        "7.5",
        "--seed",
        "1",
        "--seed",
        "2",
        "--steps",
        "3",
        "--scale",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]));
    let img = image::open(&out).unwrap().to_rgb8();
    // 2 rows (prompts) and 4 columns (guidance-major: cfg 1 seed 1, cfg 1 seed 2, cfg 7.5 seed 1, cfg 7.5
    // seed 2) of 32x32 samples upscaled 2x, after a row-label column and a column-label band.
    let l = GridLayout::of(&img, 2, 4, (32, 32), 2);
    assert!(l.x0 > l.gap && l.y0 > l.gap, "no label areas: {l:?}");
    let cells: Vec<Vec<image::RgbImage>> = (0..2)
        .map(|r| (0..4).map(|c| l.cell(&img, r, c)).collect())
        .collect();
    // Every cell is an upscaled sample: constant 2x2 blocks.
    for cell in cells.iter().flatten() {
        let small = image::imageops::resize(cell, 32, 32, image::imageops::FilterType::Nearest);
        assert_eq!(
            upscale(&small, 2),
            *cell,
            "a cell is not a 2x nearest upscale"
        );
    }
    // Other seeds, other guidance and other prompts all change most of a cell.
    let many = (64 * 64) / 2;
    for (r, row) in cells.iter().enumerate() {
        for a in 0..4 {
            for b in a + 1..4 {
                let n = differing_pixels(&row[a], &row[b]);
                assert!(
                    n > many,
                    "row {r}: columns {a} and {b} differ in only {n} pixels"
                );
            }
        }
    }
    for (c, (top, bottom)) in cells[0].iter().zip(&cells[1]).enumerate() {
        let n = differing_pixels(top, bottom);
        assert!(
            n > many,
            "column {c}: the two prompts differ in only {n} pixels"
        );
    }
    // Each column is what `diffpref generate` draws with that guidance from that seed's noise (the grid gives
    // every prompt of a column the same noise: `seeded_noise(seed)` repeated over the prompts), upscaled.
    for (col, guidance, seed) in [(3usize, "7.5", 2u64), (0, "1", 1)] {
        let lat = tmp.path().join(format!("noise-{seed}.safetensors"));
        let noise = diffpref_pipelines::pipeline::seeded_noise(seed, &[1, 4, 16, 16], &Device::Cpu)
            .unwrap()
            .repeat((2, 1, 1, 1))
            .unwrap();
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("init_latents".to_string(), noise)]),
            &lat,
        )
        .unwrap();
        let dir = tmp.path().join(format!("gen-{col}"));
        ok(&diffpref(&[
            "generate",
            "--model",
            &tiny(),
            "--prompt",
            prompts[0],
            "--prompt",
            prompts[1],
            "--guidance",
            guidance,
            "--steps",
            "3",
            "--init-latents",
            lat.to_str().unwrap(),
            "--out",
            dir.to_str().unwrap(),
        ]));
        for (r, name) in ["000-a-red-cube.png", "001-a-green-ball.png"]
            .iter()
            .enumerate()
        {
            let single = image::open(dir.join(name)).unwrap().to_rgb8();
            let n = differing_pixels(&upscale(&single, 2), &cells[r][col]);
            assert_eq!(n, 0, "row {r}, column {col} (cfg {guidance}, seed {seed}) differs from `generate` in {n} pixels");
        }
    }
    // And without --init-latents, `generate --seed S` of one prompt draws the same noise as the grid's column.
    let dir = tmp.path().join("gen-seed");
    ok(&diffpref(&[
        "generate",
        "--model",
        &tiny(),
        "--prompt",
        prompts[1],
        "--guidance",
        "7.5",
        "--seed",
        "1",
        "--steps",
        "3",
        "--out",
        dir.to_str().unwrap(),
    ]));
    let single = image::open(dir.join("000-a-green-ball.png"))
        .unwrap()
        .to_rgb8();
    // (A batch of another size may round a float sum differently: a few pixels may move by one level.)
    let (a, b) = (upscale(&single, 2), &cells[1][2]);
    let n = differing_pixels(&a, b);
    let worst = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0);
    assert!(
        worst <= 1 && n * 100 <= a.pixels().len(),
        "`generate --seed 1` differs from the grid's cfg 7.5 / seed 1 cell in {n} pixels, by up to {worst} levels"
    );
}

#[test]
fn verify_passes_on_the_goldens_and_fails_on_wrong_weights() {
    let gold = fixtures().join("golden");
    let files: Vec<String> = [
        "text_encoder",
        "unet",
        "vae",
        "pipeline_sd15",
        "scheduler_common",
        "scheduler_ddim_eta0",
        "scheduler_ddim_eta1",
        "scheduler_ddpm",
        "scheduler_euler",
        "scheduler_euler_ancestral",
        "scheduler_dpmpp_2m",
        "scheduler_timesteps",
        "ddim_logprob",
    ]
    .iter()
    .map(|f| gold.join(format!("{f}.safetensors")).display().to_string())
    .collect();
    let mut args = vec!["verify", "--model"];
    let t = tiny();
    args.push(&t);
    args.extend(files.iter().map(|s| s.as_str()));
    let o = diffpref(&args);
    ok(&o);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("0 failed, 0 errors"), "{stdout}");
    // The tokenizer golden is the real CLIP tokenizer's (the tiny models use a small one): a tokenizer folder
    // is a valid --model for it.
    let clip = fixtures().join("clip-tokenizer");
    let o = diffpref(&[
        "verify",
        "--model",
        clip.to_str().unwrap(),
        gold.join("tokenizer.safetensors").to_str().unwrap(),
    ]);
    ok(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("2 passed, 0 failed, 0 errors"), "{out}");
    // And it compared something: at least one tensor per golden file.
    let passed: usize = stdout
        .lines()
        .find_map(|l| l.strip_suffix(" passed, 0 failed, 0 errors"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        passed >= files.len(),
        "{passed} tensors compared for {} goldens:\n{stdout}",
        files.len()
    );

    // Same architecture, other weights: the UNet check must fail, and the exit status says so.
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("other");
    copy_dir(&fixtures().join("tiny-sd"), &other);
    std::fs::copy(
        gold.join("dpo_ref_unet.safetensors"),
        other.join("unet/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let o = diffpref(&[
        "verify",
        "--model",
        other.to_str().unwrap(),
        gold.join("unet.safetensors").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("FAIL"));

    // In half precision the DPO golden's implicit accuracy (a fraction of 0/1 decisions) is reported, not
    // judged; in f32 it is compared.
    let dpo = gold.join("dpo.safetensors");
    let o = diffpref(&[
        "verify",
        "--dtype",
        "f16",
        "--model",
        &t,
        dpo.to_str().unwrap(),
    ]);
    ok(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.contains("implicit_acc"))
        .unwrap_or("");
    assert!(line.contains("not judged in F16"), "{out}");
    let o = diffpref(&["verify", "--model", &t, dpo.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.contains("implicit_acc"))
        .unwrap_or("");
    assert!(
        line.starts_with("  ok") && !line.contains("not judged"),
        "{out}"
    );
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
