//! The guarded ops of `diffpref_pipelines::autograd` against candle's own: the same outputs and the same
//! gradients for the operands that need one, bit for bit, and no gradient (no stored tensor) for the ones that
//! do not.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use diffpref_pipelines::autograd;

fn randn(seed: u64, shape: &[usize]) -> Tensor {
    // A seeded LCG (candle's randn is not seedable on the CPU).
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// `Σ out · r` for a fixed random `r`, so every output element gets a distinct gradient (the product guarded:
/// `r` gets no stored gradient, so a store holds exactly the variables' and any waste of the op under test).
fn loss(out: &Tensor) -> Tensor {
    let r = randn(99, out.dims());
    autograd::mul(out, &r).unwrap().sum_all().unwrap()
}

fn entries(g: &GradStore) -> usize {
    g.get_ids().count()
}

/// Runs `candle_op` and `guarded_op` on (a, b) with exactly one of them a variable, and checks outputs and
/// that variable's gradient bit for bit, and that the guarded op's store holds the variable's gradient only
/// (candle's op also stores one for the frozen operand, or its transposed / broadcast view).
fn check_pair(
    name: &str,
    a_shape: &[usize],
    b_shape: &[usize],
    candle_op: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    guarded_op: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) {
    for var_side in 0..2 {
        let a0 = randn(1, a_shape);
        let b0 = (randn(2, b_shape).abs().unwrap() + 0.5).unwrap(); // safe divisor
        let (a, b, v) = if var_side == 0 {
            let v = Var::from_tensor(&a0).unwrap();
            (v.as_tensor().clone(), b0.clone(), v)
        } else {
            let v = Var::from_tensor(&b0).unwrap();
            (a0.clone(), v.as_tensor().clone(), v)
        };
        // A frozen operand that is itself a computed (but untracked) tensor, as a transposed or broadcast
        // weight is.
        let (a, b) = if var_side == 0 {
            (a, (b * 1.0).unwrap())
        } else {
            ((a * 1.0).unwrap(), b)
        };
        let want = candle_op(&a, &b).unwrap();
        let got = guarded_op(&a, &b).unwrap();
        assert_eq!(bits(&want), bits(&got), "{name}: forward differs");
        let gw: GradStore = loss(&want).backward().unwrap();
        let gg: GradStore = loss(&got).backward().unwrap();
        let (x, y) = (
            gw.get(v.as_tensor()).unwrap(),
            gg.get(v.as_tensor()).unwrap(),
        );
        assert_eq!(
            bits(x),
            bits(y),
            "{name}: gradient of operand {var_side} differs"
        );
        assert_eq!(entries(&gw), 2, "{name}: candle's op (test setup)");
        assert_eq!(
            entries(&gg),
            1,
            "{name}: a gradient was stored for the frozen operand"
        );
    }
}

#[test]
fn binary_ops_match_candle_and_skip_frozen_operands() {
    let same = [3usize, 5, 7];
    check_pair("add", &same, &same, |a, b| a.add(b), autograd::add);
    check_pair("sub", &same, &same, |a, b| a.sub(b), autograd::sub);
    check_pair("mul", &same, &same, |a, b| a.mul(b), autograd::mul);
    check_pair("div", &same, &same, |a, b| a.div(b), autograd::div);
    // Broadcasting on either side (a bias, a norm's scale, a time embedding).
    for (sa, sb) in [
        (vec![3usize, 5, 7], vec![7usize]),
        (vec![2, 4, 3, 3], vec![1, 4, 1, 1]),
        (vec![1, 5, 1], vec![3, 5, 7]),
    ] {
        check_pair(
            "broadcast_add",
            &sa,
            &sb,
            |a, b| a.broadcast_add(b),
            autograd::broadcast_add,
        );
        check_pair(
            "broadcast_sub",
            &sa,
            &sb,
            |a, b| a.broadcast_sub(b),
            autograd::broadcast_sub,
        );
        check_pair(
            "broadcast_mul",
            &sa,
            &sb,
            |a, b| a.broadcast_mul(b),
            autograd::broadcast_mul,
        );
        check_pair(
            "broadcast_div",
            &sa,
            &sb,
            |a, b| a.broadcast_div(b),
            autograd::broadcast_div,
        );
    }
}

#[test]
fn matmul_matches_candle_and_skips_frozen_operands() {
    check_pair(
        "matmul 2d",
        &[6, 5],
        &[5, 4],
        |a, b| a.matmul(b),
        autograd::matmul,
    );
    check_pair(
        "matmul 3d",
        &[2, 6, 5],
        &[2, 5, 4],
        |a, b| a.matmul(b),
        autograd::matmul,
    );
    // A transposed weight, as `linear` passes it.
    check_pair(
        "matmul x wT",
        &[6, 5],
        &[4, 5],
        |a, b| a.matmul(&b.t()?),
        |a, b| autograd::matmul(a, &b.t()?),
    );
}

#[test]
fn both_or_neither_tracked_falls_back_to_candle() {
    let a = Var::from_tensor(&randn(1, &[4, 3])).unwrap();
    let b = Var::from_tensor(&randn(2, &[3, 2])).unwrap();
    let want = loss(&a.as_tensor().matmul(b.as_tensor()).unwrap())
        .backward()
        .unwrap();
    let got = loss(&autograd::matmul(a.as_tensor(), b.as_tensor()).unwrap())
        .backward()
        .unwrap();
    for v in [&a, &b] {
        assert_eq!(
            bits(want.get(v.as_tensor()).unwrap()),
            bits(got.get(v.as_tensor()).unwrap())
        );
    }
    let c = autograd::add(&randn(3, &[2, 2]), &randn(4, &[2, 2])).unwrap();
    assert!(!autograd::needs_grad(&c));
    // Shape errors are candle's.
    assert!(autograd::add(&randn(3, &[2, 2]), &randn(4, &[2, 3])).is_err());
    assert!(autograd::matmul(&randn(3, &[2, 2]), &randn(4, &[3, 2])).is_err());
}

#[test]
fn conv2d_with_a_frozen_kernel_matches_candle() {
    for (padding, stride) in [(1usize, 1usize), (1, 2), (0, 1)] {
        let x = Var::from_tensor(&randn(5, &[2, 3, 9, 9])).unwrap();
        let w = (randn(6, &[4, 3, 3, 3]) * 1.0).unwrap();
        let want = x.as_tensor().conv2d(&w, padding, stride, 1, 1).unwrap();
        let got = autograd::conv2d(x.as_tensor(), &w, padding, stride, 1).unwrap();
        assert_eq!(bits(&want), bits(&got), "forward p{padding} s{stride}");
        let gw = loss(&want).backward().unwrap();
        let gg = loss(&got).backward().unwrap();
        assert_eq!(
            bits(gw.get(x.as_tensor()).unwrap()),
            bits(gg.get(x.as_tensor()).unwrap()),
            "input gradient p{padding} s{stride}"
        );
        assert!(gw.get(&w).is_some());
        assert_eq!(entries(&gg), 1, "a kernel gradient was stored");
    }
    // A trainable kernel on an input that needs no gradient (a LoRA `A` on a frozen activation).
    for (padding, stride) in [(1usize, 1usize), (1, 2), (0, 1)] {
        let x = (randn(5, &[2, 3, 9, 9]) * 1.0).unwrap();
        let w = Var::from_tensor(&randn(6, &[4, 3, 3, 3])).unwrap();
        let want = x.conv2d(w.as_tensor(), padding, stride, 1, 1).unwrap();
        let got = autograd::conv2d(&x, w.as_tensor(), padding, stride, 1).unwrap();
        assert_eq!(bits(&want), bits(&got), "forward p{padding} s{stride}");
        let gw = loss(&want).backward().unwrap();
        let gg = loss(&got).backward().unwrap();
        assert_eq!(
            bits(gw.get(w.as_tensor()).unwrap()),
            bits(gg.get(w.as_tensor()).unwrap()),
            "kernel gradient p{padding} s{stride}"
        );
        assert_eq!(entries(&gw), 2);
        assert_eq!(entries(&gg), 1, "an input gradient was stored");
    }
}

/// The composite softmax the guarded op replaces.
fn composite_softmax(x: &Tensor) -> Tensor {
    let max = x.max_keepdim(D::Minus1).unwrap().detach();
    let e = x.broadcast_sub(&max).unwrap().exp().unwrap();
    let s = e.sum_keepdim(D::Minus1).unwrap();
    e.broadcast_div(&s).unwrap()
}

#[test]
fn softmax_matches_the_composite_bit_for_bit() {
    for shape in [vec![7usize], vec![3, 5, 11], vec![2, 2, 9, 9]] {
        let x0 = (randn(7, &shape) * 3.0).unwrap();
        let x = Var::from_tensor(&x0).unwrap();
        // Scaled scores, as attention feeds it (the input is a computed tensor).
        let xs = (x.as_tensor() * 0.7).unwrap();
        let want = composite_softmax(&xs);
        let got = autograd::softmax_last(&xs).unwrap();
        assert_eq!(bits(&want), bits(&got), "forward {shape:?}");
        let gw = loss(&want).backward().unwrap();
        let gg = loss(&got).backward().unwrap();
        assert_eq!(
            bits(gw.get(x.as_tensor()).unwrap()),
            bits(gg.get(x.as_tensor()).unwrap()),
            "gradient {shape:?}"
        );
        // Rows sum to one and the gradient of Σ softmax is zero up to rounding.
        let rows = got.sum_keepdim(D::Minus1).unwrap();
        for r in rows.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
            assert!((r - 1.0).abs() < 1e-5);
        }
    }
    // Untracked input: plain values, no graph.
    let x = randn(8, &[4, 6]);
    let y = autograd::softmax_last(&x).unwrap();
    assert_eq!(bits(&y), bits(&composite_softmax(&x)));
    assert!(!autograd::needs_grad(&y));
}

/// The composite norms the fused pieces replace (statistics over the last dimension, then `y · w + b`).
fn composite_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
    let mean = x.mean_keepdim(D::Minus1).unwrap();
    let xc = x.broadcast_sub(&mean).unwrap();
    let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let y = xc
        .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
        .unwrap();
    autograd::broadcast_add(&autograd::broadcast_mul(&y, w).unwrap(), b).unwrap()
}

#[test]
fn layer_and_group_norms_match_the_composite_bit_for_bit() {
    use candle_core::Module;
    use diffpref_pipelines::nn::{GroupNorm, LayerNorm};
    // The input also feeds a residual, so its gradient is accumulated from two consumers, as in the UNet.
    let check = |name: &str,
                 x0: Tensor,
                 norm: &dyn Fn(&Tensor) -> Tensor,
                 reference: &dyn Fn(&Tensor) -> Tensor| {
        let x = Var::from_tensor(&x0).unwrap();
        let xs = (x.as_tensor() * 1.5).unwrap();
        let run = |f: &dyn Fn(&Tensor) -> Tensor| {
            let out = f(&xs);
            let l = (loss(&out) + loss(&(&xs * 0.25).unwrap())).unwrap();
            (out, l.backward().unwrap())
        };
        let (want, gw) = run(reference);
        let (got, gg) = run(norm);
        assert_eq!(bits(&want), bits(&got), "{name}: forward");
        assert_eq!(
            bits(gw.get(x.as_tensor()).unwrap()),
            bits(gg.get(x.as_tensor()).unwrap()),
            "{name}: gradient"
        );
        assert!(entries(&gg) <= entries(&gw));
    };
    let (c, eps) = (8usize, 1e-5);
    let w = (randn(11, &[c]) * 1.0).unwrap();
    let b = (randn(12, &[c]) * 1.0).unwrap();
    let ln = LayerNorm {
        weight: w.clone(),
        bias: b.clone(),
        eps,
    };
    check(
        "layer norm",
        randn(13, &[2, 5, c]),
        &|x| ln.forward(x).unwrap(),
        &|x| composite_norm(x, &w, &b, eps),
    );
    let groups = 4;
    let gn = GroupNorm {
        weight: w.clone(),
        bias: b.clone(),
        groups,
        eps,
    };
    let (wr, br) = (
        w.reshape((1, c, 1, 1)).unwrap(),
        b.reshape((1, c, 1, 1)).unwrap(),
    );
    check(
        "group norm",
        randn(14, &[2, c, 3, 3]),
        &|x| gn.forward(x).unwrap(),
        &|x| {
            let (bn, _, h, wd) = x.dims4().unwrap();
            let xg = x.reshape((bn, groups, ())).unwrap();
            let mean = xg.mean_keepdim(D::Minus1).unwrap();
            let xc = xg.broadcast_sub(&mean).unwrap();
            let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let y = xc
                .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
                .unwrap()
                .reshape((bn, c, h, wd))
                .unwrap();
            autograd::broadcast_add(&autograd::broadcast_mul(&y, &wr).unwrap(), &br).unwrap()
        },
    );
    // Trainable scale and shift (full fine-tuning) get candle's gradients too.
    let wv = Var::from_tensor(&w).unwrap();
    let bv = Var::from_tensor(&b).unwrap();
    let y = (randn(15, &[2, 5, c]) * 1.0).unwrap();
    let gw = loss(
        &autograd::broadcast_add(
            &autograd::broadcast_mul(&y, wv.as_tensor()).unwrap(),
            bv.as_tensor(),
        )
        .unwrap(),
    )
    .backward()
    .unwrap();
    let gg = loss(&autograd::scale_shift(&y, wv.as_tensor(), bv.as_tensor()).unwrap())
        .backward()
        .unwrap();
    for v in [&wv, &bv] {
        assert_eq!(
            bits(gw.get(v.as_tensor()).unwrap()),
            bits(gg.get(v.as_tensor()).unwrap())
        );
    }
}

#[test]
fn fused_bias_and_scaled_softmax_match_the_composites() {
    // x @ wᵀ + b (a linear layer's bias) against matmul then broadcast_add, for each trainable operand.
    for side in 0..3 {
        let x0 = randn(21, &[6, 5]);
        let w0 = randn(22, &[4, 5]);
        let b0 = randn(23, &[4]);
        let vars: Vec<Var> = [&x0, &w0, &b0]
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let pick = |i: usize, t: &Tensor| {
            if i == side {
                vars[i].as_tensor().clone()
            } else {
                (t * 1.0).unwrap()
            }
        };
        let (x, w, b) = (pick(0, &x0), pick(1, &w0), pick(2, &b0));
        let want = autograd::broadcast_add(&x.matmul(&w.t().unwrap()).unwrap(), &b).unwrap();
        let got = autograd::matmul_bias(&x, &w.t().unwrap(), &b).unwrap();
        assert_eq!(bits(&want), bits(&got), "forward, side {side}");
        let gw = loss(&want).backward().unwrap();
        let gg = loss(&got).backward().unwrap();
        let v = vars[side].as_tensor();
        assert_eq!(
            bits(gw.get(v).unwrap()),
            bits(gg.get(v).unwrap()),
            "side {side}"
        );
        assert_eq!(
            entries(&gg),
            1,
            "side {side}: a frozen operand's gradient was stored"
        );
    }
    // softmax(x · k) against the scaled composite.
    let x = Var::from_tensor(&(randn(24, &[2, 3, 7, 7]) * 3.0).unwrap()).unwrap();
    let xs = (x.as_tensor() * 1.0).unwrap();
    let want = composite_softmax(&(&xs * 0.35).unwrap());
    let got = autograd::softmax_last_scaled(&xs, 0.35).unwrap();
    assert_eq!(bits(&want), bits(&got));
    let gw = loss(&want).backward().unwrap();
    let gg = loss(&got).backward().unwrap();
    assert_eq!(
        bits(gw.get(x.as_tensor()).unwrap()),
        bits(gg.get(x.as_tensor()).unwrap())
    );
}
