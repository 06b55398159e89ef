//! Model code: UNet, VAE, CLIP text encoders and their shared parts, named as in diffusers/transformers.

pub mod attention;
pub mod clip_text;
pub mod embeddings;
pub mod resnet;
pub mod unet;
pub mod vae;
