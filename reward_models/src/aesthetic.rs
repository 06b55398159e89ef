//! The LAION aesthetic predictor v2 ("sac+logos+ava1-l14-linearMSE", improved-aesthetic-predictor) as DDPO
//! and AlignProp use it: CLIP ViT-L/14 image embedding (projected, L2-normalised) → MLP head
//! `Linear(D, 1024) → Linear(1024, 128) → Linear(128, 64) → Linear(64, 16) → Linear(16, 1)` (keys
//! `layers.{0,2,4,6,7}`; the Dropouts between them are identities in eval mode and there are no
//! activations, so the head is one affine map).
//!
//! The head is a folder with `model.safetensors` (or the original `.pth`) and a `config.json` holding
//! `input_size` (the backbone's projection size: 768 for ViT-L/14); the backbone is a transformers
//! `CLIPModel` (or open_clip) folder loaded image tower only.

use crate::clip::{ClipLoadOptions, ClipModel};
use crate::source;
use crate::{Error, Result, Reward};
use candle_core::{DType, Device, Tensor};
use diffpref_pipelines::nn::linear;
use diffpref_pipelines::Params;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Output sizes of the head's linear layers, and their indices in `layers.N`.
pub const HEAD_SIZES: [usize; 5] = [1024, 128, 64, 16, 1];
pub const HEAD_INDICES: [usize; 5] = [0, 2, 4, 6, 7];

#[derive(serde::Deserialize)]
struct HeadConfig {
    input_size: Option<usize>,
}

/// The MLP head (kept in f32 whatever the backbone dtype).
#[derive(Clone)]
pub struct AestheticHead {
    layers: Vec<(Tensor, Tensor)>,
    pub input_size: usize,
}

impl AestheticHead {
    /// Builds the head for `input_size`-dimensional embeddings from `layers.{0,2,4,6,7}.{weight,bias}`.
    pub fn from_params(p: &Params, input_size: usize) -> Result<Self> {
        let mut layers = Vec::new();
        let mut d_in = input_size;
        for (&i, &d_out) in HEAD_INDICES.iter().zip(HEAD_SIZES.iter()) {
            let l = p.pp("layers").pp(i);
            layers.push((
                l.get_with_dtype((d_out, d_in), "weight", DType::F32)?,
                l.get_with_dtype(d_out, "bias", DType::F32)?,
            ));
            d_in = d_out;
        }
        Ok(AestheticHead { layers, input_size })
    }

    /// Loads the head from a folder (`config.json` with `input_size` + `model.safetensors` or a `.pth`) or
    /// from a weights file (its folder's `config.json` when there is one, else the input size of
    /// `layers.0.weight`).
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let (dir, files) = source::folder_and_files(path, &["model"])?;
        let cfg_path = dir.join("config.json");
        let p = source::open_params(&files, DType::F32, device)?;
        let input_size = if cfg_path.exists() {
            let cfg: HeadConfig = diffpref_pipelines::error::read_json(&cfg_path)?;
            cfg.input_size.ok_or_else(|| {
                Error::from(diffpref_pipelines::Error::Invalid {
                    file: cfg_path.display().to_string(),
                    msg: "no `input_size` (the CLIP embedding size the head takes)".into(),
                })
            })?
        } else if path.is_file() {
            let w = p
                .get_any_shape("layers.0.weight")
                .map_err(|e| source::name_source(e.into(), &files))?;
            w.dim(1)?
        } else {
            return Err(diffpref_pipelines::Error::MissingFile(cfg_path).into());
        };
        Self::from_params(&p, input_size).map_err(|e| source::name_source(e, &files))
    }

    /// The head on (normalised) embeddings `[B, D]` → `[B]` f32 (f64 for f64 embeddings).
    pub fn forward(&self, e: &Tensor) -> Result<Tensor> {
        let mut x = crate::clip::at_least_f32(e)?;
        let dt = x.dtype();
        for (w, b) in &self.layers {
            x = linear(&x, &w.to_dtype(dt)?, Some(&b.to_dtype(dt)?))?;
        }
        Ok(x.squeeze(1)?)
    }

    /// The head collapsed to one affine map `w · e + b` (computed in f64 on the CPU): `(w [D], b [1])`.
    pub fn collapsed(&self) -> Result<(Tensor, Tensor)> {
        let f64s =
            |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?) };
        let (w0, b0) = &self.layers[0];
        let mut w = f64s(w0)?;
        let mut b = f64s(b0)?;
        for (wi, bi) in &self.layers[1..] {
            let wi = f64s(wi)?;
            b = (wi.matmul(&b.unsqueeze(1)?)?.squeeze(1)? + f64s(bi)?)?;
            w = wi.matmul(&w)?;
        }
        Ok((w.squeeze(0)?, b))
    }
}

/// The aesthetic predictor: CLIP image tower + head; implements [`Reward`] (prompts are ignored).
#[derive(Clone)]
pub struct Aesthetic {
    pub clip: Arc<ClipModel>,
    pub head: AestheticHead,
}

impl Aesthetic {
    /// Loads the head at `head` and the CLIP backbone at `clip` (image tower only).
    pub fn load(
        head: impl AsRef<Path>,
        clip: impl AsRef<Path>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let clip = ClipModel::load_with(
            clip,
            &ClipLoadOptions {
                vision_only: true,
                ..Default::default()
            },
            dtype,
            device,
        )?;
        let head_path: PathBuf = head.as_ref().to_path_buf();
        let head = AestheticHead::load(&head_path, device)?;
        Self::new(Arc::new(clip), head)
            .map_err(|e| Error::msg(format!("{}: {e}", head_path.display())))
    }

    /// Pairs a backbone and a head (their sizes must agree).
    pub fn new(clip: Arc<ClipModel>, head: AestheticHead) -> Result<Self> {
        if clip.config.embed_dim != head.input_size {
            return Err(Error::msg(format!(
                "the aesthetic head takes {}-dimensional embeddings but the CLIP backbone ({}) projects to {}",
                head.input_size, clip.source, clip.config.embed_dim
            )));
        }
        Ok(Aesthetic { clip, head })
    }

    /// Scores of normalised pixel values (preprocessing already applied).
    pub fn score_pixels(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.head
            .forward(&self.clip.image_embeds_from_pixels(pixel_values)?)
    }
}

impl Reward for Aesthetic {
    fn name(&self) -> &str {
        "aesthetic"
    }

    fn score(&self, images: &Tensor, _prompts: &[&str]) -> Result<Tensor> {
        let e = self.clip.image_embeds(images)?;
        Ok(self.head.forward(&e)?.to_device(images.device())?)
    }
}
