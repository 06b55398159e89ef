//! Branching: K candidate `x_{t'}` drawn from one `x_t` with the sampler's stochastic step (one UNet forward
//! for the parent, K noises), then sampling continues from a chosen child. SPO and LPO are built on this: at
//! each step the children are scored, a (winner, loser) pair is kept for training, and a child (at random, or
//! the best) continues the trajectory.
//!
//! Every child shares its parent's Gaussian (mean μ_t, std σ_t); child `j` of row `i` is `μ_t,i + σ_t z_ij`
//! with `z_ij` drawn from the caller's [`Rng`] in row-major order (row 0's K children first), so a seed gives
//! the same children on any device.

use super::{guided_output, transition, Conditioning, StepRule, Transition};
use crate::train::rng::Rng;
use anyhow::{ensure, Result};
use candle_core::{IndexOp, Tensor};
use diffpref_pipelines::models::unet::UNet2DConditionModel;
use diffpref_pipelines::schedulers::DdimTransition;

/// The K children of each of B parents at one step.
#[derive(Clone, Debug)]
pub struct Branches {
    /// The step index (into the rule's timesteps).
    pub step: usize,
    /// The parents `x_t`, `[B, C, h, w]` f32.
    pub parent: Tensor,
    /// The children, `[B, K, C, h, w]`.
    pub children: Tensor,
    /// Each child's `log π(child | parent)`, `[B, K]`.
    pub log_probs: Tensor,
    /// The shared Gaussian of each parent: mean `[B, C, h, w]`, std `[B]`.
    pub mean: Tensor,
    pub std: Tensor,
    /// The parents' predicted x̂₀, `[B, C, h, w]`.
    pub pred_x0: Tensor,
}

impl Branches {
    /// Number of children per parent.
    pub fn k(&self) -> Result<usize> {
        Ok(self.children.dim(1)?)
    }

    /// Child `choice[i]` of every row `i`, `[B, C, h, w]`: the state sampling continues from.
    pub fn select(&self, choice: &[usize]) -> Result<Tensor> {
        let b = self.parent.dim(0)?;
        let k = self.k()?;
        ensure!(choice.len() == b, "{} choices for {b} rows", choice.len());
        ensure!(
            choice.iter().all(|&c| c < k),
            "a choice is out of range (K = {k})"
        );
        let rows = choice
            .iter()
            .enumerate()
            .map(|(i, &c)| self.children.i((i, c)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }
}

/// Draws `k` children of every parent `x` (`[B]` rows at step `step`) under `unet` (no graph is kept: call it
/// inside a graph-free scope, or detach).
pub fn branch(
    unet: &UNet2DConditionModel,
    rule: &StepRule,
    cond: &Conditioning,
    x: &Tensor,
    step: usize,
    k: usize,
    rng: &mut Rng,
) -> Result<Branches> {
    ensure!(k >= 1, "branching needs at least one child");
    ensure!(
        rule.is_stochastic(step),
        "step {step} is deterministic: it has no children to branch into"
    );
    let t = Tensor::full(rule.timesteps[step] as f32, x.dim(0)?, x.device())?;
    let eps = guided_output(unet, x, &t, cond, rule.guidance)?.detach();
    branch_from_output(rule, x, &eps, step, k, rng)
}

/// [`branch`] from the parents' guided model output `eps` at the step's timestep, computed by the caller
/// (e.g. kept from scoring the previous step's children).
pub fn branch_from_output(
    rule: &StepRule,
    x: &Tensor,
    eps: &Tensor,
    step: usize,
    k: usize,
    rng: &mut Rng,
) -> Result<Branches> {
    ensure!(k >= 1, "branching needs at least one child");
    ensure!(
        rule.is_stochastic(step),
        "step {step} is deterministic: it has no children to branch into"
    );
    let b = x.dim(0)?;
    let dev = x.device();
    let dims = x.dims().to_vec();
    // z[i][j], row-major.
    let mut zs = Vec::with_capacity(b * k);
    for _ in 0..b * k {
        let mut shape = vec![1];
        shape.extend_from_slice(&dims[1..]);
        zs.push(rng.normal_tensor(&shape, dev)?);
    }
    let steps = vec![step; b];
    let mut children = Vec::with_capacity(k);
    let mut log_probs = Vec::with_capacity(k);
    let mut first: Option<Transition> = None;
    for j in 0..k {
        let z = Tensor::cat(
            &(0..b).map(|i| zs[i * k + j].clone()).collect::<Vec<_>>(),
            0,
        )?;
        let tr = transition(rule, eps, x, &steps, DdimTransition::Noise(&z))?;
        children.push(tr.prev_sample.detach());
        log_probs.push(tr.log_prob.detach());
        if first.is_none() {
            first = Some(tr);
        }
    }
    let first = first.expect("k >= 1");
    Ok(Branches {
        step,
        parent: x.clone(),
        children: Tensor::stack(&children, 1)?,
        log_probs: Tensor::stack(&log_probs, 1)?,
        mean: first.mean.detach(),
        std: first.std.detach(),
        pred_x0: first.pred_x0.detach(),
    })
}
