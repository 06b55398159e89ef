//! Errors of `diffpref-rewards`: they name the file, key or tensor at fault.

/// Reward-model errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Pipelines(#[from] diffpref_pipelines::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Msg(String),
}

impl Error {
    pub fn msg(m: impl Into<String>) -> Self {
        Error::Msg(m.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;
