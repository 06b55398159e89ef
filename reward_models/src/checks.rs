//! Parity checks of the reward models against golden files (`kind` = `clip`, `open_clip`, `aesthetic`, and
//! `imagereward` via [`crate::imagereward::check_imagereward`]), shared by the tests and `diffpref verify`.
//!
//! Every file runs the whole differentiable chain: images → preprocessing (resize matrices, resized,
//! pixel values) → towers (hidden states, pooled outputs, embeddings) → scores → gradients of the summed
//! score with respect to the images and to the pixel values. The model outputs are computed from the
//! golden's stored `pixel_values` and `input_ids`, so a preprocessing error does not hide a model error.
//!
//! Model folders named by the metadata (`model`, and `clip` for the aesthetic head's backbone) are resolved
//! against the golden file's folder's parent (`<golden dir>/../<model>`) when that exists, then against
//! `ctx.model_dir`.

use crate::aesthetic::AestheticHead;
use crate::clip::{l2_normalize, ClipLoadOptions, ClipModel, Layout};
use crate::preprocess::Preprocess;
use crate::scores::{ClipReward, ClipScoring};
use crate::{input_gradient, Error, Result};
use candle_core::{DType, Tensor};
use diffpref_pipelines::checks::CheckContext;
use diffpref_pipelines::golden::{Comparison, Golden};
use diffpref_pipelines::tokenizer::ClipTokenizer;
use std::path::PathBuf;
use std::sync::Arc;

/// Runs the check named by the golden's `kind`; `Ok(None)` for kinds this crate does not check.
pub fn run(golden: &Golden, ctx: &CheckContext) -> Result<Option<Vec<Comparison>>> {
    Ok(Some(match golden.kind().unwrap_or("") {
        "clip" | "open_clip" => check_clip(golden, ctx)?,
        "aesthetic" => check_aesthetic(golden, ctx)?,
        "imagereward" => {
            let dir = resolve_folder(golden, ctx, "model")?;
            crate::imagereward::check_imagereward(golden, &dir, ctx)?
        }
        _ => return Ok(None),
    }))
}

/// The folder named by metadata `key`: `<golden dir>/../<name>`, else `<ctx.model_dir>/<name>`, else
/// `ctx.model_dir` itself.
pub fn resolve_folder(g: &Golden, ctx: &CheckContext, key: &str) -> Result<PathBuf> {
    let name = g.meta(key)?;
    let golden_dir = g
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| PathBuf::from("."));
    let mut tried = Vec::new();
    let beside = golden_dir.join("..").join(name);
    if beside.is_dir() {
        return Ok(beside);
    }
    tried.push(beside);
    if let Some(m) = &ctx.model_dir {
        let under = m.join(name);
        if under.is_dir() {
            return Ok(under);
        }
        tried.push(under);
        if m.is_dir() && m.file_name().and_then(|n| n.to_str()) == Some(name) {
            return Ok(m.clone());
        }
    }
    Err(Error::msg(format!(
        "{}: model folder `{name}` (metadata `{key}`) not found; tried {}",
        g.path.display(),
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

fn f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

/// `resize_weight_h`, `resize_weight_w`, `resized` and `pixel_values` from the golden `images`.
fn check_preprocess(g: &Golden, p: &Preprocess, ctx: &CheckContext) -> Result<Vec<Comparison>> {
    let s = ctx.tolerance_scale;
    let images = g.get_on("images", &ctx.device)?;
    let (_, _, h, w) = images.dims4()?;
    let (wh, ww) = p.resize_matrices(h, w, DType::F32, &ctx.device)?;
    let pre = p.forward(&images)?;
    Ok(vec![
        g.compare("resize_weight_h", &wh, s)?,
        g.compare("resize_weight_w", &ww, s)?,
        g.compare("resized", &pre.resized, s)?,
        g.compare("pixel_values", &pre.pixel_values, s)?,
    ])
}

fn prompts(g: &Golden) -> Result<Vec<String>> {
    serde_json::from_str(g.meta("prompts")?).map_err(|e| {
        diffpref_pipelines::Error::Invalid {
            file: g.path.display().to_string(),
            msg: format!("metadata `prompts` is not a JSON list of strings: {e}"),
        }
        .into()
    })
}

/// `clip` (transformers CLIPModel: PickScore-style score, CLIP score) and `open_clip` (HPSv2) goldens.
pub fn check_clip(g: &Golden, ctx: &CheckContext) -> Result<Vec<Comparison>> {
    let s = ctx.tolerance_scale;
    let dev = &ctx.device;
    let dir = resolve_folder(g, ctx, "model")?;
    let mut model = ClipModel::load_with(&dir, &ClipLoadOptions::default(), ctx.dtype, dev)?;
    let open_clip = model.config.layout == Layout::OpenClip;
    if model.tokenizer().is_none() {
        // open_clip checkpoints ship no tokenizer: the fixtures' CLIP tokenizer beside the model folder.
        let t = dir.join("..").join("clip-tokenizer");
        if t.is_dir() {
            model.set_tokenizer(ClipTokenizer::from_dir(&t)?);
        }
    }
    let mut out = check_preprocess(g, &model.config.preprocess, ctx)?;
    out.push(g.compare("logit_scale", model.logit_scale()?, s)?);
    if model.tokenizer().is_some() {
        let p = prompts(g)?;
        let refs: Vec<&str> = p.iter().map(|s| s.as_str()).collect();
        out.push(g.compare("input_ids", &model.tokenize(&refs)?, s)?);
    }

    let pv = g.get_on("pixel_values", dev)?;
    let ids = g.get_on("input_ids", dev)?;
    let v = model.encode_image(&pv)?;
    let t = model.encode_text(&ids)?;
    let (vh, vp, th, tp, ie, te) = if open_clip {
        (
            "vision_transformer_out",
            "vision_pooled",
            "text_transformer_out",
            "text_pooled",
            "image_features",
            "text_features",
        )
    } else {
        (
            "vision_last_hidden_state",
            "vision_pooler_output",
            "text_last_hidden_state",
            "text_pooler_output",
            "image_embeds",
            "text_embeds",
        )
    };
    out.push(g.compare(vh, &f32(&v.hidden)?, s)?);
    out.push(g.compare(vp, &f32(&v.pooled)?, s)?);
    // transformers' text last_hidden_state is after final_layer_norm; open_clip's transformer output before.
    let text_hidden = if open_clip {
        &t.hidden
    } else {
        &t.last_hidden_state
    };
    out.push(g.compare(th, &f32(text_hidden)?, s)?);
    out.push(g.compare(tp, &f32(&t.pooled)?, s)?);
    let img = f32(&v.embeds)?;
    let txt = f32(&t.embeds)?;
    out.push(g.compare(&format!("{ie}_unnorm"), &img, s)?);
    out.push(g.compare(&format!("{te}_unnorm"), &txt, s)?);
    let img_n = l2_normalize(&img)?;
    let txt_n = l2_normalize(&txt)?;
    out.push(g.compare(ie, &img_n, s)?);
    out.push(g.compare(te, &txt_n, s)?);
    let cos = img_n.matmul(&txt_n.t()?.contiguous()?)?;
    out.push(g.compare("cosine", &cos, s)?);
    let scale = model.logit_scale()?.exp()?;
    out.push(g.compare("logits_per_image", &cos.broadcast_mul(&scale)?, s)?);

    let model = Arc::new(model);
    let scoring = if open_clip {
        ClipScoring::Hps
    } else {
        ClipScoring::PickScore
    };
    let reward = ClipReward::new(model.clone(), scoring)?;
    let diag = reward.from_embeds(&img_n, &txt_n)?;
    if open_clip {
        out.push(g.compare("hps_score", &diag, s)?);
        out.push(g.compare("hps_score_x100", &(&diag * 100.0)?, s)?);
    } else {
        out.push(g.compare("pickscore", &diag, s)?);
        let clip = ClipReward::new(model.clone(), ClipScoring::ClipScore)?;
        out.push(g.compare("clip_score", &clip.from_cosine(&cos)?, s)?);
    }

    let text_const = txt_n.detach();
    let images = g.get_on("images", dev)?;
    let gi = input_gradient(&images, |x| reward.score_with_text(x, &text_const))?;
    out.push(g.compare("grad_images", &gi, s)?);
    let gp = input_gradient(&pv, |x| reward.score_pixels_with_text(x, &text_const))?;
    out.push(g.compare("grad_pixel_values", &gp, s)?);
    Ok(out)
}

/// `aesthetic` golden: LAION aesthetic head on the CLIP image embedding.
pub fn check_aesthetic(g: &Golden, ctx: &CheckContext) -> Result<Vec<Comparison>> {
    let s = ctx.tolerance_scale;
    let dev = &ctx.device;
    let head_dir = resolve_folder(g, ctx, "model")?;
    let clip_dir = resolve_folder(g, ctx, "clip")?;
    let clip = ClipModel::load_with(
        &clip_dir,
        &ClipLoadOptions {
            vision_only: true,
            ..Default::default()
        },
        ctx.dtype,
        dev,
    )?;
    let head = AestheticHead::load(&head_dir, dev)?;
    let aesthetic = crate::aesthetic::Aesthetic::new(Arc::new(clip), head)?;
    let mut out = check_preprocess(g, &aesthetic.clip.config.preprocess, ctx)?;
    let pv = g.get_on("pixel_values", dev)?;
    let e = f32(&aesthetic.clip.encode_image(&pv)?.embeds)?;
    out.push(g.compare("image_embeds_unnorm", &e, s)?);
    let en = l2_normalize(&e)?;
    out.push(g.compare("image_embeds", &en, s)?);
    out.push(g.compare("score", &aesthetic.head.forward(&en)?, s)?);
    let images = g.get_on("images", dev)?;
    let gi = input_gradient(&images, |x| crate::Reward::score(&aesthetic, x, &[]))?;
    out.push(g.compare("grad_images", &gi, s)?);
    let gp = input_gradient(&pv, |x| aesthetic.score_pixels(x))?;
    out.push(g.compare("grad_pixel_values", &gp, s)?);
    let (w, b) = aesthetic.head.collapsed()?;
    out.push(g.compare("head_collapsed_w", &w, s)?);
    out.push(g.compare("head_collapsed_b", &b, s)?);
    Ok(out)
}
