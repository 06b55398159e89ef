//! # diffpref-pipelines
//!
//! Stable Diffusion (1.x, 2.x, SDXL) in candle, written to be trained: every op is differentiable, timesteps
//! are per sample, layers carry their diffusers names and accept adapters (LoRA). Numerics match diffusers
//! (checked against golden tensors). Contents: model configs and weights loading, the UNet, VAE and CLIP text
//! encoders, the CLIP tokenizer, noise schedulers with step means/stds/log-probs, and the text-to-image
//! pipeline with a per-step observer.

pub mod autograd;
pub mod checks;
pub mod error;
pub mod golden;
pub mod limits;
pub mod loading;
pub mod models;
pub mod nn;
pub mod pipeline;
pub mod schedulers;
pub mod single_file;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
pub use weights::Params;
