//! Library use: train a Diffusion-DPO LoRA for a few steps on the tiny test model, then compare the DPO
//! statistics of the base model and the trained LoRA on the training pairs.
//!
//! `cargo run --release --example train_dpo`

use diffpref::methods::pairwise::{evaluate_pairs, train, DpoConfig};
use std::path::Path;

/// A small preference set: the chosen image has a red square, the rejected one a blue square.
fn make_pairs(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir.join("img"))?;
    let mut lines = Vec::new();
    for i in 0..4u32 {
        for (tag, colour) in [("w", [220u8, 30, 30]), ("l", [30, 30, 220])] {
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                let inside = (4 * i..4 * i + 14).contains(&x) && (2 * i..2 * i + 14).contains(&y);
                image::Rgb(if inside { colour } else { [235, 235, 235] })
            });
            img.save(dir.join(format!("img/{i}-{tag}.png")))?;
        }
        lines.push(format!(r#"{{"prompt": "a red square", "chosen": "img/{i}-w.png", "rejected": "img/{i}-l.png"}}"#));
    }
    let manifest = dir.join("pairs.jsonl");
    std::fs::write(&manifest, lines.join("\n"))?;
    Ok(manifest)
}

fn main() -> anyhow::Result<()> {
    let dir = Path::new("out/example-dpo");
    let manifest = make_pairs(dir)?;
    let mut cfg = DpoConfig::default();
    cfg.run.model = "tests/fixtures/tiny-sd".into();
    cfg.run.output_dir = Some(dir.join("run"));
    cfg.run.resume = false;
    cfg.data.manifest = Some(manifest);
    cfg.data.resolution = 32;
    cfg.run.optim.lr = 3e-3;
    cfg.run.optim.batch_size = 2;
    cfg.run.optim.max_steps = 20;
    cfg.run.lora.rank = 4;
    let _ = std::fs::remove_dir_all(cfg.output_dir());
    let summary = train(&cfg, None)?;
    println!("trained LoRA: {}", summary.weights.display());
    let base = evaluate_pairs(&cfg, None, 1, 4)?;
    let tuned = evaluate_pairs(&cfg, Some(&summary.weights), 1, 4)?;
    println!(
        "base:  loss {:.4} implicit acc {:.3}",
        base.loss, base.implicit_acc
    );
    println!(
        "tuned: loss {:.4} implicit acc {:.3}",
        tuned.loss, tuned.implicit_acc
    );
    Ok(())
}
