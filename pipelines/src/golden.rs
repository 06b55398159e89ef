//! Golden reference files: safetensors with inputs, expected outputs and per-tensor tolerances in the
//! metadata (`tolerances`: `{tensor: [atol, rtol]}`), made with diffusers / transformers.
//!
//! Used by the parity tests and by `diffpref verify`. A float tensor passes when every element satisfies
//! `|actual - golden| <= atol + rtol * |golden|`; integer tensors must match exactly.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One golden file, loaded.
pub struct Golden {
    pub path: PathBuf,
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
    tolerances: HashMap<String, (f64, f64)>,
}

/// The outcome of comparing one tensor.
#[derive(Clone, Debug)]
pub struct Comparison {
    pub name: String,
    pub max_abs_err: f64,
    /// max over elements of |a - g| / (atol + rtol |g|); ≤ 1 passes. 0 for exact matches.
    pub ratio: f64,
    pub passed: bool,
    pub note: String,
}

impl std::fmt::Display for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<6} {:<48} max|err| {:>10.3e}  {:>8.3} x tol{}",
            if self.passed { "ok" } else { "FAIL" },
            self.name,
            self.max_abs_err,
            self.ratio,
            if self.note.is_empty() {
                String::new()
            } else {
                format!("  ({})", self.note)
            }
        )
    }
}

impl Golden {
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let metadata = read_metadata(&bytes).map_err(|msg| Error::Invalid {
            file: path.display().to_string(),
            msg,
        })?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        let mut tolerances = HashMap::new();
        if let Some(t) = metadata.get("tolerances") {
            let v: HashMap<String, (f64, f64)> =
                serde_json::from_str(t).map_err(|e| Error::Invalid {
                    file: path.display().to_string(),
                    msg: format!("metadata `tolerances` is not {{name: [atol, rtol]}}: {e}"),
                })?;
            tolerances = v;
        }
        Ok(Golden {
            path,
            tensors,
            metadata,
            tolerances,
        })
    }

    /// The check this file names (`kind` metadata).
    pub fn kind(&self) -> Option<&str> {
        self.metadata.get("kind").map(|s| s.as_str())
    }

    pub fn meta(&self, key: &str) -> Result<&str> {
        self.metadata
            .get(key)
            .map(|s| s.as_str())
            .ok_or_else(|| Error::Invalid {
                file: self.path.display().to_string(),
                msg: format!("metadata key `{key}` is missing"),
            })
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            files: self.path.display().to_string(),
        })
    }

    /// The tensor on `device` (f32 data stays f32).
    pub fn get_on(&self, name: &str, device: &Device) -> Result<Tensor> {
        Ok(self.get(name)?.to_device(device)?)
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn tolerance(&self, name: &str) -> Option<(f64, f64)> {
        self.tolerances.get(name).copied()
    }

    /// Compares `actual` with the golden tensor `name` (tolerance from the metadata; `scale` multiplies it,
    /// for reduced-precision runs).
    pub fn compare(&self, name: &str, actual: &Tensor, scale: f64) -> Result<Comparison> {
        let expected = self.get(name)?;
        if expected.dims() != actual.dims() {
            return Ok(Comparison {
                name: name.into(),
                max_abs_err: f64::INFINITY,
                ratio: f64::INFINITY,
                passed: false,
                note: format!("shape {:?}, expected {:?}", actual.dims(), expected.dims()),
            });
        }
        if expected.dtype() == DType::I64 || expected.dtype() == DType::U32 {
            let e: Vec<i64> = expected.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
            let a: Vec<i64> = actual
                .to_device(&Device::Cpu)?
                .to_dtype(DType::I64)?
                .flatten_all()?
                .to_vec1()?;
            let wrong = e.iter().zip(&a).filter(|(x, y)| x != y).count();
            return Ok(Comparison {
                name: name.into(),
                max_abs_err: if wrong == 0 { 0.0 } else { f64::INFINITY },
                ratio: if wrong == 0 { 0.0 } else { f64::INFINITY },
                passed: wrong == 0,
                note: if wrong == 0 {
                    "exact".into()
                } else {
                    format!("{wrong} of {} differ", e.len())
                },
            });
        }
        let (atol, rtol) = self.tolerance(name).ok_or_else(|| Error::Invalid {
            file: self.path.display().to_string(),
            msg: format!("no tolerance for `{name}` in the metadata"),
        })?;
        let (atol, rtol) = (atol * scale, rtol * scale);
        let e: Vec<f64> = expected.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let a: Vec<f64> = actual
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        let mut max_abs: f64 = 0.0;
        let mut ratio: f64 = 0.0;
        let mut nonfinite = false;
        for (g, x) in e.iter().zip(&a) {
            if !x.is_finite() {
                nonfinite = true;
                continue;
            }
            let err = (x - g).abs();
            max_abs = max_abs.max(err);
            ratio = ratio.max(err / (atol + rtol * g.abs()));
        }
        if nonfinite {
            ratio = f64::INFINITY;
        }
        Ok(Comparison {
            name: name.into(),
            max_abs_err: max_abs,
            ratio,
            passed: ratio <= 1.0,
            note: if nonfinite {
                "non-finite values".into()
            } else {
                String::new()
            },
        })
    }
}

/// Reads the `__metadata__` object of a safetensors header (candle's loader drops it).
pub fn read_metadata(bytes: &[u8]) -> std::result::Result<HashMap<String, String>, String> {
    if bytes.len() < 8 {
        return Err("not a safetensors file (shorter than its header length)".into());
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let end = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| {
            format!(
                "not a safetensors file (header length {n} past the end of its {} bytes)",
                bytes.len()
            )
        })?;
    let n = end - 8;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n])
        .map_err(|e| format!("bad safetensors header: {e}"))?;
    let mut out = HashMap::new();
    if let Some(m) = header.get("__metadata__").and_then(|m| m.as_object()) {
        for (k, v) in m {
            if let Some(s) = v.as_str() {
                out.insert(k.clone(), s.to_string());
            }
        }
    }
    Ok(out)
}
