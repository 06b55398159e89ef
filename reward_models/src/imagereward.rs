//! ImageReward (THUDM, "ImageReward-v1.0"): BLIP ViT image tokens → BERT "MED" cross-encoder over the prompt
//! → `[CLS]` hidden state → a 5-Linear head (no activations) → `(raw − mean) / std`.
//!
//! A model folder holds `ImageReward.safetensors` (the flat `ImageReward.pt` state dict: `blip.visual_encoder.*`,
//! `blip.text_encoder.*`, `mlp.layers.{0,2,4,6,7}.*`; `blip.vision_proj` / `blip.text_proj` are unused),
//! `med_config.json` (the BERT config), optionally `config.json` (what ImageReward hard-codes in code: the ViT
//! sizes under `vision`, `reward_mean`, `reward_std`, `max_length`; without it the real model's values are used:
//! ViT-L/16 at 224, mean 0.16717362830052426, std 1.0333394966054072, 35 tokens), and `tokenizer/` (a BERT
//! WordPiece `tokenizer.json`, or `vocab.txt`). The whole chain, preprocessing included, is differentiable with
//! respect to the pixels; the text side depends on the image (cross-attention), so nothing can be cached.

use crate::bert::{MedBertEncoder, MedConfig};
use crate::blip::{BlipVisionConfig, BlipVisionModel};
use crate::preprocess::{Preprocess, Preprocessed};
use crate::{Error, Result};
use candle_core::{DType, Device, Module, Tensor, Var};
use diffpref_pipelines::checks::CheckContext;
use diffpref_pipelines::error::read_json;
use diffpref_pipelines::golden::{Comparison, Golden};
use diffpref_pipelines::nn::Linear;
use diffpref_pipelines::Params;
use std::path::{Path, PathBuf};
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

/// ImageReward's reward normalisation (`ImageReward.py`): reward = (raw − mean) / std.
pub const REWARD_MEAN: f64 = 0.16717362830052426;
/// See [`REWARD_MEAN`].
pub const REWARD_STD: f64 = 1.0333394966054072;
/// ImageReward tokenizes with `padding="max_length", truncation=True, max_length=35`.
pub const MAX_LENGTH: usize = 35;

/// The weights file of a model folder.
pub const WEIGHTS_FILE: &str = "ImageReward.safetensors";
/// The sizes of the linear head `mlp.layers.{0,2,4,6,7}` after its input (hard-coded in ImageReward's `MLP`).
const HEAD_SIZES: [usize; 5] = [1024, 128, 64, 16, 1];
const HEAD_INDICES: [usize; 5] = [0, 2, 4, 6, 7];

fn default_mean() -> f64 {
    REWARD_MEAN
}
fn default_std() -> f64 {
    REWARD_STD
}
fn default_max_length() -> usize {
    MAX_LENGTH
}

/// An ImageReward folder's `config.json`: the values ImageReward hard-codes in code. Missing keys take the
/// real model's values.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct ImageRewardConfig {
    /// Input size S (must equal `vision.img_size` when both are given).
    #[serde(default)]
    pub image_size: Option<usize>,
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// The head's input size (must equal the BERT hidden size when given).
    #[serde(default)]
    pub mlp_input_size: Option<usize>,
    #[serde(default = "default_mean")]
    pub reward_mean: f64,
    #[serde(default = "default_std")]
    pub reward_std: f64,
    #[serde(default)]
    pub vision: BlipVisionConfig,
}

impl Default for ImageRewardConfig {
    fn default() -> Self {
        ImageRewardConfig {
            image_size: None,
            max_length: MAX_LENGTH,
            mlp_input_size: None,
            reward_mean: REWARD_MEAN,
            reward_std: REWARD_STD,
            vision: BlipVisionConfig::default(),
        }
    }
}

impl ImageRewardConfig {
    /// Reads `config.json`; errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut cfg: ImageRewardConfig = read_json(path)?;
        let file = path.display().to_string();
        cfg.vision.validate(&file)?;
        match cfg.image_size {
            Some(s) if s != cfg.vision.img_size => {
                // `vision` written without img_size takes the top-level size.
                if !vision_has_size(path)? {
                    cfg.vision.img_size = s;
                    cfg.vision.validate(&file)?;
                } else {
                    return Err(Error::msg(format!(
                        "{file}: image_size {s} differs from vision.img_size {}",
                        cfg.vision.img_size
                    )));
                }
            }
            _ => {}
        }
        if !(cfg.reward_std.is_finite() && cfg.reward_std != 0.0) {
            return Err(Error::msg(format!(
                "{file}: reward_std {} must be finite and non-zero",
                cfg.reward_std
            )));
        }
        if cfg.max_length < 2 {
            return Err(Error::msg(format!(
                "{file}: max_length {} leaves no room for [CLS] and [SEP]",
                cfg.max_length
            )));
        }
        Ok(cfg)
    }

    /// The preprocessing size S (the ViT input size).
    pub fn image_size(&self) -> usize {
        self.vision.img_size
    }
}

fn vision_has_size(path: &Path) -> Result<bool> {
    let v: serde_json::Value = read_json(path)?;
    Ok(v.get("vision")
        .and_then(|v| v.as_object())
        .is_some_and(|o| o.contains_key("img_size") || o.contains_key("image_size")))
}

/// ImageReward's BERT WordPiece tokenizer: `[CLS] … [SEP]`, truncated and padded with `[PAD]` to `max_length`
/// (35), plus BLIP's added special tokens `[DEC]` and `[ENC]`.
#[derive(Clone)]
pub struct ImageRewardTokenizer {
    tokenizer: Tokenizer,
    /// The file it was loaded from (named in errors).
    pub path: PathBuf,
    pub max_length: usize,
    pub pad_id: u32,
}

impl ImageRewardTokenizer {
    /// Loads `dir/tokenizer.json`, or builds the uncased BERT WordPiece tokenizer from `dir/vocab.txt`.
    /// Padding and truncation are (re)set to `max_length` whatever the file says.
    pub fn from_dir(dir: impl AsRef<Path>, max_length: usize) -> Result<Self> {
        let dir = dir.as_ref();
        let json = dir.join("tokenizer.json");
        let vocab = dir.join("vocab.txt");
        let (mut tokenizer, path) = if json.exists() {
            let t = Tokenizer::from_file(&json)
                .map_err(|e| Error::msg(format!("tokenizer {}: {e}", json.display())))?;
            (t, json)
        } else if vocab.exists() {
            (build_wordpiece(&vocab)?, vocab)
        } else {
            return Err(Error::msg(format!(
                "missing file: {} (or {}): ImageReward needs its BERT tokenizer",
                json.display(),
                vocab.display()
            )));
        };
        // BLIP's init_tokenizer: bos_token [DEC], additional special token [ENC] (ids 30522, 30523 for
        // bert-base-uncased); a no-op when the file already has them.
        let missing: Vec<AddedToken> = ["[DEC]", "[ENC]"]
            .iter()
            .filter(|t| tokenizer.token_to_id(t).is_none())
            .map(|t| AddedToken::from(*t, true))
            .collect();
        if !missing.is_empty() {
            tokenizer.add_special_tokens(&missing);
        }
        let (pad_id, pad_token) = match tokenizer.get_padding() {
            Some(p) => (p.pad_id, p.pad_token.clone()),
            None => {
                let id = tokenizer.token_to_id("[PAD]").ok_or_else(|| {
                    Error::msg(format!(
                        "tokenizer {}: no padding section and no [PAD] token",
                        path.display()
                    ))
                })?;
                (id, "[PAD]".to_string())
            }
        };
        for t in ["[CLS]", "[SEP]"] {
            if tokenizer.token_to_id(t).is_none() {
                return Err(Error::msg(format!(
                    "tokenizer {}: token {t} is not in the vocabulary",
                    path.display()
                )));
            }
        }
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| Error::msg(format!("tokenizer {}: {e}", path.display())))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        Ok(ImageRewardTokenizer {
            tokenizer,
            path,
            max_length,
            pad_id,
        })
    }

    /// `input_ids` and `attention_mask`, both `[B, max_length]` i64 on `device`.
    pub fn encode(&self, prompts: &[&str], device: &Device) -> Result<(Tensor, Tensor)> {
        let n = self.max_length;
        let mut ids = Vec::with_capacity(prompts.len() * n);
        let mut mask = Vec::with_capacity(prompts.len() * n);
        for p in prompts {
            let enc = self.tokenizer.encode(*p, true).map_err(|e| {
                Error::msg(format!(
                    "tokenizer {}: cannot encode {p:?}: {e}",
                    self.path.display()
                ))
            })?;
            if enc.get_ids().len() != n {
                return Err(Error::msg(format!(
                    "tokenizer {}: {p:?} gave {} ids, expected {n}",
                    self.path.display(),
                    enc.get_ids().len()
                )));
            }
            ids.extend(enc.get_ids().iter().map(|&i| i as i64));
            mask.extend(enc.get_attention_mask().iter().map(|&m| m as i64));
        }
        let b = prompts.len();
        Ok((
            Tensor::from_vec(ids, (b, n), device)?,
            Tensor::from_vec(mask, (b, n), device)?,
        ))
    }

    /// The id of `token` (vocabulary or added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// bert-base-uncased's tokenizer from `vocab.txt` (what transformers' BertTokenizerFast converter builds).
fn build_wordpiece(vocab: &Path) -> Result<Tokenizer> {
    use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::normalizers::bert::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::processors::bert::BertProcessing;
    let err = |e: &dyn std::fmt::Display| Error::msg(format!("tokenizer {}: {e}", vocab.display()));
    let model = WordPiece::from_file(&vocab.to_string_lossy())
        .unk_token("[UNK]".into())
        .continuing_subword_prefix("##".into())
        .max_input_chars_per_word(100)
        .build()
        .map_err(|e| err(&e))?;
    let mut tokenizer = Tokenizer::new(model);
    let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
    let id = |t: &str| {
        tokenizer
            .token_to_id(t)
            .ok_or_else(|| err(&format!("token {t} is not in the vocabulary")))
    };
    let cls = id("[CLS]")?;
    let sep = id("[SEP]")?;
    tokenizer.with_normalizer(Some(BertNormalizer::new(true, true, None, true)));
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), sep),
        ("[CLS]".into(), cls),
    )));
    tokenizer.with_decoder(Some(WordPieceDecoder::default()));
    let added: Vec<AddedToken> = specials
        .iter()
        .filter(|t| tokenizer.token_to_id(t).is_some())
        .map(|t| AddedToken::from(*t, true))
        .collect();
    tokenizer.add_special_tokens(&added);
    Ok(tokenizer)
}

/// Everything [`ImageReward::forward_pixel_values`] computes.
#[derive(Clone, Debug)]
pub struct ImageRewardOutput {
    /// `[B, 1 + patches, W]`: the ViT's normed tokens (model dtype).
    pub image_embeds: Tensor,
    /// `[B, T, H]`: the cross-encoder's output (model dtype).
    pub text_last_hidden_state: Tensor,
    /// `[B, H]`: `text_last_hidden_state[:, 0]` (`[CLS]`), the head's input.
    pub text_features: Tensor,
    /// `[B]` f32: the head's output.
    pub raw_score: Tensor,
    /// `[B]` f32: `(raw_score − reward_mean) / reward_std`.
    pub reward: Tensor,
}

/// The ImageReward model with its tokenizer.
pub struct ImageReward {
    pub vision: BlipVisionModel,
    pub text: MedBertEncoder,
    head: Vec<Linear>,
    pub tokenizer: ImageRewardTokenizer,
    pub config: ImageRewardConfig,
    /// The folder it was loaded from (or empty when built from [`ImageReward::new`]).
    pub dir: PathBuf,
}

impl ImageReward {
    /// Loads an ImageReward folder (see the module docs) in `dtype` on `device`.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !path.is_dir() {
            return Err(Error::msg(format!(
                "ImageReward model folder {} does not exist or is not a folder",
                path.display()
            )));
        }
        let weights = path.join(WEIGHTS_FILE);
        if !weights.exists() {
            return Err(Error::msg(format!(
                "missing file: {} (ImageReward's ImageReward.pt state dict converted to safetensors, keys as \
                 in the .pt)",
                weights.display()
            )));
        }
        let med_path = path.join("med_config.json");
        if !med_path.exists() {
            return Err(Error::msg(format!(
                "missing file: {} (BLIP's BERT config, downloaded next to ImageReward.pt)",
                med_path.display()
            )));
        }
        let cfg_path = path.join("config.json");
        let config = if cfg_path.exists() {
            ImageRewardConfig::from_file(&cfg_path)?
        } else {
            ImageRewardConfig::default()
        };
        let med = MedConfig::from_file(&med_path)?;
        if let Some(n) = config.mlp_input_size {
            if n != med.hidden_size {
                return Err(Error::msg(format!(
                    "{}: mlp_input_size {n} differs from hidden_size {} in {}",
                    cfg_path.display(),
                    med.hidden_size,
                    med_path.display()
                )));
            }
        }
        let tok_dir = if path.join("tokenizer").is_dir() {
            path.join("tokenizer")
        } else {
            path.to_path_buf()
        };
        let tokenizer = ImageRewardTokenizer::from_dir(&tok_dir, config.max_length)?;
        let p = Params::from_files(&[weights], dtype, device)?;
        let mut model = Self::new(&p, config, med, tokenizer)?;
        model.dir = path.to_path_buf();
        Ok(model)
    }

    /// Builds the model from any parameter source (root view: names start with `blip.` and `mlp.`).
    /// `med.encoder_width` is replaced by the ViT width, as BLIP does.
    pub fn new(
        p: &Params,
        config: ImageRewardConfig,
        med: MedConfig,
        tokenizer: ImageRewardTokenizer,
    ) -> Result<Self> {
        let med = med.with_encoder_width(config.vision.embed_dim);
        if config.max_length > med.max_position_embeddings {
            return Err(Error::msg(format!(
                "ImageReward: max_length {} exceeds the MED max_position_embeddings {}",
                config.max_length, med.max_position_embeddings
            )));
        }
        let vision =
            BlipVisionModel::new(&p.pp("blip").pp("visual_encoder"), config.vision.clone())?;
        let text = MedBertEncoder::new(&p.pp("blip").pp("text_encoder"), med)?;
        let layers = p.pp("mlp").pp("layers");
        let mut head = Vec::with_capacity(HEAD_SIZES.len());
        let mut in_dim = text.config.hidden_size;
        for (&i, &out) in HEAD_INDICES.iter().zip(HEAD_SIZES.iter()) {
            head.push(Linear::new(&layers.pp(i), in_dim, out, true)?);
            in_dim = out;
        }
        Ok(ImageReward {
            vision,
            text,
            head,
            tokenizer,
            config,
            dir: PathBuf::new(),
        })
    }

    pub fn dtype(&self) -> DType {
        self.vision.dtype()
    }

    pub fn device(&self) -> &Device {
        self.vision.device()
    }

    /// The preprocessing size S.
    pub fn image_size(&self) -> usize {
        self.config.image_size()
    }

    /// `input_ids` and `attention_mask` `[B, 35]` (i64) for `prompts`, on the model's device.
    pub fn tokenize(&self, prompts: &[&str]) -> Result<(Tensor, Tensor)> {
        self.tokenizer.encode(prompts, self.device())
    }

    /// The head on `text_features` `[B, H]` → raw score `[B]` (f32).
    pub fn head(&self, text_features: &Tensor) -> Result<Tensor> {
        let mut x = text_features.clone();
        for l in &self.head {
            x = l.forward(&x)?;
        }
        Ok(x.squeeze(1)?.to_dtype(DType::F32)?)
    }

    /// Runs the model on normalised `pixel_values` `[B, 3, S, S]` with `input_ids` / `attention_mask`
    /// `[B, T]` (what `score_gard` takes).
    pub fn forward_pixel_values(
        &self,
        pixel_values: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<ImageRewardOutput> {
        let b = pixel_values.dim(0)?;
        if input_ids.dim(0)? != b {
            return Err(Error::msg(format!(
                "ImageReward: {b} images but input_ids has shape {:?}",
                input_ids.dims()
            )));
        }
        let image_embeds = self.vision.forward(pixel_values)?;
        let text_last_hidden_state = self
            .text
            .forward(input_ids, attention_mask, &image_embeds)?;
        let text_features = text_last_hidden_state.narrow(1, 0, 1)?.squeeze(1)?;
        let raw_score = self.head(&text_features)?;
        let reward = ((&raw_score - self.config.reward_mean)? / self.config.reward_std)?;
        Ok(ImageRewardOutput {
            image_embeds,
            text_last_hidden_state,
            text_features,
            raw_score,
            reward,
        })
    }

    /// ImageReward's preprocessing (`_transform(S)`): shortest side to S (antialiased bicubic), centre crop
    /// S × S, OpenAI mean / std.
    pub fn preprocessing(&self) -> Preprocess {
        Preprocess::openai_clip(self.image_size())
    }

    /// The model input `[B, 3, S, S]` for `images` `[B, 3, H, W]` in [0, 1] (see
    /// [`ImageReward::preprocessing`]). Differentiable.
    pub fn preprocess(&self, images: &Tensor) -> Result<Tensor> {
        self.preprocessing().pixel_values(images)
    }

    /// Preprocesses `images` `[B, 3, H, W]` in [0, 1] and runs the model.
    pub fn forward_images(
        &self,
        images: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<ImageRewardOutput> {
        let pixel_values = self.preprocess(images)?;
        self.forward_pixel_values(&pixel_values, input_ids, attention_mask)
    }
}

impl crate::Reward for ImageReward {
    fn name(&self) -> &str {
        "imagereward"
    }

    fn score(&self, images: &Tensor, prompts: &[&str]) -> Result<Tensor> {
        let b = images.dim(0)?;
        if prompts.len() != b {
            return Err(Error::msg(format!(
                "ImageReward: {b} images but {} prompts (one prompt per image is needed)",
                prompts.len()
            )));
        }
        let (ids, mask) = self.tokenize(prompts)?;
        let out = self.forward_images(images, &ids, &mask)?;
        Ok(out.reward.to_device(images.device())?)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Golden check.

/// Runs the `imagereward` golden check for the model folder `model_dir` on `ctx.device` in `ctx.dtype`:
/// the tokenizer on the metadata `prompts` (`input_ids`, `attention_mask`, exact), the model on the stored
/// `pixel_values` (`image_embeds`, `text_last_hidden_state`, `text_features`, `raw_score`, `reward`,
/// `grad_pixel_values` = d Σ reward / d pixel_values), and the whole chain from `images`
/// (`resize_weight_h`, `resize_weight_w`, `resized`, `pixel_values`, `reward`, `grad_images`).
pub fn check_imagereward(
    golden: &Golden,
    model_dir: &Path,
    ctx: &CheckContext,
) -> Result<Vec<Comparison>> {
    let file = golden.path.display().to_string();
    let prompts: Vec<String> = serde_json::from_str(golden.meta("prompts")?).map_err(|e| {
        Error::msg(format!(
            "{file}: metadata `prompts` is not a JSON list of strings: {e}"
        ))
    })?;
    let refs: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
    let model = ImageReward::load(model_dir, ctx.dtype, &ctx.device)?;
    let s = ctx.tolerance_scale;
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let mut res = Vec::new();

    let (ids, mask) = model.tokenize(&refs)?;
    res.push(golden.compare("input_ids", &ids, s)?);
    res.push(golden.compare("attention_mask", &mask, s)?);

    let g_ids = golden.get_on("input_ids", &ctx.device)?;
    let g_mask = golden.get_on("attention_mask", &ctx.device)?;
    let pv = Var::from_tensor(
        &golden
            .get_on("pixel_values", &ctx.device)?
            .to_dtype(DType::F32)?,
    )?;
    let out = model.forward_pixel_values(pv.as_tensor(), &g_ids, &g_mask)?;
    res.push(golden.compare("image_embeds", &f32(&out.image_embeds)?, s)?);
    res.push(golden.compare(
        "text_last_hidden_state",
        &f32(&out.text_last_hidden_state)?,
        s,
    )?);
    res.push(golden.compare("text_features", &f32(&out.text_features)?, s)?);
    res.push(golden.compare("raw_score", &out.raw_score, s)?);
    res.push(golden.compare("reward", &out.reward, s)?);
    let grads = out.reward.sum_all()?.backward()?;
    let gpv = grads
        .get(pv.as_tensor())
        .ok_or_else(|| Error::msg("ImageReward: no gradient reached pixel_values"))?;
    res.push(golden.compare("grad_pixel_values", gpv, s)?);

    let images = Var::from_tensor(&golden.get_on("images", &ctx.device)?.to_dtype(DType::F32)?)?;
    let pre = model.preprocessing();
    let (_, _, h, w) = images.dims4()?;
    let (wh, ww) = pre.resize_matrices(h, w, DType::F32, &ctx.device)?;
    res.push(golden.compare("resize_weight_h", &wh, s)?);
    res.push(golden.compare("resize_weight_w", &ww, s)?);
    let Preprocessed {
        resized,
        pixel_values,
    } = pre.forward(images.as_tensor())?;
    res.push(golden.compare("resized", &f32(&resized)?, s)?);
    res.push(golden.compare("pixel_values", &f32(&pixel_values)?, s)?);
    let out = model.forward_pixel_values(&pixel_values, &g_ids, &g_mask)?;
    let mut c = golden.compare("reward", &out.reward, s)?;
    c.name = "reward (from images)".into();
    res.push(c);
    let grads = out.reward.sum_all()?.backward()?;
    let gi = grads
        .get(images.as_tensor())
        .ok_or_else(|| Error::msg("ImageReward: no gradient reached the images"))?;
    res.push(golden.compare("grad_images", gi, s)?);
    Ok(res)
}
