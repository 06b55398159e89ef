//! Differentiable building blocks shared by every model.
//!
//! candle-nn's fused `softmax_last_dim`, `LayerNorm::forward` and `rms_norm` have no backward and cut the graph
//! silently; nothing here uses them. Normalisations run in f32 whatever the model dtype, and every linear/conv
//! layer carries its diffusers module path and an adapter slot where LoRA (or any other delta) attaches.

use crate::autograd;
use crate::weights::Params;
use candle_core::{DType, Module, Result, Tensor, D};
use std::sync::{Arc, RwLock};

/// Something added to a layer's output: `y = base(x) + Σ adapter(x)` (LoRA, LoHa, ...).
pub trait Adapter: Send + Sync {
    /// The delta for input `x` (same shape as the base layer's output).
    fn delta(&self, x: &Tensor) -> Result<Tensor>;
}

type AdapterSlot = Arc<RwLock<Vec<Arc<dyn Adapter>>>>;

fn apply_adapters(slot: &AdapterSlot, x: &Tensor, mut y: Tensor) -> Result<Tensor> {
    let adapters = slot.read().unwrap();
    for a in adapters.iter() {
        y = autograd::add(&y, &a.delta(x)?)?;
    }
    Ok(y)
}

/// A fully connected layer `y = x Wᵀ + b` (weights `[out, in]`, as PyTorch).
#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// diffusers module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub path: String,
    adapters: AdapterSlot,
}

impl Linear {
    pub fn new(p: &Params, in_dim: usize, out_dim: usize, bias: bool) -> crate::Result<Self> {
        let weight = p.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(p.get(out_dim, "bias")?)
        } else {
            None
        };
        let l = Linear {
            weight,
            bias,
            path: p.module_path(),
            adapters: Arc::default(),
        };
        p.register(Layer::Linear(l.clone()));
        Ok(l)
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    /// Adds an adapter whose delta is summed into the output.
    pub fn attach(&self, a: Arc<dyn Adapter>) {
        self.adapters.write().unwrap().push(a);
    }

    /// Removes all adapters.
    pub fn clear_adapters(&self) {
        self.adapters.write().unwrap().clear();
    }

    /// The base layer alone (no adapters).
    pub fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.weight, self.bias.as_ref())
    }
}

/// `x Wᵀ + b` on any leading shape, as one 2-D matmul over a contiguous input (avoids candle#3744).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_dim = *dims.last().unwrap();
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.contiguous()?.reshape((rows, in_dim))?;
    let y = match b {
        Some(b) => autograd::matmul_bias(&x2, &w.t()?, b)?,
        None => autograd::matmul(&x2, &w.t()?)?,
    };
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = w.dim(0)?;
    y.reshape(out_dims)
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_base(x)?;
        apply_adapters(&self.adapters, x, y)
    }
}

/// 2-D convolution with PyTorch weight layout `[out, in/groups, k, k]`.
#[derive(Clone)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
    pub path: String,
    adapters: AdapterSlot,
}

impl Conv2d {
    pub fn new(
        p: &Params,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> crate::Result<Self> {
        Self::new_with_bias(p, in_c, out_c, kernel, stride, padding, true)
    }

    pub fn new_with_bias(
        p: &Params,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> crate::Result<Self> {
        let weight = p.get((out_c, in_c, kernel, kernel), "weight")?;
        let bias = if bias {
            Some(p.get(out_c, "bias")?)
        } else {
            None
        };
        let c = Conv2d {
            weight,
            bias,
            stride,
            padding,
            path: p.module_path(),
            adapters: Arc::default(),
        };
        p.register(Layer::Conv2d(c.clone()));
        Ok(c)
    }

    pub fn attach(&self, a: Arc<dyn Adapter>) {
        self.adapters.write().unwrap().push(a);
    }

    pub fn clear_adapters(&self) {
        self.adapters.write().unwrap().clear();
    }

    pub fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.weight.dim(2)?;
        let y = if k == 1 && self.stride == 1 && self.padding == 0 {
            // 1x1 convolution as a matmul over channels (faster on CPU, same result).
            let (b, c, h, w) = x.dims4()?;
            let o = self.weight.dim(0)?;
            let w2 = self.weight.reshape((o, c))?;
            let xs = x.contiguous()?.reshape((b, c, h * w))?;
            autograd::matmul(&w2.broadcast_left(b)?.contiguous()?, &xs)?.reshape((b, o, h, w))?
        } else {
            autograd::conv2d(x, &self.weight, self.padding, self.stride, 1)?
        };
        match &self.bias {
            Some(b) => autograd::broadcast_add(&y, &b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_base(x)?;
        apply_adapters(&self.adapters, x, y)
    }
}

/// A layer that adapters can attach to, as registered while a model is built.
#[derive(Clone)]
pub enum Layer {
    Linear(Linear),
    Conv2d(Conv2d),
}

impl Layer {
    pub fn path(&self) -> &str {
        match self {
            Layer::Linear(l) => &l.path,
            Layer::Conv2d(c) => &c.path,
        }
    }
}

/// LayerNorm over the last dimension, computed in f32 from primitive (differentiable) ops.
#[derive(Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(p: &Params, dim: usize, eps: f64) -> crate::Result<Self> {
        Ok(LayerNorm {
            weight: p.get(dim, "weight")?,
            bias: p.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let mean = xf.mean_keepdim(D::Minus1)?;
        let xc = xf.broadcast_sub(&mean)?;
        let var = mean_sqr_last(&xc)?;
        let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dt)?;
        autograd::scale_shift(&y, &self.weight, &self.bias)
    }
}

/// `mean(x²)` over the last dimension, keepdim: `x.sqr()?.mean_keepdim(D::Minus1)` (the same values and
/// gradient) without the squares in the graph.
fn mean_sqr_last(x: &Tensor) -> Result<Tensor> {
    let n = x.dim(D::Minus1)?;
    autograd::sum_sqr_last(x)? * (1f64 / n as f64)
}

/// GroupNorm over `[B, C, ...]`, statistics in f32, differentiable.
#[derive(Clone)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(p: &Params, groups: usize, channels: usize, eps: f64) -> crate::Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(crate::Error::msg(format!(
                "{}: {channels} channels cannot be split into {groups} groups (norm_num_groups)",
                p.module_path()
            )));
        }
        Ok(GroupNorm {
            weight: p.get(channels, "weight")?,
            bias: p.get(channels, "bias")?,
            groups,
            eps,
        })
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let xf = x.to_dtype(DType::F32)?.reshape((b, self.groups, ()))?;
        let mean = xf.mean_keepdim(D::Minus1)?;
        let xc = xf.broadcast_sub(&mean)?;
        let var = mean_sqr_last(&xc)?;
        let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let y = y.reshape(dims.as_slice())?.to_dtype(dt)?;
        let mut shape = vec![1usize; dims.len()];
        shape[1] = c;
        autograd::scale_shift(
            &y,
            &self.weight.reshape(shape.as_slice())?,
            &self.bias.reshape(shape.as_slice())?,
        )
    }
}

/// Softmax over the last dimension with a backward (the max shift is detached: softmax is shift-invariant,
/// so the gradient is unchanged); see [`autograd::softmax_last`].
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    autograd::softmax_last(x)
}

/// Activation functions named as in diffusers / transformers configs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// Exact (erf) GELU.
    Gelu,
    /// tanh-approximate GELU (`gelu_pytorch_tanh`, `gelu_new`).
    GeluTanh,
    /// x · σ(1.702 x) (OpenAI CLIP).
    QuickGelu,
    Relu,
}

impl Activation {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "quick_gelu" => Activation::QuickGelu,
            "relu" => Activation::Relu,
            _ => return None,
        })
    }

    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Silu => x.silu(),
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
            Activation::QuickGelu => x.broadcast_mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?),
            Activation::Relu => x.relu(),
        }
    }
}

/// Scaled dot-product attention on `[B, H, T, d]` tensors, softmax in f32 when `upcast` or the inputs are
/// half precision. Optional additive mask broadcastable to `[B, H, Tq, Tk]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    upcast: bool,
) -> Result<Tensor> {
    let dt = q.dtype();
    let d = q.dim(D::Minus1)?;
    let scale = 1.0 / (d as f64).sqrt();
    let (q, k) = if upcast || dt != DType::F32 {
        (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
    } else {
        (q.clone(), k.clone())
    };
    let scores = autograd::matmul(&q.contiguous()?, &k.t()?.contiguous()?)?;
    let probs = match mask {
        Some(m) => {
            let m = m.to_dtype(scores.dtype())?;
            softmax_last(&autograd::broadcast_add(&(scores * scale)?, &m)?)?
        }
        None => autograd::softmax_last_scaled(&scores, scale)?,
    }
    .to_dtype(v.dtype())?;
    autograd::matmul(&probs, &v.contiguous()?)
}

/// `[B, T, H·d] -> [B, H, T, d]`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    x.reshape((b, t, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `[B, H, T, d] -> [B, T, H·d]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, t, h * d))
}
