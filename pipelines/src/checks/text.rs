//! Tokenizer and text-encoder checks (`tokenizer` and `text_encoder` goldens).

use super::CheckContext;
use crate::golden::{Comparison, Golden};
use crate::models::clip_text::ClipTextModel;
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use std::path::PathBuf;

/// The tokenizer folder of a model folder: `<model_dir>/tokenizer`, or the folder itself when it is a
/// tokenizer folder (has `tokenizer.json` or `vocab.json`).
fn tokenizer_dir(golden: &Golden, ctx: &CheckContext) -> Result<PathBuf> {
    let dir = ctx.model_dir(golden)?;
    let sub = dir.join("tokenizer");
    if !sub.exists() && ClipTokenizer::is_tokenizer_dir(dir) {
        return Ok(dir.to_path_buf());
    }
    Ok(sub)
}

/// Tokenizes the metadata `prompts` (a JSON list) with the model folder's tokenizer and compares `input_ids`
/// and `lengths` exactly.
pub fn check_tokenizer(g: &Golden, ctx: &CheckContext) -> Result<Vec<Comparison>> {
    let prompts: Vec<String> =
        serde_json::from_str(g.meta("prompts")?).map_err(|e| Error::Invalid {
            file: g.path.display().to_string(),
            msg: format!("metadata `prompts` is not a JSON list of strings: {e}"),
        })?;
    let tok = ClipTokenizer::from_dir(tokenizer_dir(g, ctx)?)?;
    let refs: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
    let (ids, lengths) = tok.encode_batch(&refs)?;
    let lengths: Vec<i64> = lengths.iter().map(|&l| l as i64).collect();
    let n = lengths.len();
    let lengths = Tensor::from_vec(lengths, n, &candle_core::Device::Cpu)?;
    Ok(vec![
        g.compare("input_ids", &ids.to_dtype(DType::I64)?, ctx.tolerance_scale)?,
        g.compare("lengths", &lengths, ctx.tolerance_scale)?,
    ])
}

/// Runs the text encoder in `<model_dir>/<component>` on the golden `input_ids` (on `ctx.device` in
/// `ctx.dtype`) and compares every output.
pub fn check_text_encoder(g: &Golden, ctx: &CheckContext) -> Result<Vec<Comparison>> {
    let component = g
        .metadata
        .get("component")
        .map(|s| s.as_str())
        .unwrap_or("text_encoder");
    let dir = ctx.model_dir(g)?.join(component);
    let model = ClipTextModel::load(&dir, None, ctx.dtype, &ctx.device)?;
    let ids = g.get_on("input_ids", &ctx.device)?;
    let out = model.forward(&ids)?;
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let s = ctx.tolerance_scale;
    let mut res = vec![
        g.compare("last_hidden_state", &f32(&out.last_hidden_state)?, s)?,
        g.compare(
            "penultimate_hidden_state",
            &f32(&out.penultimate_hidden_state)?,
            s,
        )?,
    ];
    if g.has("penultimate_final_ln") {
        let t = model.apply_final_layer_norm(&out.penultimate_hidden_state)?;
        res.push(g.compare("penultimate_final_ln", &f32(&t)?, s)?);
    }
    if g.has("pooler_output") {
        res.push(g.compare("pooler_output", &f32(&out.pooled)?, s)?);
    }
    if g.has("hidden_states") {
        let stacked = Tensor::stack(&out.hidden_states, 0)?;
        res.push(g.compare("hidden_states", &f32(&stacked)?, s)?);
    }
    if g.has("text_embeds") {
        match &out.text_embeds {
            Some(t) => res.push(g.compare("text_embeds", &f32(t)?, s)?),
            None => {
                return Err(Error::Invalid {
                    file: g.path.display().to_string(),
                    msg: format!(
                        "golden has `text_embeds` but {} is not a CLIPTextModelWithProjection",
                        dir.display()
                    ),
                })
            }
        }
    }
    Ok(res)
}
