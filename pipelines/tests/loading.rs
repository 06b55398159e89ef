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

/// A copy of tiny-sd under `dir` whose weights are float32 and off the float16 grid (every value × (1 + 1e-4)):
/// the fixture may store float16, and these tests need float32 weights that rounding to f16 / bf16 moves.
fn f32_tiny_sd(dir: &Path) -> PathBuf {
    let out = dir.join("tiny-sd-f32");
    copy_dir(&fixtures().join("tiny-sd"), &out);
    for f in [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ] {
        let p = out.join(f);
        let w: HashMap<String, Tensor> = candle_core::safetensors::load(&p, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, v)| {
                let v = match v.dtype() {
                    DType::F16 | DType::BF16 | DType::F32 => {
                        (v.to_dtype(DType::F32).unwrap() * (1.0 + 1e-4)).unwrap()
                    }
                    _ => v,
                };
                (k, v)
            })
            .collect();
        candle_core::safetensors::save(&w, &p).unwrap();
    }
    out
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
    let f32_copy = tempfile::tempdir().unwrap();
    let src = f32_tiny_sd(f32_copy.path()).join("unet");
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

// ---- bf16 / f16 loads: values, not just shapes ----------------------------------------------------------

/// f32 -> `dt` (BF16 or F16) with round-to-nearest-even, written out by hand (independent of candle's / half's
/// conversion), returned widened back to f32 (exact). Finite inputs only (the fixture weights are).
fn round_to(x: f32, dt: DType) -> f32 {
    let b = x.to_bits();
    match dt {
        DType::BF16 => {
            let lsb = (b >> 16) & 1;
            f32::from_bits(b.wrapping_add(0x7fff + lsb) & 0xffff_0000)
        }
        DType::F16 => {
            let neg = b >> 31 == 1;
            let exp = ((b >> 23) & 0xff) as i32;
            let man = b & 0x7f_ffff;
            let e = exp - 127 + 15; // f16 biased exponent
            let h: u32 = if e >= 0x1f {
                0x7c00 // overflow: inf
            } else if e <= 0 {
                // subnormal (or zero): units of 2^-24
                if e < -10 {
                    0
                } else {
                    let m = man | 0x80_0000;
                    let shift = (14 - e) as u32;
                    let (q, rem, half) = (m >> shift, m & ((1 << shift) - 1), 1u32 << (shift - 1));
                    q + u32::from(rem > half || (rem == half && q & 1 == 1))
                }
            } else {
                let q = ((e as u32) << 10) | (man >> 13);
                let rem = man & 0x1fff;
                q + u32::from(rem > 0x1000 || (rem == 0x1000 && q & 1 == 1))
            };
            // decode the f16 bits
            let (he, hm) = ((h >> 10) & 0x1f, (h & 0x3ff) as f32);
            let v = match he {
                0 => hm * 2f32.powi(-24),
                0x1f => f32::INFINITY,
                _ => (1.0 + hm / 1024.0) * 2f32.powi(he as i32 - 15),
            };
            if neg {
                -v
            } else {
                v
            }
        }
        _ => x,
    }
}

#[test]
fn hand_rounding_matches_known_values() {
    // bf16: 1 + 2^-8 is a tie -> even (1); 1 + 3·2^-8 -> 1 + 2^-6 ... checked on exact binary values.
    assert_eq!(round_to(1.0 + 2f32.powi(-8), DType::BF16), 1.0);
    assert_eq!(
        round_to(1.0 + 3.0 * 2f32.powi(-8), DType::BF16),
        1.0 + 2f32.powi(-6)
    );
    assert_eq!(
        round_to(1.0 + 2f32.powi(-8) + 2f32.powi(-20), DType::BF16),
        1.0 + 2f32.powi(-7)
    );
    // f16: 11-bit significand, ties to even, subnormals in units of 2^-24, overflow past 65520.
    assert_eq!(round_to(1.0 + 2f32.powi(-11), DType::F16), 1.0);
    assert_eq!(
        round_to(1.0 + 3.0 * 2f32.powi(-11), DType::F16),
        1.0 + 2f32.powi(-9)
    );
    assert_eq!(round_to(-0.1, DType::F16), -0.099975586);
    assert_eq!(round_to(3.0 * 2f32.powi(-25), DType::F16), 2f32.powi(-23));
    assert_eq!(round_to(2f32.powi(-25), DType::F16), 0.0);
    assert_eq!(round_to(1.5 * 2f32.powi(-25), DType::F16), 2f32.powi(-24));
    assert_eq!(round_to(65519.0, DType::F16), 65504.0);
    assert_eq!(round_to(65520.0, DType::F16), f32::INFINITY);
}

/// Loads one component's f32 file into `dt` through [`Params::from_files`] + the model constructor (what
/// `X::load` does), with `trainable()` so that every parameter handed out is listed, and checks that each is
/// the file's f32 value rounded to `dt` (bit-exact) and that every tensor of the file was used.
fn check_weights_rounded(
    dir: &Path,
    base: &str,
    dt: DType,
    build: &dyn Fn(&diffpref_pipelines::Params) -> diffpref_pipelines::Result<()>,
) -> usize {
    let file = dir.join(format!("{base}.safetensors"));
    let reference = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let p = diffpref_pipelines::Params::from_files(std::slice::from_ref(&file), dt, &Device::Cpu)
        .unwrap()
        .trainable();
    build(&p).unwrap();
    let vars = p.vars();
    let mut seen = std::collections::HashSet::new();
    let (mut n, mut changed) = (0usize, 0usize);
    for (name, var) in &vars {
        let t = var.as_tensor();
        assert_eq!(t.dtype(), dt, "{}: {name}", dir.display());
        let r = &reference[name.as_str()];
        assert_eq!(r.dtype(), DType::F32, "{name}: the fixture weights are f32");
        let got: Vec<f32> = t
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let orig: Vec<f32> = r.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got.len(), orig.len(), "{name}");
        for (i, (g, o)) in got.iter().zip(&orig).enumerate() {
            let want = round_to(*o, dt);
            assert!(
                g.to_bits() == want.to_bits(),
                "{} {dt:?} {name}[{i}]: loaded {g:e}, f32 {o:e} rounded {want:e}",
                dir.display()
            );
            changed += usize::from(g != o);
        }
        n += got.len();
        seen.insert(name.clone());
    }
    let unused: Vec<&String> = reference.keys().filter(|k| !seen.contains(*k)).collect();
    assert!(
        unused.is_empty(),
        "{}: file tensors never loaded: {unused:?}",
        dir.display()
    );
    // The comparison is not vacuous: rounding to 8 / 11 significant bits moves almost every value.
    assert!(
        changed * 10 > n * 9,
        "{} {dt:?}: only {changed} of {n} values differ from f32",
        dir.display()
    );
    n
}

#[test]
fn half_precision_weights_are_the_f32_weights_rounded() {
    use diffpref_pipelines::models::clip_text::{ClipTextConfig, ClipTextModel};
    use diffpref_pipelines::models::unet::UNet2DConditionConfig;
    use diffpref_pipelines::models::vae::{AutoencoderKL, AutoencoderKLConfig};
    let f32_copy = tempfile::tempdir().unwrap();
    let sd = f32_tiny_sd(f32_copy.path());
    for dt in [DType::BF16, DType::F16] {
        let te = sd.join("text_encoder");
        let n_te = check_weights_rounded(&te, "model", dt, &|p| {
            ClipTextModel::new(p, ClipTextConfig::from_file(te.join("config.json"))?).map(|_| ())
        });
        let un = sd.join("unet");
        let n_unet = check_weights_rounded(&un, "diffusion_pytorch_model", dt, &|p| {
            UNet2DConditionModel::new(p, UNet2DConditionConfig::load(&un.join("config.json"))?)
                .map(|_| ())
        });
        let va = sd.join("vae");
        let n_vae = check_weights_rounded(&va, "diffusion_pytorch_model", dt, &|p| {
            AutoencoderKL::new(p, AutoencoderKLConfig::from_file(&va.join("config.json"))?)
                .map(|_| ())
        });
        println!("{dt:?}: text encoder {n_te}, unet {n_unet}, vae {n_vae} values rounded exactly");

        // And the model `StableDiffusion::load` returns holds those values (its UNet's Linear / Conv2d layers).
        let m = StableDiffusion::load(
            &sd,
            &LoadOptions {
                dtype: dt,
                device: Device::Cpu,
                variant: None,
            },
        )
        .unwrap();
        let reference = candle_core::safetensors::load(
            un.join("diffusion_pytorch_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let mut checked = 0usize;
        for layer in m.unet.layers() {
            let (path, w, b) = match layer {
                diffpref_pipelines::nn::Layer::Linear(l) => (&l.path, &l.weight, &l.bias),
                diffpref_pipelines::nn::Layer::Conv2d(c) => (&c.path, &c.weight, &c.bias),
            };
            let mut pairs = vec![(format!("{path}.weight"), w)];
            if let Some(b) = b {
                pairs.push((format!("{path}.bias"), b));
            }
            for (name, t) in pairs {
                assert_eq!(t.dtype(), dt, "{name}");
                let got: Vec<f32> = t
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let orig: Vec<f32> = reference[&name].flatten_all().unwrap().to_vec1().unwrap();
                let bad = got
                    .iter()
                    .zip(&orig)
                    .filter(|(g, o)| g.to_bits() != round_to(**o, dt).to_bits())
                    .count();
                assert_eq!(
                    bad, 0,
                    "{dt:?} {name}: {bad} values are not the rounded f32 weights"
                );
                checked += got.len();
            }
        }
        assert!(
            checked * 10 > n_unet * 9,
            "{checked} of {n_unet} UNet values reached through layers()"
        );
    }
}

/// `‖a − b‖₂ / ‖b‖₂` and `max|a − b| / max|b|` (b the f32 reference).
fn rel_errors(a: &Tensor, b: &Tensor) -> (f64, f64) {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let d = (&a - &b).unwrap();
    let s = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt()
    };
    let m = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    (s(&d) / s(&b), m(&d) / m(&b))
}

/// Text encoder, UNet and VAE outputs of the model loaded in `dtype`, on fixed inputs (the golden inputs of
/// `unet.safetensors` / `vae.safetensors`), as f32; a component that cannot run in `dtype` gives its error.
fn component_outputs(dtype: DType) -> Vec<(&'static str, Result<Tensor, String>)> {
    use diffpref_pipelines::golden::Golden;
    let m = StableDiffusion::load(
        &fixtures().join("tiny-sd"),
        &LoadOptions {
            dtype,
            device: Device::Cpu,
            variant: None,
        },
    )
    .unwrap();
    let f32_out = |t: diffpref_pipelines::Result<Tensor>| {
        t.and_then(|t| Ok(t.to_dtype(DType::F32)?))
            .map_err(|e| e.to_string())
    };
    let gu = Golden::load(fixtures().join("golden/unet.safetensors")).unwrap();
    let gv = Golden::load(fixtures().join("golden/vae.safetensors")).unwrap();
    let inp = |g: &Golden, n: &str| g.get(n).unwrap().to_dtype(dtype).unwrap();
    let text = m.encode_prompts_pooled(&[
        "a photograph of an astronaut riding a horse",
        "a red cube",
        "",
    ]);
    let (hidden, pooled) = match text {
        Ok((e, p)) => (Ok(e.hidden_states), Ok(p)),
        Err(e) => (Err(e.to_string()), Err(e.to_string())),
    };
    let unet = m.unet.forward(
        &inp(&gu, "sample"),
        gu.get("timesteps").unwrap(),
        &inp(&gu, "encoder_hidden_states"),
        None,
    );
    let (mean, logvar) = match m.vae.encode(&inp(&gv, "image")) {
        Ok(p) => (Ok(p.mean), Ok(p.logvar)),
        Err(e) => (Err(e.to_string()), Err(e.to_string())),
    };
    let decode = m.vae.decode(&inp(&gv, "decode_in"));
    vec![
        (
            "text last_hidden_state",
            hidden.and_then(|t| f32_out(Ok(t))),
        ),
        ("text pooled", pooled.and_then(|t| f32_out(Ok(t)))),
        ("unet out", f32_out(unet)),
        ("vae posterior mean", mean.and_then(|t| f32_out(Ok(t)))),
        ("vae posterior logvar", logvar.and_then(|t| f32_out(Ok(t)))),
        ("vae decode", f32_out(decode)),
    ]
}

/// bf16 / f16 models compute what the f32 model computes, to the precision of the dtype: the relative L2
/// error of every output must stay within `L2_UNITS` unit roundoffs u (bf16 2^-8 ≈ 3.9e-3, f16 2^-11 ≈ 4.9e-4)
/// and the max error within `MAX_UNITS` u of max|output| (weights and activations are each rounded once per
/// layer, the norms and softmax run in f32); and the f16 error must be well below the bf16 one (3 more bits),
/// which a load that went through bf16, or ran f16 at bf16 precision, would not give.
/// candle 0.11's CPU backend has no bf16 conv2d, so the bf16 UNet / VAE run only on a device that has one
/// (they are skipped, with that error asserted, on the CPU).
#[test]
fn half_precision_outputs_match_f32() {
    const L2_UNITS: f64 = 6.0;
    const MAX_UNITS: f64 = 8.0;
    let reference: Vec<(&str, Tensor)> = component_outputs(DType::F32)
        .into_iter()
        .map(|(n, t)| (n, t.unwrap()))
        .collect();
    let mut errs = std::collections::HashMap::new();
    for dt in [DType::BF16, DType::F16] {
        let u = if dt == DType::BF16 {
            2f64.powi(-8)
        } else {
            2f64.powi(-11)
        };
        for ((name, r), (_, h)) in reference.iter().zip(component_outputs(dt)) {
            let h = match h {
                Ok(h) => h,
                Err(e)
                    if dt == DType::BF16 && e.contains("unsupported dtype BF16 for op matmul") =>
                {
                    assert!(!name.starts_with("text"), "{name}: {e}");
                    println!("{dt:?} {name:24}: skipped on the CPU ({e})");
                    continue;
                }
                Err(e) => panic!("{dt:?} {name}: {e}"),
            };
            assert_eq!(h.dims(), r.dims(), "{dt:?} {name}");
            let (l2, mx) = rel_errors(&h, r);
            println!(
                "{dt:?} {name:24}: rel L2 {l2:.2e} = {:.2} u, max {mx:.2e} = {:.2} u",
                l2 / u,
                mx / u
            );
            assert!(
                l2 > 0.0,
                "{dt:?} {name}: identical to f32 (not computed in {dt:?}?)"
            );
            assert!(
                l2 <= L2_UNITS * u,
                "{dt:?} {name}: relative L2 error {l2:.2e} > {L2_UNITS} u"
            );
            assert!(
                mx <= MAX_UNITS * u,
                "{dt:?} {name}: max error {mx:.2e} > {MAX_UNITS} u x max|f32|"
            );
            errs.insert((dt == DType::F16, *name), l2);
        }
    }
    for (name, _) in &reference {
        if let (Some(b), Some(f)) = (errs.get(&(false, *name)), errs.get(&(true, *name))) {
            assert!(
                f * 3.0 < *b,
                "{name}: f16 error {f:.2e} not well below bf16 {b:.2e}"
            );
        }
    }
    assert!(errs.len() >= 8, "too few outputs compared: {errs:?}");
}
