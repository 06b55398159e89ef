//! Preference fine-tuning methods, one per file, each with its equations in the doc comment.

pub mod dpo;
