//! Preference fine-tuning methods, one per file, each with its equations in the doc comment.
//!
//! * [`dpo`] — the Diffusion-DPO loss family on denoising errors; [`pairwise`] — `train dpo`, the offline
//!   trainer on preference pairs.
//! * [`grpo`] — `train grpo`, group-relative policy optimisation on sampled trajectories.
//! * [`lrm`] / [`spm`] — `train lrm` / `train spm`, step reward models trained on pairs at random noise levels
//!   (a latent reward model on noisy latents; a step-aware preference model on the decoded x̂₀).
//! * [`lpo`] / [`spo`] — `train lpo` / `train spo`, step-level preference optimisation on the model's own
//!   trajectories: one loop ([`lpo::StepLevelMethod`]) with the LRM or the SPM as its scorer.
//! * [`adjoint`] — `train adjoint`, Adjoint Matching: the control regressed onto the lean adjoint of a
//!   differentiable reward along memoryless trajectories.
//! * [`seppo`] — `train seppo`, winners against fresh samples of a reference drawn from the run's own
//!   checkpoints, with the anchor-based adaptive flipper.

pub mod adjoint;
pub mod dpo;
pub mod grpo;
pub mod lpo;
pub mod lrm;
pub mod spm;
pub mod spo;

pub mod pairwise;
pub mod seppo;
