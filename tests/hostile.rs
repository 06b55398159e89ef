//! Hostile input, as a careless or malicious user would give it, through the real binary: every case must end
//! with a clear error (exit status 1, not a panic or an abort) whose message names the culprit, and every file
//! that existed before must be byte-identical afterwards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diffpref"))
}

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets")
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// A workspace: a user's folder of files, a fake model folder, a prompts file and a LoRA file.
struct World {
    tmp: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        let tmp = tempfile::tempdir().unwrap();
        let w = World { tmp };
        std::fs::create_dir_all(w.path("photos")).unwrap();
        std::fs::write(w.path("photos/me.jpg"), b"my photo").unwrap();
        std::fs::create_dir_all(w.path("model/unet")).unwrap();
        std::fs::write(w.path("model/model_index.json"), b"{}").unwrap();
        std::fs::write(w.path("model/unet/config.json"), b"{\"sample_size\": 8}").unwrap();
        std::fs::write(w.path("prompts.txt"), b"a red circle\na blue square\n").unwrap();
        std::fs::write(w.path("lora.safetensors"), b"not really").unwrap();
        w
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn s(&self, rel: &str) -> String {
        self.path(rel).display().to_string()
    }

    /// Runs `args` in the workspace and checks: exit status 1, the message contains every `names`, and no
    /// file of the workspace changed.
    fn refuses(&self, args: &[&str], names: &[&str]) {
        let before = snapshot(self.tmp.path());
        let out = bin()
            .args(args)
            .current_dir(self.tmp.path())
            .env("DIFFPREF_ASSETS", assets())
            .output()
            .unwrap();
        // What the user sees: the report on stdout, the error on stderr.
        let err = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: expected a clean error, got {:?}\n{err}",
            out.status
        );
        for n in names {
            assert!(
                err.to_lowercase().contains(&n.to_lowercase()),
                "{args:?}: the message does not name {n:?}:\n{err}"
            );
        }
        let after = snapshot(self.tmp.path());
        let changed: Vec<_> = before
            .iter()
            .filter(|(p, b)| after.get(*p) != Some(*b))
            .map(|(p, _)| p.display().to_string())
            .collect();
        assert!(
            changed.is_empty(),
            "{args:?}: changed or removed {changed:?}"
        );
    }

    /// [`World::refuses`] for each `(args, names)`.
    fn refuses_all(&self, cases: &[(Vec<&str>, Vec<&str>)]) {
        for (args, names) in cases {
            self.refuses(args, names);
        }
    }
}

fn set(kv: String) -> [String; 2] {
    ["--set".into(), kv]
}

fn refuses_owned(w: &World, args: Vec<String>, names: &[&str]) {
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    w.refuses(&a, names);
}

#[test]
fn training_never_writes_into_the_model_a_users_folder_or_a_parent_of_its_inputs() {
    let w = World::new();
    let model = w.s("model");
    for method in ["dpo", "grpo"] {
        // The model folder itself (full fine-tuning would overwrite unet/), a folder inside it, a parent of it.
        for (out, rel) in [
            (model.clone(), "is the model"),
            (w.s("model/unet"), "lies inside the model"),
            (w.s("."), "contains the model"),
        ] {
            let mut args: Vec<String> = vec!["train".into(), method.into()];
            args.extend(set(format!("model={model:?}")));
            args.extend(set("mode=\"full\"".into()));
            args.extend(set(format!("output_dir={out:?}")));
            refuses_owned(&w, args, &["output_dir", rel]);
        }
        // A non-empty folder of the user's: refused, and the message says how to insist.
        let mut args: Vec<String> = vec!["train".into(), method.into()];
        args.extend(set(format!("output_dir={:?}", w.s("photos"))));
        refuses_owned(
            &w,
            args,
            &["output_dir", "photos", "not empty", "--overwrite"],
        );
    }
    // The DPO run folder may not be the [eval] prompts file's folder's parent either.
    let mut args: Vec<String> = vec!["train".into(), "grpo".into()];
    args.extend(set(format!("grpo.prompts={:?}", w.s("prompts.txt"))));
    args.extend(set(format!("output_dir={:?}", w.s("prompts.txt"))));
    refuses_owned(&w, args, &["output_dir", "[grpo] prompts file"]);
}

#[test]
fn pretrain_never_replaces_its_run_folder_a_parent_or_a_users_folder() {
    let w = World::new();
    std::fs::create_dir_all(w.path("runs/pre/vae")).unwrap();
    std::fs::write(w.path("runs/pre/vae/metrics.jsonl"), b"{\"step\":1}\n").unwrap();
    let tok = assets().join("tiny-shapes/tokenizer").display().to_string();
    let base = |out: &str, run: &str| -> Vec<String> {
        let mut a: Vec<String> = vec!["pretrain".into()];
        a.extend(set(format!("tokenizer={tok:?}")));
        a.extend(set(format!("run_dir={run:?}")));
        a.extend(set(format!("output_dir={out:?}")));
        a
    };
    let run = w.s("runs/pre");
    for (out, names) in [
        (run.clone(), vec!["output_dir", "is the run_dir"]),
        (w.s("runs"), vec!["output_dir", "contains the run_dir"]),
        (w.s("runs/pre/vae"), vec!["output_dir", "VAE stage folder"]),
        (w.s("photos"), vec!["output_dir", "photos", "not empty"]),
        (".".to_string(), vec!["output_dir", "contains the run_dir"]),
    ] {
        refuses_owned(&w, base(&out, &run), &names);
    }
    // A run folder that is a user's folder.
    refuses_owned(
        &w,
        base(&w.s("out-model"), &w.s("photos")),
        &["run_dir", "photos", "not empty"],
    );
}

#[test]
fn data_sample_and_tool_commands_refuse_their_inputs_and_foreign_folders() {
    let w = World::new();
    let (model, photos, prompts, lora) = (
        w.s("model"),
        w.s("photos"),
        w.s("prompts.txt"),
        w.s("lora.safetensors"),
    );
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec![
                "data",
                "make-prefs",
                "--model",
                &model,
                "--prompts",
                &prompts,
                "--pairs",
                "2",
                "--out",
                &photos,
            ],
            vec!["--out", "photos", "not empty"],
        ),
        (
            vec![
                "data",
                "make-prefs",
                "--model",
                &model,
                "--prompts",
                &prompts,
                "--pairs",
                "2",
                "--out",
                &model,
            ],
            vec!["--out", "is the --model folder"],
        ),
        (
            vec!["data", "render", "--prompts", &prompts, "--out", &photos],
            vec!["--out", "photos", "not empty"],
        ),
        (
            vec![
                "data",
                "render",
                "--prompts",
                &prompts,
                "--out",
                ".",
                "--overwrite",
            ],
            vec!["--out", "contains the --prompts file"],
        ),
        (
            vec![
                "data",
                "render",
                "--random",
                "2",
                "--out",
                "..",
                "--overwrite",
            ],
            vec!["--out", "working directory"],
        ),
        (
            vec![
                "data",
                "prompts",
                "--count",
                "3",
                "--exclude",
                &prompts,
                "--out",
                &prompts,
            ],
            vec!["--out", "--exclude file"],
        ),
        (
            vec![
                "generate",
                "--model",
                &model,
                "--prompt",
                "a red circle",
                "--out",
                &model,
            ],
            vec!["--out", "is the --model folder"],
        ),
        (
            vec![
                "generate",
                "--model",
                &model,
                "--prompt",
                "a red circle",
                "--out",
                &photos,
            ],
            vec!["--out", "photos", "not empty"],
        ),
        (
            vec![
                "generate",
                "--model",
                &model,
                "--prompt",
                "a red circle",
                "--lora",
                &lora,
                "--out",
                "new",
                "--trace",
                &lora,
            ],
            vec!["--trace", "--lora file"],
        ),
        (
            vec![
                "eval",
                "--model",
                &model,
                "--prompts",
                &prompts,
                "--out",
                &photos,
            ],
            vec!["--out", "photos", "not empty"],
        ),
        (
            vec![
                "grid",
                "--model",
                &model,
                "--prompt",
                "a red circle",
                "--lora",
                &lora,
                "--out",
                &lora,
            ],
            vec!["--out", "is the --lora file"],
        ),
        (
            vec![
                "lora", "merge", "--model", &model, "--lora", &lora, "--out", &model,
            ],
            vec!["--out", "is the --model folder"],
        ),
        (
            vec![
                "lora", "merge", "--model", &model, "--lora", &lora, "--out", &photos,
            ],
            vec!["--out", "photos", "not empty"],
        ),
        (
            vec!["bench", "align", "--out", &photos],
            vec!["--out", "photos", "not empty"],
        ),
    ];
    w.refuses_all(&cases);
}

#[test]
fn a_command_rewrites_its_own_output_whole_and_overwrite_is_explicit() {
    let w = World::new();
    let render = |n: &str, extra: &[&str]| {
        std::fs::write(w.path("p.txt"), n).unwrap();
        let mut args = vec![
            "data",
            "render",
            "--prompts",
            "p.txt",
            "--size",
            "16",
            "--out",
            "set",
        ];
        args.extend_from_slice(extra);
        let out = bin()
            .args(&args)
            .current_dir(w.tmp.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    render("a red circle\na blue square\na green triangle\n", &[]);
    assert!(w.path("set/00002.png").exists());
    // Its own earlier output: replaced whole, nothing of the old set left behind.
    render("a red circle\n", &[]);
    let mut names: Vec<String> = std::fs::read_dir(w.path("set"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![".diffpref-output", "00000.png", "manifest.jsonl"]
    );
    // Another command's folder needs --overwrite.
    std::fs::write(w.path("set/.diffpref-output"), "data make-prefs\n").unwrap();
    w.refuses(
        &[
            "data",
            "render",
            "--prompts",
            "p.txt",
            "--size",
            "16",
            "--out",
            "set",
        ],
        &["--out", "not empty", "data render"],
    );
    render("a red circle\n", &["--overwrite"]);
}

#[test]
fn verify_fails_closed() {
    let w = World::new();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let weights = fixtures
        .join("tiny-sd/unet/diffusion_pytorch_model.safetensors")
        .display()
        .to_string();
    for scale in ["nan", "-1", "0", "inf"] {
        w.refuses(
            &["verify", "--tolerance-scale", scale, &weights],
            &["--tolerance-scale", scale],
        );
    }
    // A run that compared nothing (a weights file, not a golden) is a failure, not "0 passed".
    w.refuses(&["verify", &weights], &["checked nothing"]);
    // A header length of 2^64 - 1 (index arithmetic would wrap), and a truncated file.
    let mut bad = u64::MAX.to_le_bytes().to_vec();
    bad.extend_from_slice(b"{}");
    std::fs::write(w.path("huge-header.safetensors"), &bad).unwrap();
    std::fs::write(w.path("short.safetensors"), b"abc").unwrap();
    w.refuses(
        &["verify", "huge-header.safetensors", "short.safetensors"],
        &[
            "huge-header.safetensors",
            "header length",
            "short.safetensors",
            "2 checks could not run",
        ],
    );
}

#[test]
fn absurd_sizes_and_non_finite_values_are_refused_before_any_work() {
    let w = World::new();
    let (model, prompts) = (w.s("model"), w.s("prompts.txt"));
    let gen = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "generate", "--model", &model, "--prompt", "x", "--out", "new",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    for (extra, names) in [
        (vec!["--guidance", "nan"], vec!["guidance", "NaN"]),
        (vec!["--guidance", "inf"], vec!["guidance", "inf"]),
        (vec!["--eta", "nan"], vec!["eta"]),
        (vec!["--steps", "0"], vec!["steps"]),
        (
            vec!["--width", "100000"],
            vec!["width", "100000", "DIFFPREF_MAX_SIDE"],
        ),
        (vec!["--height", "0"], vec!["height"]),
    ] {
        refuses_owned(&w, gen(&extra), &names);
    }
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec![
                "grid",
                "--model",
                &model,
                "--prompt",
                "x",
                "--scale",
                "134217728",
                "--out",
                "g.png",
            ],
            vec!["--scale", "134217728"],
        ),
        (
            vec![
                "grid",
                "--model",
                &model,
                "--prompt",
                "x",
                "--guidance",
                "7",
                "--guidance",
                "nan",
                "--out",
                "g.png",
            ],
            vec!["guidance", "NaN"],
        ),
        (
            vec![
                "eval",
                "--model",
                &model,
                "--prompts",
                &prompts,
                "--guidance",
                "inf",
            ],
            vec!["guidance"],
        ),
        (
            vec![
                "data",
                "make-prefs",
                "--model",
                &model,
                "--prompts",
                &prompts,
                "--pairs",
                "1",
                "--guidance",
                "nan",
                "--out",
                "p",
            ],
            vec!["guidance"],
        ),
        (
            vec!["train", "dpo", "--set", "data.resolution=100000"],
            vec!["[data] resolution", "100000"],
        ),
        (
            vec!["train", "grpo", "--set", "rollout.resolution=100000"],
            vec!["[rollout] resolution", "100000"],
        ),
        (
            vec!["pretrain", "--set", "data.resolution=100000"],
            vec!["[data] resolution", "100000"],
        ),
        (
            vec!["train", "dpo", "--set", "optim.ema_decay=1.5"],
            vec!["ema_decay", "1.5"],
        ),
        (
            vec!["train", "grpo", "--set", "optim.beta2=-1"],
            vec!["beta2", "-1"],
        ),
    ];
    w.refuses_all(&cases);
    // A small PNG declaring 20000 x 20000 pixels: refused from its header, not decoded into gigabytes.
    let chunk = |t: &[u8], d: &[u8]| -> Vec<u8> {
        let mut c = (d.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(t);
        c.extend_from_slice(d);
        let mut crc_in = t.to_vec();
        crc_in.extend_from_slice(d);
        c.extend_from_slice(&crc32(&crc_in).to_be_bytes());
        c
    };
    let mut ihdr = 20000u32.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&20000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    // A zlib stream of one stored byte (far too little data: the size must be refused first).
    png.extend(chunk(
        b"IDAT",
        &[
            0x78, 0x01, 0x01, 0x01, 0x00, 0xfe, 0xff, 0x00, 0x00, 0x01, 0x00, 0x01,
        ],
    ));
    png.extend(chunk(b"IEND", b""));
    std::fs::write(w.path("huge.png"), &png).unwrap();
    w.refuses(
        &[
            "score",
            "--reward",
            "shapes",
            "--prompt",
            "a red circle",
            "--images",
            "huge.png",
        ],
        &["huge.png", "8192", "DIFFPREF_MAX_SIDE"],
    );
}

/// The PNG chunk checksum (CRC-32, IEEE).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A copy of the tiny test model (symlinked weights) whose scheduler config is `scheduler`.
fn model_with_scheduler(w: &World, scheduler: &str) -> String {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd");
    let dst = w.path("bad-scheduler-model");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_name() == "scheduler" {
            std::fs::create_dir_all(&to).unwrap();
            std::fs::write(to.join("scheduler_config.json"), scheduler).unwrap();
        } else {
            std::fs::create_dir_all(&dst).unwrap();
            std::os::unix::fs::symlink(e.path(), &to).unwrap();
        }
    }
    dst.display().to_string()
}

#[test]
fn non_finite_tensors_and_absurd_schedules_are_named() {
    use candle_core::{Device, Tensor};
    let w = World::new();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny-sd")
        .display()
        .to_string();
    // All-NaN initial latents.
    let nan = Tensor::full(f32::NAN, (1, 4, 8, 8), &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("init_latents".to_string(), nan.clone())]),
        w.path("nan-latents.safetensors"),
    )
    .unwrap();
    w.refuses(
        &[
            "generate",
            "--model",
            &tiny,
            "--prompt",
            "x",
            "--init-latents",
            "nan-latents.safetensors",
            "--out",
            "o",
        ],
        &["--init-latents", "nan-latents.safetensors", "NaN"],
    );
    // A LoRA full of NaNs: merge refuses it (naming the tensor) and writes nothing.
    let lora = Tensor::full(f32::NAN, (4, 8), &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("down.to_q.lora_A.weight".to_string(), lora)]),
        w.path("nan-lora.safetensors"),
    )
    .unwrap();
    w.refuses(
        &[
            "lora",
            "merge",
            "--model",
            &tiny,
            "--lora",
            "nan-lora.safetensors",
            "--out",
            "merged",
        ],
        &["nan-lora.safetensors", "down.to_q.lora_A.weight", "NaN"],
    );
    assert!(!w.path("merged").exists());
    // An integer tensor where a LoRA matrix should be.
    let ints = Tensor::zeros((4, 8), candle_core::DType::I64, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("down.to_q.lora_A.weight".to_string(), ints)]),
        w.path("int-lora.safetensors"),
    )
    .unwrap();
    w.refuses(
        &[
            "generate",
            "--model",
            &tiny,
            "--prompt",
            "x",
            "--lora",
            "int-lora.safetensors",
            "--out",
            "o",
        ],
        &["down.to_q.lora_A.weight", "I64", "not floating point"],
    );
    // A scheduler whose betas are not variances.
    let text = std::fs::read_to_string(Path::new(&tiny).join("scheduler/scheduler_config.json"))
        .unwrap()
        .replace("\"beta_end\": 0.012", "\"beta_end\": 5.0");
    let bad = model_with_scheduler(&w, &text);
    w.refuses(
        &[
            "generate", "--model", &bad, "--prompt", "x", "--steps", "1", "--out", "o",
        ],
        &["beta_end", "5"],
    );
}

#[test]
fn out_of_range_counts_and_config_values_are_named() {
    let w = World::new();
    let (model, prompts) = (w.s("model"), w.s("prompts.txt"));
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec![
                "data", "render", "--random", "1", "--size", "100000", "--out", "r",
            ],
            vec!["--size", "100000"],
        ),
        (
            vec![
                "data",
                "make-prefs",
                "--model",
                &model,
                "--prompts",
                &prompts,
                "--pairs",
                "0",
                "--out",
                "p",
            ],
            vec!["--pairs"],
        ),
        (
            vec![
                "data",
                "prompts",
                "--count",
                "3",
                "--max-objects",
                "9",
                "--out",
                "x.txt",
            ],
            vec!["--max-objects", "9"],
        ),
        (
            vec![
                "eval",
                "--model",
                &model,
                "--prompts",
                &prompts,
                "--samples",
                "0",
            ],
            vec!["--samples"],
        ),
        (
            vec![
                "score",
                "--reward",
                "shapes",
                "--prompt",
                "a red circle",
                "--images",
                "nope.png",
            ],
            vec!["nope.png"],
        ),
        (
            vec!["train", "dpo", "--set", "optim.lr=nan"],
            vec!["[optim] lr", "NaN"],
        ),
        (
            vec!["train", "dpo", "--set", "lora.rank=0"],
            vec!["[lora]", "rank"],
        ),
        (
            vec!["train", "dpo", "--set", "optim.max_steps=-5"],
            vec!["optim.max_steps", "-5"],
        ),
        (
            vec!["train", "grpo", "--set", "grpo.clip_range=-1"],
            vec!["clip_range", "-1"],
        ),
        (
            vec!["train", "grpo", "--set", "rollout.eta=nan"],
            vec!["[rollout] eta", "NaN"],
        ),
        (
            vec!["train", "grpo", "--set", "grpo.group_size=1"],
            vec!["group_size"],
        ),
        (
            vec!["train", "grpo", "--set", "grpo.bogus=1"],
            vec!["grpo.bogus"],
        ),
        (
            vec!["train", "dpo", "--set", "optim.lr"],
            vec!["optim.lr", "key=value"],
        ),
        (
            vec!["train", "dpo", "--device", "tpu"],
            vec!["device", "tpu"],
        ),
        (vec!["train", "grpo", "--dtype", "f8"], vec!["dtype", "f8"]),
        (
            vec!["train", "adjoint", "--device", "cuda:x"],
            vec!["device", "cuda:x"],
        ),
        (
            vec!["train", "seppo", "--dtype", "f64"],
            vec!["dtype", "f64"],
        ),
        (
            vec!["pretrain", "--device", "tpu", "--set", "seed=1"],
            vec!["device", "tpu"],
        ),
        (
            vec!["pretrain", "--dtype", "f8", "--set", "seed=1"],
            vec!["save_dtype", "f8"],
        ),
        (
            vec![
                "generate",
                "--model",
                &model,
                "--prompt",
                "x",
                "--scheduler",
                "magic",
                "--out",
                "o",
            ],
            vec!["--scheduler", "magic"],
        ),
        (
            vec![
                "train",
                "grpo",
                "--set",
                "rollout.stochastic_range=[900, 100]",
            ],
            vec!["stochastic_range"],
        ),
    ];
    w.refuses_all(&cases);
}
