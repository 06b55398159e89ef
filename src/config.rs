//! Configuration plumbing shared by every command that reads a TOML file: `--set key=value` overrides,
//! loading with unknown keys reported by name (also through flattened sections), and the typed values that
//! used to be strings parsed deep inside (device, dtype, scheduler): they are parsed when the file loads, and a
//! bad value is an error naming its key.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use diffpref_pipelines::schedulers::SchedulerKind;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// Where to compute: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    /// Opens the device (CUDA needs a build with `--features cuda` and a GPU).
    pub fn device(&self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                Device::new_cuda(*n).with_context(|| format!("device {self}: cannot open the GPU"))
            }
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            t => match t.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                Some(Err(_)) => bail!("{s:?}: bad GPU index (expected cuda:N)"),
                None => bail!("{s:?}: expected cpu, cuda or cuda:N"),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// A model dtype: `f32` (also `float32`, `fp32`), `bf16` (`bfloat16`) or `f16` (`float16`, `fp16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DTypeSpec {
    #[default]
    F32,
    Bf16,
    F16,
}

impl DTypeSpec {
    pub fn dtype(&self) -> DType {
        match self {
            DTypeSpec::F32 => DType::F32,
            DTypeSpec::Bf16 => DType::BF16,
            DTypeSpec::F16 => DType::F16,
        }
    }
}

impl FromStr for DTypeSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim() {
            "f32" | "float32" | "fp32" => DTypeSpec::F32,
            "bf16" | "bfloat16" => DTypeSpec::Bf16,
            "f16" | "float16" | "fp16" => DTypeSpec::F16,
            _ => bail!("{s:?}: expected f32, bf16 or f16"),
        })
    }
}

impl fmt::Display for DTypeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DTypeSpec::F32 => "f32",
            DTypeSpec::Bf16 => "bf16",
            DTypeSpec::F16 => "f16",
        })
    }
}

/// Serialises a `Display` value as a string and parses it back with `FromStr` (the error becomes serde's,
/// which the loader reports with the key).
macro_rules! string_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
string_serde!(DeviceSpec);
string_serde!(DTypeSpec);

/// A sampler name (`ddim`, `ddpm`, `euler`, `euler-a`, `dpmpp-2m`) as a typed config value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerSpec(pub SchedulerKind);

impl fmt::Display for SchedulerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name())
    }
}

impl FromStr for SchedulerSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(SchedulerSpec(SchedulerKind::parse(s)?))
    }
}
string_serde!(SchedulerSpec);

/// Sets `key.path = value` in a TOML document; `value` is parsed as a TOML value, else taken as a string.
pub fn apply_override(doc: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, value) = assignment
        .split_once('=')
        .with_context(|| format!("--set {assignment}: expected key=value"))?;
    let (key, value) = (key.trim(), value.trim());
    if key.is_empty() || key.split('.').any(|p| p.is_empty()) {
        bail!("--set {assignment}: `{key}` is not a key (expected e.g. optim.lr=1e-4)");
    }
    let parsed: toml::Value = match format!("v = {value}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").expect("parsed one key"),
        Err(_) => toml::Value::String(value.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    let mut table = doc;
    for p in &parts[..parts.len() - 1] {
        table = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .with_context(|| format!("--set {assignment}: `{p}` is not a table"))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), parsed);
    Ok(())
}

/// Keys of `input` (a TOML table) that `known` (the same config serialised back to JSON) does not have, as
/// dotted paths. Tables of arrays are compared element by element.
fn unknown_keys(
    input: &toml::Value,
    known: &serde_json::Value,
    prefix: &str,
    out: &mut Vec<String>,
) {
    match (input, known) {
        (toml::Value::Table(t), serde_json::Value::Object(k)) => {
            for (key, v) in t {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                match k.get(key) {
                    Some(kv) => unknown_keys(v, kv, &path, out),
                    None => out.push(path),
                }
            }
        }
        (toml::Value::Array(a), serde_json::Value::Array(k)) => {
            for (i, (v, kv)) in a.iter().zip(k).enumerate() {
                unknown_keys(v, kv, &format!("{prefix}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// A document holding only `value` at `path`.
fn only(path: &[String], value: &toml::Value) -> toml::Value {
    path.iter().rev().fold(value.clone(), |v, k| {
        let mut t = toml::Table::new();
        t.insert(k.clone(), v);
        toml::Value::Table(t)
    })
}

/// The dotted path of the smallest part of `table` (at `prefix`) that `T` cannot be read from on its own (the
/// rest left at the defaults), for error messages: serde's errors do not say which key, least of all through
/// flattened sections. A table is searched below only when one of its keys fails alone (a tagged enum's keys
/// only make sense together).
fn culprit<T: DeserializeOwned>(table: &toml::Table, prefix: &[String]) -> Option<String> {
    for (k, v) in table {
        let mut path = prefix.to_vec();
        path.push(k.clone());
        if only(&path, v).try_into::<T>().is_ok() {
            continue;
        }
        if let toml::Value::Table(t) = v {
            if let Some(deeper) = culprit::<T>(t, &path) {
                return Some(deeper);
            }
        }
        return Some(path.join("."));
    }
    None
}

/// Parses a TOML configuration (`what` names it in errors: a file name, or "the embedded default") into `T`,
/// after applying `--set` overrides. Every key must be known: serde reports unknown keys of sections that deny
/// them, and a round trip catches the rest (keys of `#[serde(flatten)]`ed sections, which serde cannot deny).
pub fn from_toml<T: DeserializeOwned + Serialize>(
    text: &str,
    what: &str,
    overrides: &[String],
) -> Result<T> {
    let mut doc: toml::Table = text
        .parse()
        .with_context(|| format!("{what}: invalid TOML"))?;
    for o in overrides {
        apply_override(&mut doc, o)?;
    }
    let input = toml::Value::Table(doc.clone());
    let cfg: T = match input.clone().try_into() {
        Ok(c) => c,
        Err(e) => {
            let key = culprit::<T>(&doc, &[])
                .map(|k| format!(" `{k}`"))
                .unwrap_or_default();
            bail!("{what}: invalid configuration:{key} {e}")
        }
    };
    let mut unknown = Vec::new();
    unknown_keys(&input, &serde_json::to_value(&cfg)?, "", &mut unknown);
    if !unknown.is_empty() {
        bail!(
            "{what}: unknown key{} {} (every key and its default: the examples/ folder)",
            if unknown.len() > 1 { "s" } else { "" },
            unknown
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(cfg)
}

/// Reads a TOML configuration file (or, with no path, an empty one: all defaults) and applies `--set`
/// overrides (see [`from_toml`]).
pub fn load_toml<T: DeserializeOwned + Serialize>(
    path: Option<&Path>,
    overrides: &[String],
) -> Result<T> {
    match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config {}", p.display()))?;
            from_toml(&text, &p.display().to_string(), overrides)
        }
        None => from_toml("", "the configuration", overrides),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Default)]
    #[serde(default)]
    struct Shared {
        device: DeviceSpec,
        dtype: DTypeSpec,
        scheduler: Option<SchedulerSpec>,
    }

    #[derive(Serialize, Deserialize, Default)]
    #[serde(default)]
    struct Cfg {
        #[serde(flatten)]
        run: Shared,
        lr: f64,
        inner: Inner,
    }

    #[derive(Serialize, Deserialize, Default)]
    #[serde(default, deny_unknown_fields)]
    struct Inner {
        a: Option<u32>,
    }

    #[test]
    fn typed_values_parse_at_load_and_errors_name_the_key() {
        let c: Cfg = from_toml(
            "device = \"cuda:1\"\ndtype = \"bf16\"\nscheduler = \"euler-a\"",
            "t.toml",
            &["lr=0.5".into(), "inner.a=3".into()],
        )
        .unwrap();
        assert_eq!(c.run.device, DeviceSpec::Cuda(1));
        assert_eq!(c.run.dtype.dtype(), DType::BF16);
        assert_eq!(c.run.scheduler.unwrap().0, SchedulerKind::EulerAncestral);
        assert_eq!((c.lr, c.inner.a), (0.5, Some(3)));
        let e = format!(
            "{:#}",
            from_toml::<Cfg>("device = \"gpu\"", "t.toml", &[])
                .err()
                .unwrap()
        );
        assert!(
            e.contains("t.toml") && e.contains("gpu") && e.contains("cuda:N"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            from_toml::<Cfg>("dtype = \"f8\"", "t.toml", &[])
                .err()
                .unwrap()
        );
        assert!(
            e.contains("`dtype`") && e.contains("f8") && e.contains("bf16"),
            "{e}"
        );
        // Unknown keys, in the flattened part and in a nested section, are named.
        let e = format!(
            "{:#}",
            from_toml::<Cfg>("devise = \"cpu\"", "t.toml", &[])
                .err()
                .unwrap()
        );
        assert!(e.contains("`devise`"), "{e}");
        let e = format!(
            "{:#}",
            from_toml::<Cfg>("", "t.toml", &["inner.b=1".into()])
                .err()
                .unwrap()
        );
        assert!(e.contains("`b`") || e.contains("inner.b"), "{e}");
        assert!(from_toml::<Cfg>("", "t.toml", &["=1".into()]).is_err());
        assert!(from_toml::<Cfg>("", "t.toml", &["lr".into()]).is_err());
    }
}
