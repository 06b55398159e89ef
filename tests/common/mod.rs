//! Helpers shared by the training tests (`mod common;`).
// Each test binary uses a part of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The shipped assets (the shapes world).
pub fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets")
}

/// `prompts` as `dir/prompts.txt`, one per line.
pub fn write_prompts(dir: &Path, prompts: &[&str]) -> PathBuf {
    let p = dir.join("prompts.txt");
    std::fs::write(&p, prompts.join("\n") + "\n").unwrap();
    p
}

/// Pairs whose chosen image has a red square and whose rejected image has a blue one.
pub fn make_pairs(dir: &Path, n: usize) -> PathBuf {
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut lines = Vec::new();
    for i in 0..n {
        let (x0, y0) = ((i * 5) % 16, (i * 3) % 16);
        let draw = |c: [u8; 3]| {
            image::RgbImage::from_fn(32, 32, |x, y| {
                let inside = (x0 as u32..x0 as u32 + 14).contains(&x)
                    && (y0 as u32..y0 as u32 + 14).contains(&y);
                image::Rgb(if inside { c } else { [235, 235, 235] })
            })
        };
        draw([220, 30, 30])
            .save(dir.join(format!("img/{i}-w.png")))
            .unwrap();
        draw([30, 30, 220])
            .save(dir.join(format!("img/{i}-l.png")))
            .unwrap();
        lines.push(format!(r#"{{"prompt": "a red square", "chosen": "img/{i}-w.png", "rejected": "img/{i}-l.png"}}"#));
    }
    let m = dir.join("pairs.jsonl");
    std::fs::write(&m, lines.join("\n") + "\n").unwrap();
    m
}
