//! Single-file Stable Diffusion checkpoints: the original LDM key layout (one `.safetensors` holding
//! `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`, and for SDXL
//! `conditioner.embedders.{0,1}.*`) to and from the diffusers folder layout, as diffusers' `from_single_file`
//! and its `convert_*` scripts do.
//!
//! The key mapping lives in one place, [`Mapping`]: a list of *(diffusers prefix, LDM prefix)* rules built from
//! the components' diffusers configs (how many blocks, which carry attention, how many layers); a key is renamed
//! by its longest matching rule (a rule matches a key equal to it or followed by `.`), in either direction. On
//! top of the renaming, three tensors change shape:
//! - the VAE's mid-block attention: 1×1 convolutions `[C, C, 1, 1]` in LDM, linear `[C, C]` in diffusers;
//! - OpenCLIP text encoders (SD 2.x, SDXL's second): one `attn.in_proj_{weight,bias}` holding q, k and v stacked
//!   along dimension 0, three `self_attn.{q,k,v}_proj` in transformers;
//! - OpenCLIP's `text_projection` `[D, P]` (used as `x @ P`) is transformers' `text_projection.weight` `[P, D]`.
//!
//! Which text layout a checkpoint has is read from its keys: `cond_stage_model.transformer.*` (the transformers
//! CLIP of SD 1.x), `cond_stage_model.model.*` (OpenCLIP, SD 2.x), `conditioner.embedders.0.transformer.*` +
//! `conditioner.embedders.1.model.*` (SDXL). Keys that no component uses (the noise-schedule buffers, an EMA copy,
//! `logit_scale`, OpenCLIP's last resblock that SD 2.x skips, ...) are ignored by name; any other key that no rule
//! maps is an error naming it, as is a tensor a component needs and the checkpoint lacks (named when the
//! component is built).

use crate::error::{Error, Result};
use crate::models::clip_text::ClipTextConfig;
use crate::models::unet::UNet2DConditionConfig;
use crate::models::vae::AutoencoderKLConfig;
use candle_core::{safetensors::MmapedSafetensors, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The model families a single file can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: transformers CLIP text encoder.
    Sd1,
    /// SD 2.x: OpenCLIP text encoder.
    Sd2,
    /// SDXL: a transformers CLIP and an OpenCLIP text encoder.
    Sdxl,
}

impl Family {
    /// The family of a single file, from its keys.
    pub fn of_keys<'a>(keys: impl IntoIterator<Item = &'a str>) -> Result<Family> {
        let (mut unet, mut sd1, mut sd2, mut xl) = (false, false, false, false);
        for k in keys {
            unet |= k.starts_with(UNET_PREFIX);
            sd1 |= k.starts_with("cond_stage_model.transformer.");
            sd2 |= k.starts_with("cond_stage_model.model.");
            xl |= k.starts_with("conditioner.embedders.1.model.");
        }
        match (unet, xl, sd2, sd1) {
            (false, ..) => Err(Error::msg(format!(
                "no `{UNET_PREFIX}*` keys: not a single-file Stable Diffusion checkpoint"
            ))),
            (true, true, _, _) => Ok(Family::Sdxl),
            (true, false, true, _) => Ok(Family::Sd2),
            (true, false, false, true) => Ok(Family::Sd1),
            _ => Err(Error::msg(
                "no text encoder keys (`cond_stage_model.*` or `conditioner.embedders.*`)",
            )),
        }
    }

    /// The family of a diffusers folder's configs: SDXL with a second text encoder; SD 2.x when the text encoder
    /// is OpenCLIP's (`gelu`, where SD 1.x's CLIP uses `quick_gelu`).
    pub fn of_configs(text: &ClipTextConfig, text_2: Option<&ClipTextConfig>) -> Family {
        match text_2 {
            Some(_) => Family::Sdxl,
            None if text.hidden_act == "gelu" => Family::Sd2,
            None => Family::Sd1,
        }
    }

    /// The diffusers repository whose configs describe this family's standard architecture (what
    /// `from_single_file` without `config=` uses).
    pub fn reference_repo(self) -> &'static str {
        match self {
            Family::Sd1 => "stable-diffusion-v1-5/stable-diffusion-v1-5",
            Family::Sd2 => "stabilityai/stable-diffusion-2-1",
            Family::Sdxl => "stabilityai/stable-diffusion-xl-base-1.0",
        }
    }
}

const UNET_PREFIX: &str = "model.diffusion_model.";
const VAE_PREFIX: &str = "first_stage_model.";

/// An I/O error naming `path`.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { path, source }
}

/// Keys of a single file that no diffusers component holds.
fn ignored(key: &str) -> bool {
    const BUFFERS: &[&str] = &[
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "lvlb_weights",
    ];
    BUFFERS.contains(&key)
        || key.starts_with("model_ema.")
        || key.ends_with(".position_ids")
        || key.ends_with("logit_scale")
        || key.ends_with(".attn_mask")
        || key.starts_with("first_stage_model.loss.")
}

/// One component of the pipeline in a single file.
#[derive(Clone, Debug)]
pub struct Component {
    /// The diffusers subfolder: `unet`, `vae`, `text_encoder`, `text_encoder_2`.
    pub folder: &'static str,
    /// Weight file stem in that folder.
    pub stem: &'static str,
    /// Prefix of its keys in the single file.
    pub ldm_prefix: &'static str,
    /// OpenCLIP layout (in_proj, text_projection) rather than a plain renaming.
    open_clip: Option<OpenClip>,
    rules: Vec<(String, String)>,
}

#[derive(Clone, Copy, Debug)]
struct OpenClip {
    layers: usize,
    projection: bool,
}

/// The key mapping of a whole pipeline.
#[derive(Clone, Debug)]
pub struct Mapping {
    pub family: Family,
    pub components: Vec<Component>,
}

/// The diffusers configs a mapping is built from.
pub struct Configs<'a> {
    pub unet: &'a UNet2DConditionConfig,
    pub vae: &'a AutoencoderKLConfig,
    pub text: &'a ClipTextConfig,
    pub text_2: Option<&'a ClipTextConfig>,
}

impl Mapping {
    pub fn new(c: &Configs<'_>) -> Result<Mapping> {
        let family = Family::of_configs(c.text, c.text_2);
        let mut components = vec![
            Component {
                folder: "unet",
                stem: "diffusion_pytorch_model",
                ldm_prefix: UNET_PREFIX,
                open_clip: None,
                rules: unet_rules(c.unet)?,
            },
            Component {
                folder: "vae",
                stem: "diffusion_pytorch_model",
                ldm_prefix: VAE_PREFIX,
                open_clip: None,
                rules: vae_rules(c.vae),
            },
        ];
        match family {
            Family::Sd1 => {
                components.push(hf_clip("text_encoder", "cond_stage_model.transformer."))
            }
            Family::Sd2 => components.push(open_clip(
                "text_encoder",
                "cond_stage_model.model.",
                c.text.num_hidden_layers,
                false,
            )),
            Family::Sdxl => {
                components.push(hf_clip(
                    "text_encoder",
                    "conditioner.embedders.0.transformer.",
                ));
                let t2 = c.text_2.expect("SDXL has a second text encoder");
                components.push(open_clip(
                    "text_encoder_2",
                    "conditioner.embedders.1.model.",
                    t2.num_hidden_layers,
                    true,
                ));
            }
        }
        Ok(Mapping { family, components })
    }

    /// The component a single-file key belongs to.
    fn component_of(&self, key: &str) -> Option<&Component> {
        self.components
            .iter()
            .find(|c| key.starts_with(c.ldm_prefix))
    }

    /// Splits a single file into diffusers components: `folder -> [(diffusers name, tensor)]`, tensors in the
    /// file's dtype. `what` names the file in errors.
    pub fn to_diffusers(
        &self,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        what: &str,
    ) -> Result<BTreeMap<&'static str, Vec<(String, Tensor)>>> {
        let mut out: BTreeMap<&'static str, Vec<(String, Tensor)>> = BTreeMap::new();
        for c in &self.components {
            out.insert(c.folder, Vec::new());
        }
        for (key, t) in tensors {
            if ignored(&key) {
                continue;
            }
            let Some(c) = self.component_of(&key) else {
                return Err(unmapped(what, &key, "no component has this prefix"));
            };
            let local = &key[c.ldm_prefix.len()..];
            for (name, t) in c.read(local, t).map_err(|e| unmapped(what, &key, &e))? {
                out.get_mut(c.folder).expect("inserted").push((name, t));
            }
        }
        Ok(out)
    }

    /// The single-file tensors of diffusers components (`folder -> [(name, tensor)]`).
    pub fn to_ldm(
        &self,
        components: &BTreeMap<&str, Vec<(String, Tensor)>>,
    ) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for c in &self.components {
            let tensors = components
                .get(c.folder)
                .ok_or_else(|| Error::msg(format!("no {} weights to write", c.folder)))?;
            out.extend(c.write(tensors)?);
        }
        Ok(out)
    }
}

fn unmapped(what: &str, key: &str, why: &str) -> Error {
    Error::msg(format!("{what}: unmapped key `{key}` ({why})"))
}

fn hf_clip(folder: &'static str, ldm_prefix: &'static str) -> Component {
    Component {
        folder,
        stem: "model",
        ldm_prefix,
        open_clip: None,
        rules: vec![("text_model".into(), "text_model".into())],
    }
}

fn open_clip(
    folder: &'static str,
    ldm_prefix: &'static str,
    layers: usize,
    projection: bool,
) -> Component {
    let mut rules: Vec<(String, String)> = vec![
        (
            "text_model.embeddings.token_embedding".into(),
            "token_embedding".into(),
        ),
        (
            "text_model.embeddings.position_embedding.weight".into(),
            "positional_embedding".into(),
        ),
        ("text_model.final_layer_norm".into(), "ln_final".into()),
    ];
    for i in 0..layers {
        let (d, l) = (
            format!("text_model.encoder.layers.{i}"),
            format!("transformer.resblocks.{i}"),
        );
        for (a, b) in [
            ("layer_norm1", "ln_1"),
            ("layer_norm2", "ln_2"),
            ("self_attn.out_proj", "attn.out_proj"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ] {
            rules.push((format!("{d}.{a}"), format!("{l}.{b}")));
        }
    }
    Component {
        folder,
        stem: "model",
        ldm_prefix,
        open_clip: Some(OpenClip { layers, projection }),
        rules,
    }
}

/// Renames `key` by the longest rule whose `from` side matches it.
fn rename(rules: &[(String, String)], key: &str, ldm_to_diffusers: bool) -> Option<String> {
    let mut best: Option<(&str, &str)> = None;
    for (d, l) in rules {
        let (from, to) = if ldm_to_diffusers { (l, d) } else { (d, l) };
        let matches =
            key == from || (key.starts_with(from.as_str()) && key[from.len()..].starts_with('.'));
        if matches && best.is_none_or(|(f, _)| from.len() > f.len()) {
            best = Some((from, to));
        }
    }
    best.map(|(from, to)| format!("{to}{}", &key[from.len()..]))
}

/// The VAE's mid-block attention projections: linear in diffusers, 1×1 convolutions in LDM.
fn is_vae_attention_weight(diffusers_key: &str) -> bool {
    ["encoder", "decoder"].iter().any(|side| {
        diffusers_key
            .strip_prefix(side)
            .and_then(|k| k.strip_prefix(".mid_block.attentions.0."))
            .is_some_and(|k| {
                [
                    "to_q.weight",
                    "to_k.weight",
                    "to_v.weight",
                    "to_out.0.weight",
                ]
                .contains(&k)
            })
    })
}

impl Component {
    /// One single-file tensor (its key without the component prefix) as diffusers tensors.
    fn read(&self, local: &str, t: Tensor) -> std::result::Result<Vec<(String, Tensor)>, String> {
        let err = |e: candle_core::Error| e.to_string();
        if let Some(oc) = self.open_clip {
            if let Some(rest) = local.strip_prefix("transformer.resblocks.") {
                let (i, tail) = rest.split_once('.').unwrap_or((rest, ""));
                let i: usize = i.parse().map_err(|_| "bad resblock index".to_string())?;
                if i >= oc.layers {
                    // SD 2.x's text encoder stops one block early (diffusers drops the last resblock).
                    return Ok(Vec::new());
                }
                if let Some(kind) = tail.strip_prefix("attn.in_proj_") {
                    let n = t.dim(0).map_err(err)?;
                    if n % 3 != 0 {
                        return Err(format!("in_proj has {n} rows, not a multiple of 3"));
                    }
                    return ["q", "k", "v"]
                        .iter()
                        .enumerate()
                        .map(|(j, p)| {
                            let part = t.narrow(0, j * n / 3, n / 3).map_err(err)?;
                            let part = part.contiguous().map_err(err)?;
                            Ok((
                                format!("text_model.encoder.layers.{i}.self_attn.{p}_proj.{kind}"),
                                part,
                            ))
                        })
                        .collect();
                }
            }
            if local == "text_projection" {
                return if oc.projection {
                    Ok(vec![(
                        "text_projection.weight".into(),
                        t.t().and_then(|x| x.contiguous()).map_err(err)?,
                    )])
                } else {
                    Ok(Vec::new())
                };
            }
        }
        // Older SD 1.x files hold the CLIP text model without its `text_model.` level.
        let local = if self.folder.starts_with("text_encoder")
            && self.open_clip.is_none()
            && !local.starts_with("text_model.")
        {
            format!("text_model.{local}")
        } else {
            local.to_string()
        };
        let name =
            rename(&self.rules, &local, true).ok_or_else(|| "no rule maps it".to_string())?;
        let t = if is_vae_attention_weight(&name) && t.rank() == 4 {
            t.flatten_from(1)
                .and_then(|x| x.contiguous())
                .map_err(err)?
        } else {
            t
        };
        Ok(vec![(name, t)])
    }

    /// A component's diffusers tensors as single-file tensors (keys with the component prefix).
    fn write(&self, tensors: &[(String, Tensor)]) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        let by_name: BTreeMap<&str, &Tensor> =
            tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let missing = |name: &str| Error::MissingTensor {
            name: name.to_string(),
            files: format!("the {} weights", self.folder),
        };
        for (name, t) in tensors {
            if name.ends_with(".position_ids") {
                continue;
            }
            if self.open_clip.is_some() {
                if name.contains(".self_attn.") && !name.contains(".out_proj.") {
                    // q, k, v: written once, stacked, when q is met.
                    let Some(base) = name
                        .strip_suffix(".weight")
                        .map(|b| (b, "weight"))
                        .or_else(|| name.strip_suffix(".bias").map(|b| (b, "bias")))
                    else {
                        return Err(Error::msg(format!("unexpected tensor `{name}`")));
                    };
                    let (stem, kind) = base;
                    if let Some(layer) = stem.strip_suffix(".self_attn.q_proj") {
                        let i = layer.rsplit('.').next().unwrap_or("");
                        let parts = ["q", "k", "v"]
                            .iter()
                            .map(|p| {
                                let n = format!("{layer}.self_attn.{p}_proj.{kind}");
                                by_name.get(n.as_str()).copied().ok_or_else(|| missing(&n))
                            })
                            .collect::<Result<Vec<&Tensor>>>()?;
                        out.push((
                            format!(
                                "{}transformer.resblocks.{i}.attn.in_proj_{kind}",
                                self.ldm_prefix
                            ),
                            Tensor::cat(&parts, 0)?,
                        ));
                    }
                    continue;
                }
                if name == "text_projection.weight" {
                    out.push((
                        format!("{}text_projection", self.ldm_prefix),
                        t.t()?.contiguous()?,
                    ));
                    continue;
                }
            }
            let local = rename(&self.rules, name, false).ok_or_else(|| {
                Error::msg(format!(
                    "the {} tensor `{name}` has no single-file name",
                    self.folder
                ))
            })?;
            let t = if is_vae_attention_weight(name) && t.rank() == 2 {
                let (o, i) = t.dims2()?;
                t.reshape((o, i, 1, 1))?
            } else {
                t.clone()
            };
            out.push((format!("{}{local}", self.ldm_prefix), t));
        }
        if let Some(oc) = self.open_clip {
            if !oc.projection {
                // OpenCLIP files carry a projection even where SD 2.x does not use it; converters read the
                // width from it. The identity keeps the file self-consistent.
                let d = by_name
                    .get("text_model.final_layer_norm.weight")
                    .ok_or_else(|| missing("text_model.final_layer_norm.weight"))?;
                let n = d.dim(0)?;
                out.push((
                    format!("{}text_projection", self.ldm_prefix),
                    Tensor::eye(n, d.dtype(), d.device())?,
                ));
            }
        }
        Ok(out)
    }
}

fn resnet_rules(rules: &mut Vec<(String, String)>, d: &str, l: &str) {
    for (a, b) in [
        ("norm1", "in_layers.0"),
        ("conv1", "in_layers.2"),
        ("time_emb_proj", "emb_layers.1"),
        ("norm2", "out_layers.0"),
        ("conv2", "out_layers.3"),
        ("conv_shortcut", "skip_connection"),
    ] {
        rules.push((format!("{d}.{a}"), format!("{l}.{b}")));
    }
}

fn unet_rules(cfg: &UNet2DConditionConfig) -> Result<Vec<(String, String)>> {
    let n = cfg.block_out_channels.len();
    let layers = cfg.per_block("layers_per_block", &cfg.layers_per_block, n)?;
    let mut r: Vec<(String, String)> = Vec::new();
    fn pair(r: &mut Vec<(String, String)>, d: String, l: String) {
        r.push((d, l));
    }
    pair(
        &mut r,
        "time_embedding.linear_1".into(),
        "time_embed.0".into(),
    );
    pair(
        &mut r,
        "time_embedding.linear_2".into(),
        "time_embed.2".into(),
    );
    pair(
        &mut r,
        "add_embedding.linear_1".into(),
        "label_emb.0.0".into(),
    );
    pair(
        &mut r,
        "add_embedding.linear_2".into(),
        "label_emb.0.2".into(),
    );
    pair(&mut r, "conv_in".into(), "input_blocks.0.0".into());
    let mut k = 1;
    for (i, (&count, kind)) in layers.iter().zip(&cfg.down_block_types).enumerate() {
        let attn = kind.contains("CrossAttn");
        for j in 0..count {
            resnet_rules(
                &mut r,
                &format!("down_blocks.{i}.resnets.{j}"),
                &format!("input_blocks.{k}.0"),
            );
            if attn {
                pair(
                    &mut r,
                    format!("down_blocks.{i}.attentions.{j}"),
                    format!("input_blocks.{k}.1"),
                );
            }
            k += 1;
        }
        if i + 1 < n {
            pair(
                &mut r,
                format!("down_blocks.{i}.downsamplers.0.conv"),
                format!("input_blocks.{k}.0.op"),
            );
            k += 1;
        }
    }
    resnet_rules(&mut r, "mid_block.resnets.0", "middle_block.0");
    pair(
        &mut r,
        "mid_block.attentions.0".into(),
        "middle_block.1".into(),
    );
    resnet_rules(&mut r, "mid_block.resnets.1", "middle_block.2");
    let mut k = 0;
    for i in 0..n {
        let attn = cfg.up_block_types[i].contains("CrossAttn");
        let count = layers[n - 1 - i] + 1;
        for j in 0..count {
            resnet_rules(
                &mut r,
                &format!("up_blocks.{i}.resnets.{j}"),
                &format!("output_blocks.{k}.0"),
            );
            if attn {
                pair(
                    &mut r,
                    format!("up_blocks.{i}.attentions.{j}"),
                    format!("output_blocks.{k}.1"),
                );
            }
            if j + 1 == count && i + 1 < n {
                pair(
                    &mut r,
                    format!("up_blocks.{i}.upsamplers.0.conv"),
                    format!("output_blocks.{k}.{}.conv", if attn { 2 } else { 1 }),
                );
            }
            k += 1;
        }
    }
    pair(&mut r, "conv_norm_out".into(), "out.0".into());
    pair(&mut r, "conv_out".into(), "out.2".into());
    Ok(r)
}

fn vae_resnet_rules(r: &mut Vec<(String, String)>, d: &str, l: &str) {
    for (a, b) in [
        ("norm1", "norm1"),
        ("conv1", "conv1"),
        ("norm2", "norm2"),
        ("conv2", "conv2"),
        ("conv_shortcut", "nin_shortcut"),
    ] {
        r.push((format!("{d}.{a}"), format!("{l}.{b}")));
    }
}

fn vae_mid_rules(r: &mut Vec<(String, String)>, side: &str) {
    vae_resnet_rules(
        r,
        &format!("{side}.mid_block.resnets.0"),
        &format!("{side}.mid.block_1"),
    );
    vae_resnet_rules(
        r,
        &format!("{side}.mid_block.resnets.1"),
        &format!("{side}.mid.block_2"),
    );
    for (a, b) in [
        ("group_norm", "norm"),
        ("to_q", "q"),
        ("to_k", "k"),
        ("to_v", "v"),
        ("to_out.0", "proj_out"),
    ] {
        r.push((
            format!("{side}.mid_block.attentions.0.{a}"),
            format!("{side}.mid.attn_1.{b}"),
        ));
    }
}

fn vae_rules(cfg: &AutoencoderKLConfig) -> Vec<(String, String)> {
    let n = cfg.block_out_channels.len();
    let lpb = cfg.layers_per_block;
    let mut r: Vec<(String, String)> = [
        "encoder.conv_in",
        "encoder.conv_out",
        "decoder.conv_in",
        "decoder.conv_out",
        "quant_conv",
        "post_quant_conv",
    ]
    .iter()
    .map(|s| (s.to_string(), s.to_string()))
    .collect();
    r.push(("encoder.conv_norm_out".into(), "encoder.norm_out".into()));
    r.push(("decoder.conv_norm_out".into(), "decoder.norm_out".into()));
    for i in 0..n {
        for j in 0..lpb {
            vae_resnet_rules(
                &mut r,
                &format!("encoder.down_blocks.{i}.resnets.{j}"),
                &format!("encoder.down.{i}.block.{j}"),
            );
        }
        if i + 1 < n {
            r.push((
                format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                format!("encoder.down.{i}.downsample.conv"),
            ));
        }
        let up = n - 1 - i;
        for j in 0..=lpb {
            vae_resnet_rules(
                &mut r,
                &format!("decoder.up_blocks.{i}.resnets.{j}"),
                &format!("decoder.up.{up}.block.{j}"),
            );
        }
        if i + 1 < n {
            r.push((
                format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                format!("decoder.up.{up}.upsample.conv"),
            ));
        }
    }
    vae_mid_rules(&mut r, "encoder");
    vae_mid_rules(&mut r, "decoder");
    r
}

/// Whether `path` names a single-file checkpoint (a `.safetensors` file, not a folder).
pub fn is_single_file(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

/// The diffusers configs of a folder (a model or a config-only folder): `unet/config.json`,
/// `vae/config.json`, `text_encoder/config.json` and, when present, `text_encoder_2/config.json`.
pub struct FolderConfigs {
    pub unet: UNet2DConditionConfig,
    pub vae: AutoencoderKLConfig,
    pub text: ClipTextConfig,
    pub text_2: Option<ClipTextConfig>,
}

impl FolderConfigs {
    pub fn read(dir: &Path) -> Result<FolderConfigs> {
        let t2 = dir.join("text_encoder_2/config.json");
        Ok(FolderConfigs {
            unet: UNet2DConditionConfig::load(&dir.join("unet/config.json"))?,
            vae: AutoencoderKLConfig::from_file(&dir.join("vae/config.json"))?,
            text: ClipTextConfig::from_file(dir.join("text_encoder/config.json"))?,
            text_2: if t2.exists() {
                Some(ClipTextConfig::from_file(&t2)?)
            } else {
                None
            },
        })
    }

    pub fn mapping(&self) -> Result<Mapping> {
        Mapping::new(&Configs {
            unet: &self.unet,
            vae: &self.vae,
            text: &self.text,
            text_2: self.text_2.as_ref(),
        })
    }
}

/// Every tensor of a safetensors file (memory-mapped; each tensor read once, in the file's dtype).
pub fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let io = |e: candle_core::Error| Error::msg(format!("{}: {e}", path.display()));
    // SAFETY: the file is only read, and not expected to change while we read it (as every mmap loader).
    let st = unsafe { MmapedSafetensors::new(path) }.map_err(io)?;
    let mut names: Vec<String> = st.tensors().into_iter().map(|(k, _)| k).collect();
    names.sort();
    names
        .into_iter()
        .map(|k| {
            let t = st.load(&k, &candle_core::Device::Cpu).map_err(io)?;
            Ok((k, t))
        })
        .collect()
}

/// The keys of a safetensors file (its header only).
pub fn read_keys(path: &Path) -> Result<Vec<String>> {
    // SAFETY: as in `read_tensors`.
    let st = unsafe { MmapedSafetensors::new(path) }
        .map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
    Ok(st.tensors().into_iter().map(|(k, _)| k).collect())
}

/// The files of a config folder copied into a converted model: everything but weights.
pub fn config_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|source| Error::Io {
            path: d.clone(),
            source,
        })? {
            let p = e
                .map_err(|source| Error::Io {
                    path: d.clone(),
                    source,
                })?
                .path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.contains(".safetensors") || n.ends_with(".bin") || n.ends_with(".ckpt")
            }) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Converts a single file into a diffusers folder `dst` (which must not exist yet; the caller makes it appear
/// atomically): every file of the config folder `config_dir` but weights, the components' weights as
/// `<component>/<stem>.safetensors` in the file's dtype, and, when given, `prediction_type` written into the
/// scheduler config. The configs must describe the file's architecture: every tensor is checked when the model is
/// loaded.
pub fn write_folder(
    ckpt: &Path,
    config_dir: &Path,
    prediction_type: Option<&str>,
    dst: &Path,
) -> Result<Family> {
    let what = ckpt.display().to_string();
    let keys = read_keys(ckpt)?;
    let family = Family::of_keys(keys.iter().map(|s| s.as_str()))
        .map_err(|e| Error::msg(format!("{what}: {e}")))?;
    let cfg = FolderConfigs::read(config_dir)?;
    let mapping = cfg.mapping()?;
    if mapping.family != family {
        return Err(Error::msg(format!(
            "{what} is an {family:?} checkpoint, but the configs in {} describe {:?}",
            config_dir.display(),
            mapping.family
        )));
    }
    for f in config_files(config_dir)? {
        let rel = f.strip_prefix(config_dir).expect("listed under it");
        let to = dst.join(rel);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::copy(&f, &to).map_err(io(&f))?;
    }
    if let Some(p) = prediction_type {
        let path = dst.join("scheduler/scheduler_config.json");
        let mut v: serde_json::Value = crate::error::read_json(&path)?;
        v["prediction_type"] = serde_json::Value::String(p.to_string());
        std::fs::write(&path, serde_json::to_string_pretty(&v).expect("JSON"))
            .map_err(io(&path))?;
    }
    let parts = mapping.to_diffusers(read_tensors(ckpt)?, &what)?;
    for c in &mapping.components {
        let dir = dst.join(c.folder);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let map: std::collections::HashMap<String, Tensor> =
            parts[c.folder].iter().cloned().collect();
        if map.is_empty() {
            return Err(Error::msg(format!(
                "{what}: no `{}*` tensors for the {}",
                c.ldm_prefix, c.folder
            )));
        }
        let file = dir.join(format!("{}.safetensors", c.stem));
        candle_core::safetensors::save(&map, &file)
            .map_err(|e| Error::msg(format!("{}: {e}", file.display())))?;
    }
    Ok(family)
}

/// The single-file tensors of a diffusers folder (what `lora merge --single-file` writes): its weights
/// (`variant` preferred, as [`crate::weights::find_weight_files`]) renamed by the folder's own configs.
pub fn folder_to_ldm(dir: &Path, variant: Option<&str>) -> Result<(Family, Vec<(String, Tensor)>)> {
    let mapping = FolderConfigs::read(dir)?.mapping()?;
    let mut parts: BTreeMap<&str, Vec<(String, Tensor)>> = BTreeMap::new();
    for c in &mapping.components {
        let files = crate::weights::find_weight_files(&dir.join(c.folder), c.stem, variant)?;
        let mut tensors = Vec::new();
        for f in files {
            tensors.extend(read_tensors(&f)?);
        }
        parts.insert(c.folder, tensors);
    }
    Ok((mapping.family, mapping.to_ldm(&parts)?))
}

/// Where a single file's configs come from when none is given: a diffusers config folder next to it named
/// `<file stem>.config/` (model_index.json, the components' config.json, tokenizer/, scheduler/), else the
/// reference repository of the family read from its keys ([`Family::reference_repo`]; configs and tokenizer only,
/// fetched once with the `hub` feature).
pub fn default_config_dir(ckpt: &Path) -> Result<PathBuf> {
    let sibling = ckpt.with_extension("config");
    if sibling.is_dir() {
        return Ok(sibling);
    }
    let keys = read_keys(ckpt)?;
    let family = Family::of_keys(keys.iter().map(|s| s.as_str()))
        .map_err(|e| Error::msg(format!("{}: {e}", ckpt.display())))?;
    fetch_configs(family.reference_repo()).map_err(|e| {
        Error::msg(format!(
            "{}: no config folder {} next to it, and the {family:?} reference configs could not be had: {e}",
            ckpt.display(),
            sibling.display()
        ))
    })
}

#[cfg(feature = "hub")]
fn fetch_configs(repo_id: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .build()
        .map_err(|e| Error::msg(format!("hub {repo_id}: {e}")))?;
    let repo = api.model(repo_id.to_string());
    let index = repo
        .get("model_index.json")
        .map_err(|e| Error::msg(format!("hub {repo_id}: model_index.json: {e}")))?;
    let info = repo
        .info()
        .map_err(|e| Error::msg(format!("hub {repo_id}: {e}")))?;
    for f in info.siblings {
        let name = f.rfilename;
        let wanted = (name.ends_with(".json") || name.ends_with(".txt"))
            && name.contains('/')
            && !name.contains(".index.json");
        if wanted {
            repo.get(&name)
                .map_err(|e| Error::msg(format!("hub {repo_id}: {name}: {e}")))?;
        }
    }
    Ok(index.parent().expect("a file in a folder").to_path_buf())
}

#[cfg(not(feature = "hub"))]
fn fetch_configs(repo_id: &str) -> Result<PathBuf> {
    Err(Error::msg(format!(
        "this build has no hub support (feature `hub`) to fetch {repo_id}'s configs"
    )))
}

/// The cache root for converted single files: `$DIFFPREF_CACHE`, else `$XDG_CACHE_HOME/diffpref`, else
/// `~/.cache/diffpref`.
pub fn cache_root() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("DIFFPREF_CACHE").filter(|s| !s.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|s| !s.is_empty()) {
        return Ok(PathBuf::from(d).join("diffpref"));
    }
    std::env::var_os("HOME")
        .filter(|s| !s.is_empty())
        .map(|h| PathBuf::from(h).join(".cache/diffpref"))
        .ok_or_else(|| Error::msg("no cache folder: set DIFFPREF_CACHE"))
}

/// A single file as a diffusers folder: converted once with [`default_config_dir`]'s configs into
/// `<cache>/single-file/<stem>-<key>/` (the key hashes the file's path, size and modification time and the config
/// folder, so an edited file is converted again) and reused afterwards. The folder appears atomically.
pub fn materialize(ckpt: &Path) -> Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    let real = ckpt.canonicalize().map_err(io(ckpt))?;
    let meta = std::fs::metadata(&real).map_err(io(&real))?;
    let config_dir = default_config_dir(&real)?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    real.hash(&mut h);
    meta.len().hash(&mut h);
    meta.modified().ok().hash(&mut h);
    config_dir.hash(&mut h);
    let stem = real
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect::<String>();
    let root = cache_root()?.join("single-file");
    let dst = root.join(format!("{stem}-{:016x}", h.finish()));
    if dst.join("model_index.json").exists() {
        return Ok(dst);
    }
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let tmp = root.join(format!(
        ".{stem}-{:016x}.tmp-{}",
        h.finish(),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    let done = write_folder(&real, &config_dir, None, &tmp).and_then(|_| {
        match std::fs::rename(&tmp, &dst) {
            Ok(()) => Ok(()),
            // Another process finished the same conversion first.
            Err(_) if dst.join("model_index.json").exists() => {
                std::fs::remove_dir_all(&tmp).map_err(io(&tmp))
            }
            Err(e) => Err(io(&dst)(e)),
        }
    });
    if done.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    done.map(|()| dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_whole_segments_and_prefer_the_longest() {
        let rules = vec![
            ("a.b".to_string(), "x".to_string()),
            ("a.b.c".to_string(), "y.z".to_string()),
        ];
        assert_eq!(rename(&rules, "x.w", true).as_deref(), Some("a.b.w"));
        assert_eq!(rename(&rules, "a.b.c.w", false).as_deref(), Some("y.z.w"));
        assert_eq!(rename(&rules, "a.b.cc", false).as_deref(), Some("x.cc"));
        assert_eq!(rename(&rules, "a.bb", false), None);
        assert_eq!(rename(&rules, "a.b", false).as_deref(), Some("x"));
    }

    #[test]
    fn family_from_keys() {
        let f = |ks: &[&str]| Family::of_keys(ks.iter().copied());
        assert_eq!(
            f(&["model.diffusion_model.x", "cond_stage_model.transformer.y"]).unwrap(),
            Family::Sd1
        );
        assert_eq!(
            f(&["model.diffusion_model.x", "cond_stage_model.model.y"]).unwrap(),
            Family::Sd2
        );
        assert_eq!(
            f(&[
                "model.diffusion_model.x",
                "conditioner.embedders.0.transformer.y",
                "conditioner.embedders.1.model.z"
            ])
            .unwrap(),
            Family::Sdxl
        );
        assert!(f(&["cond_stage_model.transformer.y"]).is_err());
        assert!(f(&["model.diffusion_model.x"]).is_err());
    }
}
