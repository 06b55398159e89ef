//! Training data: preference manifests, Pick-a-Pic parquet shards, image preprocessing, latent/text caches.

pub mod cache;
pub mod manifest;
pub mod pickapic;
pub mod preprocess;
