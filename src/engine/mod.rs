//! The training engine every method stands on.
//!
//! * [`config`] — the shared run section of every training configuration ([`RunConfig`]).
//! * [`policy`] — the trainable weights and a scoped handle on the reference model ([`Policy`]).
//! * [`method`] — the seam to a method: one micro-batch to a loss and named metrics ([`Method`]).
//! * [`trainer`] — the one resumable loop: accumulation, clipping, AdamW, LR schedule, EMA, NaN stop,
//!   checkpoints, metrics, progress, Ctrl-C ([`trainer::train`]).
//! * [`hooks`] — held-out evaluation and validation grids during and after training.
//! * [`run`] — a whole training command: model and policy, the loop, the exported weights, the report.
//!
//! A method implements [`Method`]; its command is then `load_model` → `load_policy` → `Method::new` →
//! [`run::run`]:
//!
//! ```no_run
//! use diffpref::methods::pairwise::{train, DpoConfig};
//! let cfg = DpoConfig::load(Some(std::path::Path::new("examples/dpo.toml")), &[
//!     "model=tests/fixtures/tiny-sd".into(),
//!     "data.manifest=pairs.jsonl".into(),
//! ])?;
//! let summary = train(&cfg, None)?;
//! println!("{} steps, weights in {}", summary.steps, summary.weights.display());
//! # anyhow::Ok(())
//! ```

pub mod config;
pub mod hooks;
pub mod method;
pub mod policy;
pub mod run;
pub mod trainer;

pub use config::{RunConfig, TrainMode};
pub use method::{Method, MicroStep, StepContext};
pub use policy::{Policy, Reference, Weights};
pub use run::TrainSummary;
