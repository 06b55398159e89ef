//! The training core shared by every method: adapters (LoRA), optimizer and schedules, checkpoints, metrics,
//! random streams.

pub mod checkpoint;
pub mod ema;
pub mod lora;
pub mod metrics;
pub mod optim;
pub mod pairwise;
pub mod pretrain;
pub mod rng;
pub mod schedule;
