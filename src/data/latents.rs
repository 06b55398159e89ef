//! Stored sampler latents of generated images (`data make-prefs` writes them next to the PNGs).
//!
//! A generated image's PNG is an 8-bit decode of the latent the sampler produced; encoding it again with the
//! VAE does not give that latent back. For a small VAE the two differ a lot (the shapes world's re-encoded
//! posterior means are ~0.9 RMS away from the sampled latents, with other per-channel scales), so a DPO run
//! on re-encoded PNGs trains on images the model does not produce. A manifest may therefore name each
//! image's latent (`"chosen_latent"`, `"rejected_latent"`), and `train dpo` trains on those directly.
//!
//! File format: safetensors with one tensor `latent`, `[C, h, w]`, in the UNet's (scaled) latent space — the
//! sampler's final latents, which `vae.decode(latent / scaling_factor)` turns into the image. Stored as f16
//! (the latent scale is ~1, so f16's 1e-3 relative precision is far below the noise the DPO loss adds).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// The tensor name inside a latent file.
pub const LATENT_KEY: &str = "latent";

/// Reads a stored latent (`[C, h, w]`, as f32 on the CPU), naming the file in every error.
pub fn load_latent(path: &Path) -> Result<Tensor> {
    let map = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read latent file {}", path.display()))?;
    let t = map.get(LATENT_KEY).with_context(|| {
        format!(
            "latent file {} has no tensor \"{LATENT_KEY}\" (has: {:?})",
            path.display(),
            map.keys().collect::<Vec<_>>()
        )
    })?;
    if t.rank() != 3 {
        bail!(
            "latent file {}: tensor \"{LATENT_KEY}\" has shape {:?}, expected [C, h, w]",
            path.display(),
            t.dims()
        );
    }
    let t = t.to_dtype(DType::F32)?;
    let finite = t
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|v| v.is_finite());
    if !finite {
        bail!("latent file {}: non-finite values", path.display());
    }
    Ok(t)
}

/// Writes `latent` (`[C, h, w]`) to `path` as f16, atomically.
pub fn save_latent(path: &Path, latent: &Tensor) -> Result<()> {
    if latent.rank() != 3 {
        bail!("a stored latent must be [C, h, w], got {:?}", latent.dims());
    }
    crate::io::save_safetensors(path, &[(LATENT_KEY, latent.to_dtype(DType::F16)?)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn round_trip_and_errors() {
        let dir = std::env::temp_dir().join(format!("diffpref-latents-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let x = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .affine(0.25, -3.0)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let p = dir.join("a.safetensors");
        save_latent(&p, &x).unwrap();
        let y = load_latent(&p).unwrap();
        assert_eq!(y.dims(), &[2, 3, 4]);
        let d = (y - &x).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-2);

        assert!(save_latent(&dir.join("c.safetensors"), &x.flatten_all().unwrap()).is_err());
        let bad = dir.join("b.safetensors");
        candle_core::safetensors::save(&HashMap::from([("other".to_string(), x.clone())]), &bad)
            .unwrap();
        let e = format!("{:#}", load_latent(&bad).unwrap_err());
        assert!(
            e.contains("b.safetensors") && e.contains("\"latent\""),
            "{e}"
        );
        let e = format!(
            "{:#}",
            load_latent(&dir.join("missing.safetensors")).unwrap_err()
        );
        assert!(e.contains("missing.safetensors"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
