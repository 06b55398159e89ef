//! Options shared by every command that computes: device, dtype, model variant.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;

/// `--device cpu|cuda[:N]` and `--dtype f32|bf16|f16`.
#[derive(Args, Clone, Debug)]
pub struct ComputeArgs {
    /// Where to compute: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Model dtype: f32, bf16 or f16 (losses and scheduler arithmetic stay in f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl ComputeArgs {
    pub fn device(&self) -> Result<Device> {
        parse_device(&self.device)
    }

    pub fn dtype(&self) -> Result<DType> {
        parse_dtype(&self.dtype)
    }
}

pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).context("--device cuda"),
        _ => {
            if let Some(n) = s.strip_prefix("cuda:") {
                let n: usize = n
                    .parse()
                    .with_context(|| format!("--device {s}: bad GPU index"))?;
                Device::new_cuda(n).with_context(|| format!("--device {s}"))
            } else {
                bail!("--device {s}: expected cpu, cuda or cuda:N")
            }
        }
    }
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" | "float32" | "fp32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" | "fp16" => DType::F16,
        _ => bail!("--dtype {s}: expected f32, bf16 or f16"),
    })
}

/// A short file-name-safe slug of a prompt.
pub fn slug(text: &str, max: usize) -> String {
    let mut s: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while s.contains("--") {
        s = s.replace("--", "-");
    }
    let s = s.trim_matches('-');
    let s: String = s.chars().take(max).collect();
    if s.is_empty() {
        "empty".into()
    } else {
        s.trim_end_matches('-').to_string()
    }
}
