//! ResNet blocks and resampling layers shared by the UNet and the VAE (diffusers `resnet.py` names:
//! `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`; `Downsample2D.conv`, `Upsample2D.conv`).

use crate::autograd;
use crate::nn::{Activation, Conv2d, GroupNorm, Linear};
use crate::weights::Params;
use crate::Result;
use candle_core::{Module, Tensor};

/// `ResnetBlock2D` with the default (additive) time-embedding norm.
#[derive(Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: Activation,
    output_scale_factor: f64,
}

/// Construction options of a [`ResnetBlock2D`].
#[derive(Clone, Copy, Debug)]
pub struct ResnetOptions {
    pub groups: usize,
    pub eps: f64,
    pub temb_channels: Option<usize>,
    pub output_scale_factor: f64,
    pub act: Activation,
}

impl ResnetBlock2D {
    pub fn new(p: &Params, in_c: usize, out_c: usize, o: ResnetOptions) -> Result<Self> {
        let norm1 = GroupNorm::new(&p.pp("norm1"), o.groups, in_c, o.eps)?;
        let conv1 = Conv2d::new(&p.pp("conv1"), in_c, out_c, 3, 1, 1)?;
        let time_emb_proj = match o.temb_channels {
            Some(t) => Some(Linear::new(&p.pp("time_emb_proj"), t, out_c, true)?),
            None => None,
        };
        let norm2 = GroupNorm::new(&p.pp("norm2"), o.groups, out_c, o.eps)?;
        let conv2 = Conv2d::new(&p.pp("conv2"), out_c, out_c, 3, 1, 1)?;
        let conv_shortcut = if in_c != out_c {
            Some(Conv2d::new(&p.pp("conv_shortcut"), in_c, out_c, 1, 1, 0)?)
        } else {
            None
        };
        Ok(ResnetBlock2D {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            act: o.act,
            output_scale_factor: o.output_scale_factor,
        })
    }

    /// `temb` is the (already computed) time embedding `[B, T]`, or `None` in the VAE.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self
            .conv1
            .forward(&self.act.apply(&self.norm1.forward(x)?)?)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&self.act.apply(t)?)?;
            h = autograd::broadcast_add(&h, &t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self
            .conv2
            .forward(&self.act.apply(&self.norm2.forward(&h)?)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = autograd::add(&skip, &h)?;
        Ok(if self.output_scale_factor != 1.0 {
            (out / self.output_scale_factor)?
        } else {
            out
        })
    }
}

/// `Downsample2D` with a stride-2 3x3 conv. `padding == 0` means diffusers' asymmetric (0, 1, 0, 1) pad.
#[derive(Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    padding: usize,
}

impl Downsample2D {
    pub fn new(p: &Params, channels: usize, out_c: usize, padding: usize) -> Result<Self> {
        Ok(Downsample2D {
            conv: Conv2d::new(&p.pp("conv"), channels, out_c, 3, 2, padding)?,
            padding,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            Ok(self.conv.forward(&x)?)
        } else {
            Ok(self.conv.forward(x)?)
        }
    }
}

/// `Upsample2D`: nearest-neighbour ×2 (or to an explicit size), then a 3x3 conv.
#[derive(Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(p: &Params, channels: usize, out_c: usize) -> Result<Self> {
        Ok(Upsample2D {
            conv: Conv2d::new(&p.pp("conv"), channels, out_c, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let x = x.upsample_nearest2d(th, tw)?;
        Ok(self.conv.forward(&x)?)
    }
}
