//! # diffpref
//!
//! Preference fine-tuning of text-to-image diffusion models (Stable Diffusion 1.x / 2.x / SDXL) in Rust on
//! candle. The model stack, schedulers and text-to-image pipeline live in [`diffpref_pipelines`] (re-exported
//! as [`pipelines`]); reward models in [`diffpref_rewards`]; this crate holds the training core, the methods
//! and the command line.

pub use diffpref_pipelines as pipelines;
pub use diffpref_rewards as rewards;

pub mod align;
pub mod alloc;
pub mod assets;
pub mod cli;
pub mod config;
pub mod data;
pub mod engine;
pub mod eval;
pub mod imaging;
pub mod io;
pub mod methods;
pub mod output;
pub mod rollout;
pub mod scoring;
pub mod train;
