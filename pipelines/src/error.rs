//! Error type of `diffpref-pipelines`: every variant names the file, tensor, key or value at fault.

use std::path::PathBuf;

/// Errors raised while loading or running models, schedulers and pipelines.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("missing file: {0}")]
    MissingFile(PathBuf),
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("tensor `{name}` not found in {files}")]
    MissingTensor { name: String, files: String },
    #[error("tensor `{name}` in {files} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        files: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{file}: unsupported value {value} for `{key}`{}", if .hint.is_empty() { String::new() } else { format!(" ({})", .hint) })]
    UnsupportedConfig {
        file: String,
        key: String,
        value: String,
        hint: String,
    },
    #[error("{file}: {msg}")]
    Invalid { file: String, msg: String },
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("{0}")]
    Msg(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile(path)
        } else {
            Error::Io { path, source }
        }
    }

    pub fn unsupported(
        file: impl Into<String>,
        key: impl Into<String>,
        value: impl std::fmt::Display,
        hint: impl Into<String>,
    ) -> Self {
        Error::UnsupportedConfig {
            file: file.into(),
            key: key.into(),
            value: value.to_string(),
            hint: hint.into(),
        }
    }

    pub fn msg(m: impl Into<String>) -> Self {
        Error::Msg(m.into())
    }
}

/// Reads a JSON file into a config struct; errors name the file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}
