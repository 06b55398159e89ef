//! Differentiable ops that give gradients only to the operands that need them.
//!
//! candle 0.11's backward pass computes a gradient for *both* operands of every binary op, matmul and
//! convolution on the path to a trainable tensor, and keeps the gradients of operands that are not themselves
//! on that path (frozen weights, biases, broadcast constants, activations upstream of the first adapter) in
//! its `GradStore` until the pass ends (candle PR #3773 proposes the same guard for matmul upstream). With a
//! LoRA on a frozen UNet that is one weight-sized gradient per layer (the full model's size again) and one
//! activation-sized gradient per bias add, norm affine, softmax shift and residual — computed for nothing and
//! held to the end.
//!
//! The ops here are candle custom ops with the *same* forward kernels (the same storage calls as
//! `Tensor::matmul`, `Tensor::broadcast_add`, ..., so the outputs are bit-identical) and candle's own backward
//! formulas, evaluated only for operands that track a gradient (`Tensor::track_op`: a variable or computed
//! from one). When both operands or neither need a gradient they fall back to candle's op, so nothing changes
//! where nothing was wasted. [`softmax_last`] additionally keeps only its input and output in the graph (the
//! composite kept four score-sized intermediates) and recomputes the rest in its backward, reproducing the
//! composite's gradient bit for bit.

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::op::{BinaryOpT, ReduceOp};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Storage, Tensor, D,
};
use std::sync::Mutex;

/// Whether a gradient flows to `t` (a variable, or computed from one).
pub fn needs_grad(t: &Tensor) -> bool {
    t.track_op()
}

/// Exactly one of the two operands needs a gradient: the case candle wastes work on.
fn one_sided(a: &Tensor, b: &Tensor) -> bool {
    needs_grad(a) != needs_grad(b)
}

/// `cpu_fwd` and `cuda_fwd` of a custom op whose forward is one generic `fwd(&self, s1, l1, ...)` over
/// [`BackendStorage`]: the same storage calls on either device (`storage_fwd!(s1 l1, s2 l2)` for two operands).
macro_rules! storage_fwd {
    ($($s:ident $l:ident),+) => {
        fn cpu_fwd(&self, $($s: &CpuStorage, $l: &Layout),+) -> Result<(CpuStorage, Shape)> {
            self.fwd($($s, $l),+)
        }

        fn cuda_fwd(&self, $($s: &CudaStorage, $l: &Layout),+) -> Result<(CudaStorage, Shape)> {
            self.fwd($($s, $l),+)
        }
    };
}

#[derive(Clone, Copy, Debug)]
enum BinaryKind {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinaryKind {
    fn fwd<S: BackendStorage>(self, s1: &S, l1: &Layout, s2: &S, l2: &Layout) -> Result<S> {
        use candle_core::op;
        fn run<B: BinaryOpT, S: BackendStorage>(
            s1: &S,
            l1: &Layout,
            s2: &S,
            l2: &Layout,
        ) -> Result<S> {
            s1.binary_impl::<B>(s2, l1, l2)
        }
        match self {
            BinaryKind::Add => run::<op::Add, S>(s1, l1, s2, l2),
            BinaryKind::Sub => run::<op::Sub, S>(s1, l1, s2, l2),
            BinaryKind::Mul => run::<op::Mul, S>(s1, l1, s2, l2),
            BinaryKind::Div => run::<op::Div, S>(s1, l1, s2, l2),
        }
    }

    fn candle(self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        match self {
            BinaryKind::Add => a.add(b),
            BinaryKind::Sub => a.sub(b),
            BinaryKind::Mul => a.mul(b),
            BinaryKind::Div => a.div(b),
        }
    }
}

/// An element-wise binary op on same-shape operands (broadcast ones arrive as broadcast views).
struct Binary(BinaryKind);

impl Binary {
    fn fwd<S: BackendStorage>(
        &self,
        s1: &S,
        l1: &Layout,
        s2: &S,
        l2: &Layout,
    ) -> Result<(S, Shape)> {
        Ok((self.0.fwd(s1, l1, s2, l2)?, l1.shape().clone()))
    }
}

impl CustomOp2 for Binary {
    fn name(&self) -> &'static str {
        match self.0 {
            BinaryKind::Add => "guarded-add",
            BinaryKind::Sub => "guarded-sub",
            BinaryKind::Mul => "guarded-mul",
            BinaryKind::Div => "guarded-div",
        }
    }

    storage_fwd!(s1 l1, s2 l2);

    /// candle's formulas (`backprop.rs`), each side only when it needs a gradient. Where candle subtracts a
    /// term from the accumulated gradient, the term is returned negated (`0 − r` and `0 + (−r)` are the same
    /// IEEE value).
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (ga, gb) = (needs_grad(a), needs_grad(b));
        Ok(match self.0 {
            BinaryKind::Add => (ga.then(|| grad.clone()), gb.then(|| grad.clone())),
            BinaryKind::Sub => (
                ga.then(|| grad.clone()),
                if gb { Some(grad.neg()?) } else { None },
            ),
            BinaryKind::Mul => (
                if ga { Some(grad.mul(b)?) } else { None },
                if gb { Some(grad.mul(a)?) } else { None },
            ),
            BinaryKind::Div => (
                if ga { Some(grad.div(b)?) } else { None },
                if gb {
                    Some(grad.mul(a)?.div(&b.sqr()?)?.neg()?)
                } else {
                    None
                },
            ),
        })
    }
}

fn binary(kind: BinaryKind, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !one_sided(a, b) || a.shape() != b.shape() || a.elem_count() == 0 {
        // candle's op (also for its shape and dtype errors).
        return kind.candle(a, b);
    }
    a.apply_op2_arc(b, std::sync::Arc::new(Box::new(Binary(kind))))
}

fn broadcast(kind: BinaryKind, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let shape = a
        .shape()
        .broadcast_shape_binary_op(b.shape(), "broadcast")?;
    let a = if a.shape() != &shape {
        a.broadcast_as(&shape)?
    } else {
        a.clone()
    };
    let b = if b.shape() != &shape {
        b.broadcast_as(&shape)?
    } else {
        b.clone()
    };
    binary(kind, &a, &b)
}

/// `a + b` (same shape).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(BinaryKind::Add, a, b)
}

/// `a − b` (same shape).
pub fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(BinaryKind::Sub, a, b)
}

/// `a · b` (same shape).
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(BinaryKind::Mul, a, b)
}

/// `a / b` (same shape).
pub fn div(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(BinaryKind::Div, a, b)
}

/// `a + b` with broadcasting, as `Tensor::broadcast_add`.
pub fn broadcast_add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    broadcast(BinaryKind::Add, a, b)
}

/// `a − b` with broadcasting, as `Tensor::broadcast_sub`.
pub fn broadcast_sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    broadcast(BinaryKind::Sub, a, b)
}

/// `a · b` with broadcasting, as `Tensor::broadcast_mul`.
pub fn broadcast_mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    broadcast(BinaryKind::Mul, a, b)
}

/// `a / b` with broadcasting, as `Tensor::broadcast_div`.
pub fn broadcast_div(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    broadcast(BinaryKind::Div, a, b)
}

/// Batched matrix product on `[.., m, k] × [.., k, n]` operands with equal batch dimensions.
struct Matmul;

impl Matmul {
    fn dims(l1: &Layout, l2: &Layout) -> Result<((usize, usize, usize, usize), Shape)> {
        let (a, b) = (l1.dims(), l2.dims());
        let r = a.len();
        if r < 2 || b.len() != r {
            candle_core::bail!("matmul: ranks {a:?} and {b:?}");
        }
        let (m, k, k2, n) = (a[r - 2], a[r - 1], b[r - 2], b[r - 1]);
        let batch: usize = a[..r - 2].iter().product();
        let batch_b: usize = b[..r - 2].iter().product();
        if k != k2 || batch != batch_b {
            candle_core::bail!("matmul: shapes {a:?} and {b:?} do not match");
        }
        Ok(((batch, m, n, k), Shape::from(&a[..r - 2]).extend(&[m, n])))
    }

    fn fwd<S: BackendStorage>(
        &self,
        s1: &S,
        l1: &Layout,
        s2: &S,
        l2: &Layout,
    ) -> Result<(S, Shape)> {
        let (bmnk, shape) = Self::dims(l1, l2)?;
        Ok((s1.matmul(s2, bmnk, l1, l2)?, shape))
    }
}

impl CustomOp2 for Matmul {
    fn name(&self) -> &'static str {
        "guarded-matmul"
    }

    storage_fwd!(s1 l1, s2 l2);

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((
            if needs_grad(a) {
                Some(grad.matmul(&b.t()?)?)
            } else {
                None
            },
            if needs_grad(b) {
                Some(a.t()?.matmul(grad)?)
            } else {
                None
            },
        ))
    }
}

/// `a @ b`, as `Tensor::matmul` (same kernel, same result), the gradient only for the operands that need one.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let empty = a.elem_count() == 0 || b.elem_count() == 0;
    if !one_sided(a, b) || empty || a.rank() < 2 || a.rank() != b.rank() {
        return a.matmul(b);
    }
    a.apply_op2_arc(b, std::sync::Arc::new(Box::new(Matmul)))
}

/// A value computed before its op was applied, handed over as the op's output storage (once).
struct HandOver(Mutex<Option<Tensor>>);

impl HandOver {
    fn new(value: Tensor) -> Self {
        HandOver(Mutex::new(Some(value)))
    }

    fn take(&self, op: &str) -> Result<Tensor> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{op}: poisoned lock")))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{op}: applied twice")))
    }

    fn cpu(&self, op: &str) -> Result<(CpuStorage, Shape)> {
        let y = self.take(op)?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("{op}: the value is not on the CPU"),
        }
    }

    fn cuda(&self, op: &str) -> Result<(CudaStorage, Shape)> {
        let y = self.take(op)?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("{op}: the value is not on the GPU"),
        }
    }
}

/// Which operand of a convolution gets the gradient.
#[derive(Clone, Copy)]
enum ConvSide {
    /// The input (the kernel is frozen).
    Input,
    /// The kernel (the input is frozen: a LoRA `A` on an activation that carries no gradient).
    Kernel,
}

/// `x @ w + b` (`b` as a broadcast view of the output's shape): a linear layer with its bias, without the
/// product before the bias in the graph.
struct MatmulBias;

impl MatmulBias {
    #[allow(clippy::too_many_arguments)]
    fn fwd<S: BackendStorage>(
        &self,
        s1: &S,
        l1: &Layout,
        s2: &S,
        l2: &Layout,
        s3: &S,
        l3: &Layout,
    ) -> Result<(S, Shape)> {
        let (bmnk, shape) = Matmul::dims(l1, l2)?;
        let m = s1.matmul(s2, bmnk, l1, l2)?;
        let out =
            m.binary_impl::<candle_core::op::Add>(s3, &Layout::contiguous(shape.clone()), l3)?;
        Ok((out, shape))
    }
}

impl candle_core::CustomOp3 for MatmulBias {
    fn name(&self) -> &'static str {
        "matmul-bias"
    }

    storage_fwd!(s1 l1, s2 l2, s3 l3);

    /// candle's: the sum passes `g` to both sides, the product's two formulas take it on.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((
            if needs_grad(x) {
                Some(grad.matmul(&w.t()?)?)
            } else {
                None
            },
            if needs_grad(w) {
                Some(x.t()?.matmul(grad)?)
            } else {
                None
            },
            needs_grad(b).then(|| grad.clone()),
        ))
    }
}

/// `x @ w + b` with `b` broadcast to the product's shape (a linear layer's bias): the values and gradients of
/// `broadcast_add(matmul(x, w), b)`, keeping no pre-bias product in the graph.
pub fn matmul_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let tracked = needs_grad(x) || needs_grad(w) || needs_grad(b);
    if !tracked
        || x.rank() < 2
        || x.rank() != w.rank()
        || x.elem_count() == 0
        || w.elem_count() == 0
    {
        return broadcast_add(&matmul(x, w)?, b);
    }
    let (_, shape) = Matmul::dims(x.layout(), w.layout())?;
    let b = b.broadcast_as(shape)?;
    x.apply_op3_arc(w, &b, std::sync::Arc::new(Box::new(MatmulBias)))
}

/// Attaches the gradient of a convolution to one operand: the forward value was computed by candle's `conv2d`
/// on detached operands (candle's kernel, so the same output); this op hands that value over and, backwards,
/// gives its operand candle's gradient (`conv_transpose2d` with the kernel for the input; the input-gradient
/// convolution for the kernel) and the other operand none.
struct OneSidedConv {
    value: HandOver,
    /// The operand that gets no gradient.
    other: Tensor,
    side: ConvSide,
    padding: usize,
    stride: usize,
    dilation: usize,
}

impl CustomOp1 for OneSidedConv {
    fn name(&self) -> &'static str {
        "one-sided-conv2d"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.value.cpu("one-sided conv")
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.value.cuda("one-sided conv")
    }

    /// candle's two formulas (`backprop.rs`, `Op::Conv2D`), one of them.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (p, s, d) = (self.padding, self.stride, self.dilation);
        Ok(Some(match self.side {
            ConvSide::Input => {
                let kernel = &self.other;
                let k_h = kernel.dim(2)?;
                let out_size = (grad.dim(2)? - 1) * s + d * (k_h - 1) + 1 - 2 * p;
                let out_padding = arg.dim(2)? - out_size;
                grad.conv_transpose2d(kernel, p, out_padding, s, d)?
            }
            ConvSide::Kernel => {
                let input = &self.other;
                let g = input
                    .transpose(0, 1)?
                    .conv2d(&grad.transpose(0, 1)?, p, d, s, 1)?
                    .transpose(0, 1)?;
                let (_, _, k0, k1) = arg.dims4()?;
                let (_, _, g0, g1) = g.dims4()?;
                if g0 != k0 || g1 != k1 {
                    g.narrow(2, 0, k0)?.narrow(3, 0, k1)?
                } else {
                    g
                }
            }
        }))
    }
}

/// `x.conv2d(w, padding, stride, dilation, 1)`; when only one of the input and the kernel needs a gradient,
/// the other's is neither computed nor stored.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    if !one_sided(x, w) {
        return x.conv2d(w, padding, stride, dilation, 1);
    }
    // A fresh, contiguous output (candle's conv2d allocates one), so the storage handed over is exactly it.
    let y = x
        .detach()
        .conv2d(&w.detach(), padding, stride, dilation, 1)?
        .contiguous()?;
    let (arg, other, side) = if needs_grad(x) {
        (x, w, ConvSide::Input)
    } else {
        (w, x, ConvSide::Kernel)
    };
    let op = OneSidedConv {
        value: HandOver::new(y),
        other: other.detach(),
        side,
        padding,
        stride,
        dilation,
    };
    arg.apply_op1_arc(std::sync::Arc::new(Box::new(op)))
}

/// Softmax over the last dimension of `scale · x`, `exp(z − max) / Σ exp(z − max)` (the max shift carries no
/// gradient); `scale = None` is the plain softmax of `x`.
struct SoftmaxLast {
    scale: Option<f64>,
}

impl SoftmaxLast {
    /// The composite's storage calls, in its order: (scale,) max, shift, exp, sum, divide.
    fn fwd<S: BackendStorage>(&self, s: &S, l: &Layout) -> Result<(S, Shape)> {
        match self.scale {
            None => Self::softmax(s, l),
            Some(k) => {
                let z = s.affine(l, k, 0.0)?;
                Self::softmax(&z, &Layout::contiguous(l.shape().clone()))
            }
        }
    }

    fn softmax<S: BackendStorage>(s: &S, l: &Layout) -> Result<(S, Shape)> {
        let dims = l.dims().to_vec();
        let last = dims.len() - 1;
        let mut reduced = dims.clone();
        reduced[last] = 1;
        let bcast = Layout::contiguous(reduced).broadcast_as(dims.clone())?;
        let full = Layout::contiguous(dims.clone());
        let max = s.reduce_op(ReduceOp::Max, l, &[last])?;
        let shifted = s.binary_impl::<candle_core::op::Sub>(&max, l, &bcast)?;
        let e = shifted.unary_impl::<candle_core::op::Exp>(&full)?;
        let sum = e.reduce_op(ReduceOp::Sum, &full, &[last])?;
        let out = e.binary_impl::<candle_core::op::Div>(&sum, &full, &bcast)?;
        Ok((out, Shape::from(dims)))
    }
}

impl CustomOp1 for SoftmaxLast {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    storage_fwd!(s l);

    /// The gradient candle's backward gives the composite `e / Σe` (`e = exp(z − max)`, `z = scale · x`), step
    /// for step: the division's two gradients, the broadcast's sum, the sum's broadcast back, the exponential's
    /// product, and the scaling's `g · scale`.
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let x = match self.scale {
            None => x.detach(),
            Some(k) => (x.detach() * k)?,
        };
        let max = x.max_keepdim(D::Minus1)?;
        let e = x.broadcast_sub(&max)?.exp()?;
        let s = e.sum_keepdim(D::Minus1)?;
        let sb = s.broadcast_as(e.shape())?;
        let last = e.rank() - 1;
        let g_e = grad.div(&sb)?;
        // `0 − r`, exactly as candle's `zeros.sub(r)` (signed zeros included).
        let g_sb = grad.mul(&e)?.div(&sb.sqr()?)?.affine(-1.0, 0.0)?;
        let g_s = g_sb.sum_keepdim(&[last][..])?;
        let g_e = g_e.add(&g_s.broadcast_as(e.shape())?)?;
        let g_z = g_e.mul(&e)?;
        Ok(Some(match self.scale {
            None => g_z,
            Some(k) => g_z.affine(k, 0.0)?,
        }))
    }
}

/// Softmax over the last dimension from differentiable primitives' kernels; the graph keeps only the input and
/// the output.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    softmax(x, None)
}

/// `softmax_last(x * scale)` (attention's `QKᵀ/√d`): the same values and gradient, without the scaled scores in
/// the graph.
pub fn softmax_last_scaled(x: &Tensor, scale: f64) -> Result<Tensor> {
    softmax(x, Some(scale))
}

fn softmax(x: &Tensor, scale: Option<f64>) -> Result<Tensor> {
    if !needs_grad(x) || x.rank() == 0 || x.elem_count() == 0 {
        let x = match scale {
            None => x.clone(),
            Some(k) => (x * k)?,
        };
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        let s = e.sum_keepdim(D::Minus1)?;
        return e.broadcast_div(&s);
    }
    x.apply_op1_arc(std::sync::Arc::new(Box::new(SoftmaxLast { scale })))
}

/// A block's function of its input, recomputed with graph in the backward pass.
type BlockFn = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

thread_local! {
    /// Gradients found by recomputed blocks for tensors other than their input (the trainable weights inside
    /// them), merged into the store by [`backward`].
    static PENDING: std::cell::RefCell<Vec<GradStore>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Gradient checkpointing of one block: the forward keeps only the block's input and output, and the backward
/// runs the block again with graph, backpropagates the output's gradient through it, returns the input's
/// gradient and leaves the gradients of the weights inside for [`backward`] to merge.
struct Checkpoint {
    value: HandOver,
    /// The block's input (detached).
    input: Tensor,
    input_needs_grad: bool,
    f: BlockFn,
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.value.cpu("checkpoint")
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.value.cuda("checkpoint")
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let xv = if self.input_needs_grad {
            Some(candle_core::Var::from_tensor(&self.input)?)
        } else {
            None
        };
        let x = xv
            .as_ref()
            .map(|v| v.as_tensor().clone())
            .unwrap_or_else(|| self.input.clone());
        let y = (self.f)(&x)?;
        // Σ y · g has gradient exactly g at y.
        let mut store = mul(&y, &grad.detach())?.sum_all()?.backward()?;
        let gx = match &xv {
            Some(v) => store.remove(v.as_tensor()),
            None => None,
        };
        PENDING.with(|p| p.borrow_mut().push(store));
        Ok(gx)
    }
}

/// `f(x)` with gradient checkpointing (diffusers' `gradient_checkpointing`): the graph inside `f` is not kept;
/// the backward pass recomputes it (about one more forward of the block). Gradients of the trainable tensors
/// inside `f` reach the store only through [`backward`], so a pass over checkpointed blocks must use it
/// instead of `Tensor::backward`. When nothing in `f(x)` needs a gradient, this is `f(x)`.
pub fn checkpoint<F>(x: &Tensor, f: F) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    let input = x.detach();
    let y = f(&input)?;
    let input_needs_grad = needs_grad(x);
    if !input_needs_grad && !needs_grad(&y) {
        return Ok(y);
    }
    // The value, without the graph that computed it (freed when `y` goes).
    let value = y.detach();
    drop(y);
    let op = Checkpoint {
        value: HandOver::new(value),
        input,
        input_needs_grad,
        f: Box::new(f),
    };
    // The op needs a tracked argument to be part of the graph: the input when it has a gradient, otherwise a
    // scalar anchor (its gradient is not computed).
    let arg = if input_needs_grad {
        x.clone()
    } else {
        candle_core::Var::zeros((), x.dtype(), x.device())?.into_inner()
    };
    arg.apply_op1_arc(std::sync::Arc::new(Box::new(op)))
}

/// `loss.backward()` plus the gradients that checkpointed blocks ([`checkpoint`]) found for the trainable
/// tensors inside them.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    PENDING.with(|p| p.borrow_mut().clear());
    let result = loss.backward();
    let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    let mut store = result?;
    for s in pending {
        store.extend(s)?;
    }
    Ok(store)
}

/// `Σ x²` over the last dimension (kept as size 1), as `x.sqr().sum_keepdim(D::Minus1)` without keeping the
/// squares in the graph.
struct SumSqrLast;

impl SumSqrLast {
    fn fwd<S: BackendStorage>(&self, s: &S, l: &Layout) -> Result<(S, Shape)> {
        let dims = l.dims().to_vec();
        let last = dims.len() - 1;
        let sq = s.unary_impl::<candle_core::op::Sqr>(l)?;
        let sum = sq.reduce_op(ReduceOp::Sum, &Layout::contiguous(dims.clone()), &[last])?;
        let mut out = dims;
        out[last] = 1;
        Ok((sum, Shape::from(out)))
    }
}

impl CustomOp1 for SumSqrLast {
    fn name(&self) -> &'static str {
        "sum-sqr-last-dim"
    }

    storage_fwd!(s l);

    /// candle's: the sum's gradient broadcast back, then the square's `2 · x · g`.
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.broadcast_as(x.shape())?;
        Ok(Some(x.mul(&g)?.affine(2.0, 0.0)?))
    }
}

/// `Σ x²` over the last dimension, keepdim (the variance of a norm): the same values and gradient as
/// `x.sqr()?.sum_keepdim(D::Minus1)`, without an activation-sized square in the graph.
pub fn sum_sqr_last(x: &Tensor) -> Result<Tensor> {
    if !needs_grad(x) || x.rank() == 0 || x.elem_count() == 0 {
        return x.sqr()?.sum_keepdim(D::Minus1);
    }
    x.apply_op1_arc(std::sync::Arc::new(Box::new(SumSqrLast)))
}

/// `y · w + b` on same-shape operands (`w`, `b` arrive as broadcast views): a norm's affine, without the
/// product in the graph.
struct ScaleShift;

impl ScaleShift {
    fn fwd<S: BackendStorage>(
        &self,
        s1: &S,
        l1: &Layout,
        s2: &S,
        l2: &Layout,
        s3: &S,
        l3: &Layout,
    ) -> Result<(S, Shape)> {
        let m = s1.binary_impl::<candle_core::op::Mul>(s2, l1, l2)?;
        let out =
            m.binary_impl::<candle_core::op::Add>(s3, &Layout::contiguous(l1.shape().clone()), l3)?;
        Ok((out, l1.shape().clone()))
    }
}

impl candle_core::CustomOp3 for ScaleShift {
    fn name(&self) -> &'static str {
        "scale-shift"
    }

    storage_fwd!(s1 l1, s2 l2, s3 l3);

    /// candle's formulas for the sum then the product, each operand only when it needs a gradient.
    fn bwd(
        &self,
        y: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((
            if needs_grad(y) {
                Some(grad.mul(w)?)
            } else {
                None
            },
            if needs_grad(w) {
                Some(grad.mul(y)?)
            } else {
                None
            },
            needs_grad(b).then(|| grad.clone()),
        ))
    }
}

/// `y · w + b` with `w` and `b` broadcast to `y` (a norm's scale and shift): the values and gradients of
/// `broadcast_add(broadcast_mul(y, w), b)`, keeping no product in the graph.
pub fn scale_shift(y: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !(needs_grad(y) || needs_grad(w) || needs_grad(b)) || y.elem_count() == 0 {
        return broadcast_add(&broadcast_mul(y, w)?, b);
    }
    let shape = y.shape();
    let w = w.broadcast_as(shape)?;
    let b = b.broadcast_as(shape)?;
    y.apply_op3_arc(&w, &b, std::sync::Arc::new(Box::new(ScaleShift)))
}
