//! The training building blocks the [engine](crate::engine) assembles: adapters (LoRA), optimizer and
//! schedules, EMA, checkpoints, metrics (JSON lines and TensorBoard), random streams; and `pretrain` (a small SD model from scratch).

pub mod checkpoint;
pub mod ema;
pub mod lora;
pub mod metrics;
pub mod optim;
pub mod pretrain;
pub mod rng;
pub mod schedule;
pub mod tensorboard;
