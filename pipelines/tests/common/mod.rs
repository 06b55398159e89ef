//! Helpers shared by the pipelines integration tests.

use candle_core::{DType, Device, Shape, Tensor};

/// N(0, std²) noise of `shape` from a fixed seed: every random input of these tests is reproducible.
pub fn randn(seed: u64, std: f64, shape: impl Into<Shape>, dev: &Device, dtype: DType) -> Tensor {
    let shape = shape.into();
    (diffpref_pipelines::pipeline::seeded_noise(seed, shape.dims(), dev).unwrap() * std)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}
