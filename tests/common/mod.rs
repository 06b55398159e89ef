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

/// Where the cells of a `diffpref grid` image lie. The grid is `imaging::grid` with
/// `GridOptions { scale, ..Default::default() }` (see `src/cli/grid.rs`), whose documented layout has no outer
/// margin: width = x0 + cols·cw + (cols−1)·gap and height = y0 + rows·ch + (rows−1)·gap, where
/// cw × ch = the sample size × scale, gap = `GridOptions::default().cell_gap`, and x0 / y0 is the label column /
/// band plus one gap (0 without labels). The cells are therefore flush with the right and bottom edges, so
/// x0 = width − (cols·cw + (cols−1)·gap) (likewise y0) without measuring the label text, and cell (r, c) is the
/// `cw × ch` rectangle at (x0 + c·(cw + gap), y0 + r·(ch + gap)).
#[derive(Clone, Copy, Debug)]
pub struct GridLayout {
    pub rows: u32,
    pub cols: u32,
    pub cw: u32,
    pub ch: u32,
    pub gap: u32,
    pub x0: u32,
    pub y0: u32,
}

impl GridLayout {
    /// The layout of `img`, a grid of `rows × cols` samples of `sample` = (w, h) pixels upscaled `scale` times.
    /// Checks that the label areas are where they must be (x0, y0 ≥ one gap when labelled) and that every gap
    /// between and before the cells is background: a wrong cell count, size or gap fails here.
    pub fn of(img: &image::RgbImage, rows: u32, cols: u32, sample: (u32, u32), scale: u32) -> Self {
        let opts = diffpref::imaging::GridOptions::default();
        let (cw, ch, gap) = (sample.0 * scale, sample.1 * scale, opts.cell_gap);
        let cells_w = cols * cw + (cols - 1) * gap;
        let cells_h = rows * ch + (rows - 1) * gap;
        assert!(
            img.width() >= cells_w && img.height() >= cells_h,
            "a {}x{} grid cannot hold {rows}x{cols} cells of {cw}x{ch}",
            img.width(),
            img.height()
        );
        let l = GridLayout {
            rows,
            cols,
            cw,
            ch,
            gap,
            x0: img.width() - cells_w,
            y0: img.height() - cells_h,
        };
        // Background between the cells and between the labels and the cells (x from x0 − gap when there is a
        // label column, y likewise).
        let bg = opts.background;
        let is_gap_x =
            |x: u32| x >= l.x0.saturating_sub(gap) && (x < l.x0 || (x - l.x0) % (cw + gap) >= cw);
        let is_gap_y =
            |y: u32| y >= l.y0.saturating_sub(gap) && (y < l.y0 || (y - l.y0) % (ch + gap) >= ch);
        for (x, y, p) in img.enumerate_pixels() {
            let in_cells_x = x >= l.x0.saturating_sub(gap);
            let in_cells_y = y >= l.y0.saturating_sub(gap);
            if (in_cells_y && is_gap_x(x)) || (in_cells_x && is_gap_y(y)) {
                assert_eq!(
                    *p, bg,
                    "pixel ({x}, {y}) lies in a gap of {l:?} but is not background"
                );
            }
        }
        l
    }

    /// The pixels of cell (row `r`, column `c`).
    pub fn cell(&self, img: &image::RgbImage, r: u32, c: u32) -> image::RgbImage {
        assert!(
            r < self.rows && c < self.cols,
            "cell ({r}, {c}) outside {self:?}"
        );
        image::imageops::crop_imm(
            img,
            self.x0 + c * (self.cw + self.gap),
            self.y0 + r * (self.ch + self.gap),
            self.cw,
            self.ch,
        )
        .to_image()
    }
}

/// Nearest-neighbour integer upscaling (what the grid's `--scale` does to each sample).
pub fn upscale(img: &image::RgbImage, s: u32) -> image::RgbImage {
    image::RgbImage::from_fn(img.width() * s, img.height() * s, |x, y| {
        *img.get_pixel(x / s, y / s)
    })
}

/// How many pixels of two equally sized images differ (in any channel).
pub fn differing_pixels(a: &image::RgbImage, b: &image::RgbImage) -> usize {
    assert_eq!(a.dimensions(), b.dimensions());
    a.pixels().zip(b.pixels()).filter(|(p, q)| p != q).count()
}
