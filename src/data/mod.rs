//! Training data: preference manifests, Pick-a-Pic parquet shards, image preprocessing, latent/text caches, and
//! the resumable [`PairDataset`] tying them together.

pub mod cache;
pub mod dataset;
pub mod latents;
pub mod manifest;
pub mod pickapic;
pub mod prefs;
pub mod preprocess;
pub mod prompt_cycle;
pub mod shapes;

pub use cache::{CachedLatent, LatentCache, TextEmbedCache};
pub use dataset::{DatasetPosition, PairDataset, PairSource};
pub use manifest::{
    load_manifest, load_unpaired_manifest, ManifestOptions, PreferencePair, SkipReport,
    UnpairedSample,
};
pub use pickapic::{read_pickapic, PairImages, PickapicIndex, PickapicOptions, PickapicShard};
pub use preprocess::{maybe_drop_caption, preprocess_pair, PreprocessConfig, Transform};
