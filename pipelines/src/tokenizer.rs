//! The CLIP BPE tokenizer as Stable Diffusion pipelines run it (transformers' `CLIPTokenizerFast` with
//! `padding="max_length", max_length=77, truncation=True`).
//!
//! A tokenizer folder is loaded from `tokenizer.json` when it has one, otherwise the tokenizer is built from
//! `vocab.json` + `merges.txt` (what the SD 1.x / 2.x / SDXL hub folders ship) exactly as transformers converts
//! the slow tokenizer: NFC, whitespace runs collapsed to one space, lowercase; the CLIP regex split followed by
//! byte-level mapping; BPE with the `</w>` end-of-word suffix. `tokenizer_config.json` (falling back to
//! `special_tokens_map.json`) gives the BOS/EOS/pad tokens and `model_max_length`; every special token it names
//! (and every entry of `added_tokens_decoder`) is registered as an added token, so with SD2's / SDXL
//! `tokenizer_2`'s pad token `!` a literal `!` in a prompt also becomes id 0, as in transformers.

use crate::error::{read_json, Error, Result};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// The CLIP pre-tokenizer split (kept tokens; everything else, i.e. whitespace, is dropped), as written by
/// transformers' CLIP converter.
pub const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
const DEFAULT_MAX_LENGTH: usize = 77;

/// A CLIP tokenizer that pads and truncates to a fixed length (77 for every SD text encoder).
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    /// The folder it was loaded from (named in errors).
    pub dir: PathBuf,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: u32,
    pub pad_token: String,
    /// Total sequence length incl. BOS and EOS (`model_max_length`, 77).
    pub max_length: usize,
}

/// A special token in `tokenizer_config.json` / `special_tokens_map.json`: a string or an `AddedToken` object.
#[derive(serde::Deserialize, Clone, Debug)]
#[serde(untagged)]
enum TokenSpec {
    Plain(String),
    Object {
        content: String,
        #[serde(default)]
        lstrip: bool,
        #[serde(default)]
        rstrip: bool,
        #[serde(default)]
        single_word: bool,
        #[serde(default)]
        normalized: Option<bool>,
        #[serde(default)]
        special: Option<bool>,
    },
}

impl TokenSpec {
    fn content(&self) -> &str {
        match self {
            TokenSpec::Plain(s) => s,
            TokenSpec::Object { content, .. } => content,
        }
    }

    /// As a special added token (special tokens are matched on the raw text, before normalisation).
    fn added(&self, special_default: bool) -> AddedToken {
        match self {
            TokenSpec::Plain(s) => AddedToken::from(s.clone(), special_default),
            TokenSpec::Object {
                content,
                lstrip,
                rstrip,
                single_word,
                normalized,
                special,
            } => {
                let special = special.unwrap_or(special_default);
                AddedToken::from(content.clone(), special)
                    .lstrip(*lstrip)
                    .rstrip(*rstrip)
                    .single_word(*single_word)
                    .normalized(normalized.unwrap_or(!special))
            }
        }
    }
}

/// The keys of `tokenizer_config.json` (and `special_tokens_map.json`) that matter here.
#[derive(serde::Deserialize, Default, Debug)]
struct TokenizerConfig {
    bos_token: Option<TokenSpec>,
    eos_token: Option<TokenSpec>,
    unk_token: Option<TokenSpec>,
    pad_token: Option<TokenSpec>,
    model_max_length: Option<f64>,
    #[serde(default)]
    added_tokens_decoder: std::collections::BTreeMap<String, TokenSpec>,
}

impl ClipTokenizer {
    /// Whether `dir` holds a tokenizer [`ClipTokenizer::from_dir`] can load (`tokenizer.json` or `vocab.json`).
    pub fn is_tokenizer_dir(dir: &Path) -> bool {
        dir.join("tokenizer.json").exists() || dir.join("vocab.json").exists()
    }

    /// Loads the tokenizer folder `dir` (`tokenizer.json`, or `vocab.json` + `merges.txt`; plus
    /// `tokenizer_config.json` / `special_tokens_map.json` when present).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let json = dir.join("tokenizer.json");
        let mut tokenizer = if json.exists() {
            Tokenizer::from_file(&json).map_err(|e| Error::Tokenizer {
                path: json.clone(),
                msg: e.to_string(),
            })?
        } else {
            Self::build_bpe(&dir)?
        };

        let config_path = dir.join("tokenizer_config.json");
        let map_path = dir.join("special_tokens_map.json");
        let config: TokenizerConfig = if config_path.exists() {
            read_json(&config_path)?
        } else {
            TokenizerConfig::default()
        };
        let map: TokenizerConfig = if map_path.exists() {
            read_json(&map_path)?
        } else {
            TokenizerConfig::default()
        };
        let pick = |a: &Option<TokenSpec>, b: &Option<TokenSpec>| a.clone().or_else(|| b.clone());
        let bos = pick(&config.bos_token, &map.bos_token);
        let eos = pick(&config.eos_token, &map.eos_token);
        let unk = pick(&config.unk_token, &map.unk_token);
        let pad = pick(&config.pad_token, &map.pad_token);

        // transformers registers every special token (and the config's added tokens) as added tokens.
        let mut added: Vec<AddedToken> = Vec::new();
        let mut decoder: Vec<(u32, &TokenSpec)> = config
            .added_tokens_decoder
            .iter()
            .filter_map(|(id, t)| id.parse::<u32>().ok().map(|id| (id, t)))
            .collect();
        decoder.sort_by_key(|(id, _)| *id);
        for (_, t) in decoder {
            added.push(t.added(false));
        }
        for t in [&bos, &eos, &unk, &pad].into_iter().flatten() {
            added.push(t.added(true));
        }
        let (special, normal): (Vec<AddedToken>, Vec<AddedToken>) =
            added.into_iter().partition(|t| t.special);
        if !normal.is_empty() {
            tokenizer.add_tokens(&normal);
        }
        if !special.is_empty() {
            tokenizer.add_special_tokens(&special);
        }

        let file_for_errors = if config_path.exists() {
            config_path.clone()
        } else {
            dir.clone()
        };
        let id_of = |token: &str, what: &str| -> Result<u32> {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| Error::Tokenizer {
                    path: file_for_errors.clone(),
                    msg: format!("{what} token `{token}` is not in the vocabulary"),
                })
        };
        let bos_token = bos
            .as_ref()
            .map(|t| t.content().to_string())
            .unwrap_or(DEFAULT_BOS.into());
        let eos_token = eos
            .as_ref()
            .map(|t| t.content().to_string())
            .unwrap_or(DEFAULT_EOS.into());
        // CLIPTokenizer without a pad token in its config pads with EOS (as the SD1.x folders spell out).
        let pad_token = pad
            .as_ref()
            .map(|t| t.content().to_string())
            .unwrap_or(eos_token.clone());
        let bos_id = id_of(&bos_token, "bos")?;
        let eos_id = id_of(&eos_token, "eos")?;
        let pad_id = id_of(&pad_token, "pad")?;
        // Some configs write a huge sentinel (1e30) for "no limit": CLIP's context is 77 then.
        let max_length = match config.model_max_length {
            Some(m) if (2.0..=1e6).contains(&m) => m as usize,
            _ => DEFAULT_MAX_LENGTH,
        };
        Ok(ClipTokenizer {
            tokenizer,
            dir,
            bos_id,
            eos_id,
            pad_id,
            pad_token,
            max_length,
        })
    }

    /// The CLIP BPE tokenizer built from `vocab.json` + `merges.txt` in `dir` (CLIPTokenizerFast's conversion).
    fn build_bpe(dir: &Path) -> Result<Tokenizer> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        for f in [&vocab, &merges] {
            if !f.exists() {
                return Err(Error::Tokenizer {
                    path: f.clone(),
                    msg: format!("missing (and no tokenizer.json in {})", dir.display()),
                });
            }
        }
        let tok_err = |path: &Path, e: &dyn std::fmt::Display| Error::Tokenizer {
            path: path.to_path_buf(),
            msg: e.to_string(),
        };
        let (v, m) = BPE::read_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .map_err(|e| tok_err(&vocab, &format!("reading vocab.json / merges.txt: {e}")))?;
        let unk = if v.contains_key(DEFAULT_EOS) {
            Some(DEFAULT_EOS.to_string())
        } else {
            None
        };
        let mut builder = BPE::builder()
            .vocab_and_merges(v, m)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .fuse_unk(false);
        if let Some(unk) = unk {
            builder = builder.unk_token(unk);
        }
        let bpe = builder.build().map_err(|e| tok_err(&merges, &e))?;

        let normalizer = NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(|e| tok_err(dir, &e))?
            .into(),
            Lowercase.into(),
        ]);
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| tok_err(dir, &e))?;
        let pre =
            PreTokenizerSequence::new(vec![split.into(), ByteLevel::new(false, true, true).into()]);

        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_normalizer(Some(normalizer));
        tokenizer.with_pre_tokenizer(Some(pre));
        tokenizer.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        // BOS/EOS are registered as special added tokens (transformers does the same for the vocab's specials).
        let specials: Vec<AddedToken> = [DEFAULT_BOS, DEFAULT_EOS]
            .iter()
            .filter(|t| tokenizer.token_to_id(t).is_some())
            .map(|t| AddedToken::from(*t, true))
            .collect();
        tokenizer.add_special_tokens(&specials);
        Ok(tokenizer)
    }

    /// The BPE ids of `text` without BOS/EOS and without truncation.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer {
                path: self.dir.clone(),
                msg: format!("cannot encode {text:?}: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// BOS + at most `max_length - 2` BPE ids + EOS (unpadded), as transformers truncates.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_raw(text)?;
        ids.truncate(self.max_length.saturating_sub(2));
        let mut out = Vec::with_capacity(ids.len() + 2);
        out.push(self.bos_id);
        out.extend(ids);
        out.push(self.eos_id);
        Ok(out)
    }

    /// Tokenizes a batch padded with the pad id to `max_length`: ids `[B, max_length]` (u32, on the CPU) and
    /// per prompt the number of tokens before padding (incl. BOS and EOS).
    pub fn encode_batch(&self, prompts: &[&str]) -> Result<(Tensor, Vec<usize>)> {
        self.encode_batch_on(prompts, &Device::Cpu)
    }

    /// [`ClipTokenizer::encode_batch`] with the ids on `device`.
    pub fn encode_batch_on(
        &self,
        prompts: &[&str],
        device: &Device,
    ) -> Result<(Tensor, Vec<usize>)> {
        let mut data = Vec::with_capacity(prompts.len() * self.max_length);
        let mut lengths = Vec::with_capacity(prompts.len());
        for p in prompts {
            let ids = self.encode(p)?;
            lengths.push(ids.len());
            data.extend_from_slice(&ids);
            data.extend(std::iter::repeat_n(
                self.pad_id,
                self.max_length - ids.len(),
            ));
        }
        let ids = Tensor::from_vec(data, (prompts.len(), self.max_length), device)?;
        Ok((ids, lengths))
    }

    /// The id of `token` (vocabulary or added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Decodes ids back to text (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer {
                path: self.dir.clone(),
                msg: format!("cannot decode: {e}"),
            })
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }
}
