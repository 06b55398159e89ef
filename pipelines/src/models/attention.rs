//! Transformer parts of the UNet (diffusers `attention_processor.Attention`, `attention.BasicTransformerBlock`,
//! `attention.FeedForward` with GEGLU, `transformers.Transformer2DModel`), all differentiable.
//!
//! Attention: `softmax(Q Kᵀ / √d) V` per head, with `Q = x W_q`, `K = c W_k`, `V = c W_v` (c = x for
//! self-attention), output `to_out.0`. GEGLU: `h ⊙ GELU_erf(g)` with `[h, g] = proj(x)` (the EXACT GELU,
//! as diffusers).

use crate::autograd;
use crate::nn::{self, Conv2d, GroupNorm, LayerNorm, Linear};
use crate::weights::Params;
use crate::Result;
use candle_core::{Module, Tensor, D};

/// Multi-head attention with LoRA-capable `to_q`, `to_k`, `to_v`, `to_out.0`.
#[derive(Clone)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: usize,
    pub upcast: bool,
}

impl Attention {
    pub fn new(
        p: &Params,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let ctx = context_dim.unwrap_or(query_dim);
        Ok(Attention {
            to_q: Linear::new(&p.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::new(&p.pp("to_k"), ctx, inner, false)?,
            to_v: Linear::new(&p.pp("to_v"), ctx, inner, false)?,
            to_out: Linear::new(&p.pp("to_out").pp(0), inner, query_dim, true)?,
            heads,
            upcast,
        })
    }

    /// `x` `[B, T, C]`, `context` `[B, S, C']` (self-attention when `None`).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let c = context.unwrap_or(x);
        let q = nn::split_heads(&self.to_q.forward(x)?, self.heads)?;
        let k = nn::split_heads(&self.to_k.forward(c)?, self.heads)?;
        let v = nn::split_heads(&self.to_v.forward(c)?, self.heads)?;
        let o = nn::attention(&q, &k, &v, None, self.upcast)?;
        Ok(self.to_out.forward(&nn::merge_heads(&o)?)?)
    }
}

/// `FeedForward` with GEGLU: `net.2(GEGLU(net.0.proj(x)))`.
#[derive(Clone)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub fn new(p: &Params, dim: usize, mult: usize) -> Result<Self> {
        let inner = dim * mult;
        Ok(FeedForward {
            proj: Linear::new(&p.pp("net.0.proj"), dim, inner * 2, true)?,
            out: Linear::new(&p.pp("net.2"), inner, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(x)?;
        let chunks = h.chunk(2, D::Minus1)?;
        let h = chunks[0].mul(&chunks[1].gelu_erf()?)?;
        Ok(self.out.forward(&h)?)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, each pre-LayerNorm with a
/// residual.
#[derive(Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    pub fn new(
        p: &Params,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_dim: usize,
        only_cross_attention: bool,
        upcast: bool,
    ) -> Result<Self> {
        let attn1_ctx = if only_cross_attention {
            Some(cross_dim)
        } else {
            None
        };
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::new(&p.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(&p.pp("attn1"), dim, attn1_ctx, heads, head_dim, upcast)?,
            norm2: LayerNorm::new(&p.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(
                &p.pp("attn2"),
                dim,
                Some(cross_dim),
                heads,
                head_dim,
                upcast,
            )?,
            norm3: LayerNorm::new(&p.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(&p.pp("ff"), dim, 4)?,
            only_cross_attention,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let n = self.norm1.forward(x)?;
        let a = if self.only_cross_attention {
            self.attn1.forward(&n, Some(context))?
        } else {
            self.attn1.forward(&n, None)?
        };
        let x = autograd::add(&a, x)?;
        let x = autograd::add(
            &self
                .attn2
                .forward(&self.norm2.forward(&x)?, Some(context))?,
            &x,
        )?;
        let x = autograd::add(&self.ff.forward(&self.norm3.forward(&x)?)?, &x)?;
        Ok(x)
    }
}

#[derive(Clone)]
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// `Transformer2DModel` (continuous input): GroupNorm, `proj_in` (1x1 conv, or linear with
/// `use_linear_projection`), `transformer_blocks`, `proj_out`, residual.
#[derive(Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

/// Options of a [`Transformer2DModel`].
#[derive(Clone, Copy, Debug)]
pub struct TransformerOptions {
    pub heads: usize,
    pub layers: usize,
    pub cross_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
    pub only_cross_attention: bool,
    pub upcast: bool,
}

impl Transformer2DModel {
    pub fn new(p: &Params, channels: usize, o: TransformerOptions) -> Result<Self> {
        if o.heads == 0 || !channels.is_multiple_of(o.heads) {
            return Err(crate::Error::msg(format!(
                "{}: {channels} channels are not divisible by {} attention heads",
                p.module_path(),
                o.heads
            )));
        }
        let head_dim = channels / o.heads;
        let inner = channels;
        let norm = GroupNorm::new(&p.pp("norm"), o.groups, channels, 1e-6)?;
        let (proj_in, proj_out) = if o.linear_projection {
            (
                Proj::Linear(Linear::new(&p.pp("proj_in"), channels, inner, true)?),
                Proj::Linear(Linear::new(&p.pp("proj_out"), inner, channels, true)?),
            )
        } else {
            (
                Proj::Conv(Conv2d::new(&p.pp("proj_in"), channels, inner, 1, 1, 0)?),
                Proj::Conv(Conv2d::new(&p.pp("proj_out"), inner, channels, 1, 1, 0)?),
            )
        };
        let blocks = (0..o.layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    &p.pp("transformer_blocks").pp(i),
                    inner,
                    o.heads,
                    head_dim,
                    o.cross_dim,
                    o.only_cross_attention,
                    o.upcast,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Transformer2DModel {
            norm,
            proj_in,
            blocks,
            proj_out,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let residual = x;
        let n = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor| -> candle_core::Result<Tensor> {
            let ch = t.dim(1)?;
            t.permute((0, 2, 3, 1))?
                .contiguous()?
                .reshape((b, h * w, ch))
        };
        let mut t = match &self.proj_in {
            Proj::Conv(conv) => to_tokens(&conv.forward(&n)?)?,
            Proj::Linear(l) => l.forward(&to_tokens(&n)?)?,
        };
        for blk in &self.blocks {
            t = blk.forward(&t, context)?;
        }
        let from_tokens = |t: &Tensor| -> candle_core::Result<Tensor> {
            let ch = t.dim(2)?;
            t.reshape((b, h, w, ch))?
                .permute((0, 3, 1, 2))?
                .contiguous()
        };
        let out = match &self.proj_out {
            Proj::Conv(conv) => conv.forward(&from_tokens(&t)?)?,
            Proj::Linear(l) => from_tokens(&l.forward(&t)?)?,
        };
        debug_assert_eq!(out.dim(1)?, c);
        Ok(autograd::add(&out, residual)?)
    }
}
