//! Where reward-model weights come from: local safetensors files or folders, PyTorch pickles (`.pt`, `.pth`,
//! `.bin`; a top-level `state_dict` is unwrapped, as in HPSv2's checkpoints), or hub ids (`org/name`, fetched
//! with hf-hub when online and the `hub` feature is on).

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use diffpref_pipelines::Params;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Whether `path` names a PyTorch pickle checkpoint (by extension).
pub fn is_pickle(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("pt" | "pth" | "bin" | "ckpt")
    )
}

/// Opens weight files as [`Params`]: safetensors files (memory-mapped, several shards at once) or one
/// PyTorch pickle.
pub fn open_params(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Params> {
    match files {
        [one] if is_pickle(one) => {
            let map = read_pickle(one)?;
            Ok(Params::from_map(map, dtype, device))
        }
        _ => Ok(Params::from_files(files, dtype, device)?),
    }
}

/// Reads every tensor of a PyTorch pickle; a top-level `state_dict` entry is used when there is one, and a
/// `module.` prefix on every key is dropped.
pub fn read_pickle(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(diffpref_pipelines::Error::MissingFile(path.to_path_buf()).into());
    }
    let tensors = match candle_core::pickle::read_all_with_key(path, Some("state_dict")) {
        Ok(t) if !t.is_empty() => t,
        _ => candle_core::pickle::read_all(path).map_err(|e| {
            Error::msg(format!(
                "cannot read PyTorch checkpoint {}: {e}",
                path.display()
            ))
        })?,
    };
    if tensors.is_empty() {
        return Err(Error::msg(format!(
            "{}: no tensors found (neither a state dict nor a `state_dict` entry)",
            path.display()
        )));
    }
    // Checkpoints saved from DistributedDataParallel prefix every key with `module.`.
    let all_module = tensors.iter().all(|(k, _)| k.starts_with("module."));
    Ok(tensors
        .into_iter()
        .map(|(k, t)| {
            if all_module {
                (k["module.".len()..].to_string(), t)
            } else {
                (k, t)
            }
        })
        .collect())
}

/// Replaces "the in-memory weights" (what [`Params`] says for map-backed weights, e.g. a pickle) by the
/// file's name in missing-tensor and shape errors.
pub fn name_source(e: Error, files: &[PathBuf]) -> Error {
    let desc = files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    match e {
        Error::Pipelines(diffpref_pipelines::Error::MissingTensor { name, files })
            if files == "the in-memory weights" =>
        {
            diffpref_pipelines::Error::MissingTensor { name, files: desc }.into()
        }
        Error::Pipelines(diffpref_pipelines::Error::ShapeMismatch {
            name,
            files,
            expected,
            found,
        }) if files == "the in-memory weights" => diffpref_pipelines::Error::ShapeMismatch {
            name,
            files: desc,
            expected,
            found,
        }
        .into(),
        e => e,
    }
}

/// The first of `bases` (`model`, `open_clip_model`, ...) with a safetensors file (or sharded index) in
/// `dir`, else a single PyTorch pickle named `base.{bin,pt,pth}`, else the only `*.pt` / `*.pth` in `dir`.
pub fn find_weights(dir: &Path, bases: &[&str]) -> Result<Vec<PathBuf>> {
    for base in bases {
        if let Ok(files) = diffpref_pipelines::weights::find_weight_files(dir, base, None) {
            return Ok(files);
        }
    }
    for base in bases {
        for ext in ["bin", "pt", "pth"] {
            let f = dir.join(format!("{base}.{ext}"));
            if f.exists() {
                return Ok(vec![f]);
            }
        }
    }
    let pickles: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| diffpref_pipelines::Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("pt" | "pth")))
        .collect();
    if pickles.len() == 1 {
        return Ok(pickles);
    }
    Err(Error::msg(format!(
        "{}: no weights found (looked for {} .safetensors / .bin / .pt{})",
        dir.display(),
        bases.join(", "),
        if pickles.len() > 1 {
            format!(", and {} .pt/.pth files is ambiguous", pickles.len())
        } else {
            String::new()
        }
    )))
}

/// The folder and weight files of a `--weights` argument: a folder (weights found by [`find_weights`]) or a
/// weights file (its folder holds the configs).
pub fn folder_and_files(path: &Path, bases: &[&str]) -> Result<(PathBuf, Vec<PathBuf>)> {
    if path.is_dir() {
        Ok((path.to_path_buf(), find_weights(path, bases)?))
    } else if path.is_file() {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        Ok((dir, vec![path.to_path_buf()]))
    } else {
        Err(diffpref_pipelines::Error::MissingFile(path.to_path_buf()).into())
    }
}

/// Resolves a weights argument: an existing local path as is, otherwise a hub id (`org/name`) downloaded
/// into the hf-hub cache (configs, tokenizer files and safetensors weights; needs the `hub` feature and a
/// network).
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    let looks_like_hub_id =
        spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/');
    if !looks_like_hub_id {
        return Err(diffpref_pipelines::Error::MissingFile(p.to_path_buf()).into());
    }
    fetch_from_hub(spec)
}

#[cfg(feature = "hub")]
fn fetch_from_hub(id: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| Error::msg(format!("hub {id}: {e}")))?;
    let repo = api.model(id.to_string());
    let info = repo
        .info()
        .map_err(|e| Error::msg(format!("hub {id}: {e}")))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let wanted = [
        "config.json",
        "open_clip_config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
    ];
    let mut root = None;
    for f in files.iter().filter(|f| wanted.contains(&f.as_str())) {
        let local = repo
            .get(f)
            .map_err(|e| Error::msg(format!("hub {id}: cannot fetch {f}: {e}")))?;
        root = local.parent().map(|p| p.to_path_buf());
    }
    let weights = ["model.safetensors", "open_clip_model.safetensors"];
    let mut got_weights = false;
    for w in weights {
        if files.iter().any(|f| f == w) {
            let local = repo
                .get(w)
                .map_err(|e| Error::msg(format!("hub {id}: cannot fetch {w}: {e}")))?;
            root = local.parent().map(|p| p.to_path_buf());
            got_weights = true;
            break;
        }
    }
    if !got_weights {
        return Err(Error::msg(format!(
            "hub {id}: no model.safetensors or open_clip_model.safetensors in the repository; download \
             the checkpoint and pass its local path"
        )));
    }
    root.ok_or_else(|| Error::msg(format!("hub {id}: nothing downloaded")))
}

#[cfg(not(feature = "hub"))]
fn fetch_from_hub(id: &str) -> Result<PathBuf> {
    Err(Error::msg(format!(
        "{id}: no such local path, and this build has no hub support (feature `hub`)"
    )))
}
