//! Preference fine-tuning methods, one per file, each with its equations in the doc comment.
//!
//! * [`dpo`] — the Diffusion-DPO loss family on denoising errors; [`pairwise`] — `train dpo`, the offline
//!   trainer on preference pairs.
//! * [`grpo`] — `train grpo`, group-relative policy optimisation on sampled trajectories.

pub mod dpo;
pub mod grpo;
pub mod lpo;
pub mod lrm;

pub mod pairwise;
