//! Library use: GRPO with a LoRA on the embedded shapes-world model for a few rounds, the exact shapes reward as
//! the training reward and as the judge on two training prompts (same noise before and after).
//!
//! `cargo run --release --example train_grpo`

use diffpref::methods::grpo::{train, GrpoConfig};
use std::path::Path;

fn main() -> anyhow::Result<()> {
    let dir = Path::new("out/example-grpo");
    std::fs::create_dir_all(dir)?;
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "a red circle\na blue square\n")?;
    let mut cfg = GrpoConfig::default();
    cfg.run.model = "assets/tiny-shapes".into();
    cfg.run.output_dir = Some(dir.join("run"));
    cfg.run.resume = false;
    cfg.run.optim.lr = 1e-3;
    cfg.run.optim.batch_size = 8;
    cfg.run.optim.max_steps = 8;
    cfg.grpo.prompts = Some(prompts.clone());
    cfg.grpo.prompts_per_round = 2;
    cfg.grpo.group_size = 4;
    cfg.grpo.train_timesteps = 4;
    cfg.rollout.steps = 10;
    cfg.run.eval.prompts = Some(prompts);
    cfg.run.eval.samples = 8;
    cfg.run.eval.steps = 10;
    let _ = std::fs::remove_dir_all(cfg.output_dir());
    let s = train(&cfg, None)?;
    println!("trained LoRA: {}", s.weights.display());
    if let Some(e) = &s.eval {
        let c = &e.comparison;
        println!(
            "shapes reward on the training prompts: {:.4} -> {:.4} (change {:+.4} ± {:.4})",
            c.base.reward.mean, c.model.reward.mean, c.difference.mean, c.difference.ci95
        );
    }
    println!(
        "{} reward calls, {:.0} s",
        s.last_metric("reward_calls").unwrap_or(0.0),
        s.seconds
    );
    Ok(())
}
