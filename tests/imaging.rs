use candle_core::{DType, Device, Tensor};
use diffpref::imaging::{
    draw_text, fit_text, grid, images_to_tensor, labelled_strip, load_image, save_png, strip,
    tensor_to_images, text_width, Grid, GridOptions,
};
use image::{Rgb, RgbImage};

fn solid(w: u32, h: u32, c: [u8; 3]) -> RgbImage {
    RgbImage::from_pixel(w, h, Rgb(c))
}

fn gradient(w: u32, h: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            ((x * 7 + seed * 13) % 256) as u8,
            ((y * 11 + seed * 5) % 256) as u8,
            ((x * y + seed) % 256) as u8,
        ])
    })
}

/// Set `DIFFPREF_IMAGING_DUMP=<dir>` to write the rendered test images for inspection.
fn dump(name: &str, img: &RgbImage) {
    if let Some(dir) = std::env::var_os("DIFFPREF_IMAGING_DUMP") {
        save_png(img, std::path::Path::new(&dir).join(name)).unwrap();
    }
}

fn is_dark(p: &Rgb<u8>) -> bool {
    p.0.iter().all(|&v| v < 100)
}

#[test]
fn tensor_image_round_trip() {
    let dev = Device::Cpu;
    let t = Tensor::rand(0f32, 1f32, (2, 3, 5, 7), &dev).unwrap();
    let imgs = tensor_to_images(&t).unwrap();
    assert_eq!(imgs.len(), 2);
    assert_eq!(imgs[0].dimensions(), (7, 5));
    let back = images_to_tensor(&imgs, &dev).unwrap();
    assert_eq!(back.dims(), &[2, 3, 5, 7]);
    assert_eq!(back.dtype(), DType::F32);
    let max_err = (back - &t)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(max_err <= 0.5 / 255.0 + 1e-6, "max error {max_err}");

    // Pixel layout: channel c of pixel (x, y) is t[b, c, y, x].
    let v = t
        .get(1)
        .unwrap()
        .get(2)
        .unwrap()
        .get(3)
        .unwrap()
        .get(4)
        .unwrap();
    let v = v.to_scalar::<f32>().unwrap();
    assert_eq!(imgs[1].get_pixel(4, 3).0[2], (v * 255.0).round() as u8);

    // Images -> tensor -> images is exact.
    let again = tensor_to_images(&images_to_tensor(&imgs, &dev).unwrap()).unwrap();
    assert_eq!(again, imgs);
}

#[test]
fn tensor_to_images_clamps_and_converts_dtype() {
    let dev = Device::Cpu;
    let t = Tensor::new(&[-1.0f32, 0.5, 2.0], &dev)
        .unwrap()
        .reshape((1, 3, 1, 1))
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let imgs = tensor_to_images(&t).unwrap();
    assert_eq!(imgs[0].get_pixel(0, 0).0, [0, 128, 255]);
    assert!(tensor_to_images(&Tensor::zeros((1, 4, 2, 2), DType::F32, &dev).unwrap()).is_err());
    assert!(tensor_to_images(&Tensor::zeros((3, 2, 2), DType::F32, &dev).unwrap()).is_err());
}

#[test]
fn images_to_tensor_rejects_mismatched_sizes() {
    let err = images_to_tensor(&[solid(4, 4, [0; 3]), solid(4, 5, [0; 3])], &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("image 1"), "{err}");
    assert!(images_to_tensor(&[], &Device::Cpu).is_err());
}

#[test]
fn grid_layout_labels_and_cells() {
    let (cw, ch) = (16u32, 16u32);
    let colors = [[200, 30, 30], [30, 200, 30], [30, 30, 200]];
    let cells: Vec<Vec<RgbImage>> = (0..2)
        .map(|r| (0..3).map(|c| solid(cw, ch, colors[(r + c) % 3])).collect())
        .collect();
    let opts = GridOptions {
        cell_gap: 4,
        font_px: 14.0,
        label_height: Some(20),
        row_label_width: Some(60),
        scale: 3,
        ..Default::default()
    };
    let rows = vec![
        "prompt one".to_string(),
        "a very long prompt that must be wrapped or truncated".to_string(),
    ];
    let cols = vec!["base".to_string(), "dpo".to_string(), "spo".to_string()];
    let img = grid(&cells, &rows, &cols, &opts).unwrap();
    dump("grid.png", &img);

    let (scw, sch) = (cw * 3, ch * 3);
    let x0 = 60 + 4;
    let y0 = 20 + 4;
    assert_eq!(img.width(), x0 + 3 * scw + 2 * 4);
    assert_eq!(img.height(), y0 + 2 * sch + 4);

    // Column label band contains dark (text) pixels above each column.
    for c in 0..3 {
        let xs = x0 + c * (scw + 4);
        let dark = (xs..xs + scw)
            .flat_map(|x| (0..20).map(move |y| (x, y)))
            .filter(|&(x, y)| is_dark(img.get_pixel(x, y)))
            .count();
        assert!(dark > 5, "column {c} label has {dark} dark pixels");
    }
    // Row label column contains dark pixels beside each row.
    for r in 0..2 {
        let ys = y0 + r * (sch + 4);
        let dark = (0..60)
            .flat_map(|x| (ys..ys + sch).map(move |y| (x, y)))
            .filter(|&(x, y)| is_dark(img.get_pixel(x, y)))
            .count();
        assert!(dark > 5, "row {r} label has {dark} dark pixels");
    }
    // Every cell area keeps its colour exactly.
    for r in 0..2u32 {
        for c in 0..3u32 {
            let (xs, ys) = (x0 + c * (scw + 4), y0 + r * (sch + 4));
            let want = Rgb(colors[(r + c) as usize % 3]);
            for y in ys..ys + sch {
                for x in xs..xs + scw {
                    assert_eq!(*img.get_pixel(x, y), want, "cell ({r},{c}) pixel ({x},{y})");
                }
            }
        }
    }
    // Gaps stay background (white).
    assert_eq!(*img.get_pixel(x0 + scw + 1, y0 + 1), Rgb([255, 255, 255]));

    // Builder gives the same image.
    let mut g = Grid::new(opts.clone());
    g.col_labels(cols.clone());
    for (label, row) in rows.iter().zip(&cells) {
        g.row(label.clone(), row.clone());
    }
    assert_eq!(g.render().unwrap(), img);
}

#[test]
fn grid_scale_is_nearest_and_unlabelled_grid_has_no_margins() {
    let cell = gradient(8, 8, 1);
    let opts = GridOptions {
        scale: 4,
        cell_gap: 2,
        ..Default::default()
    };
    let img = grid(&[vec![cell.clone(), cell.clone()]], &[], &[], &opts).unwrap();
    assert_eq!(img.dimensions(), (8 * 4 * 2 + 2, 8 * 4));
    for y in 0..32 {
        for x in 0..32 {
            assert_eq!(img.get_pixel(x, y), cell.get_pixel(x / 4, y / 4));
            assert_eq!(img.get_pixel(34 + x, y), cell.get_pixel(x / 4, y / 4));
        }
    }
}

#[test]
fn grid_rejects_mismatched_cells_and_labels() {
    let a = solid(8, 8, [0; 3]);
    let b = solid(8, 9, [0; 3]);
    let err = grid(
        &[vec![a.clone(), a.clone()], vec![a.clone(), b]],
        &[],
        &[],
        &GridOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("row 1") && err.contains("column 1"), "{err}");
    let err = grid(
        &[vec![a.clone()]],
        &[],
        &["x".into(), "y".into()],
        &GridOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("column labels"), "{err}");
    assert!(grid(&[], &[], &[], &GridOptions::default()).is_err());
}

#[test]
fn save_png_is_atomic_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/deeper/out.png");
    let img = gradient(37, 23, 3);
    save_png(&img, &path).unwrap();
    assert_eq!(load_image(&path).unwrap(), img);
    // Overwrite with a different image.
    let img2 = gradient(11, 13, 9);
    save_png(&img2, &path).unwrap();
    assert_eq!(load_image(&path).unwrap(), img2);
    // Only the target file remains: no temporary files left behind.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["out.png".to_string()]);

    // A failing save (target is a directory) leaves no temporary file either and names the path.
    let bad = dir.path().join("adir");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("keep"), b"x").unwrap();
    let err = save_png(&img, &bad).unwrap_err();
    assert!(format!("{err:#}").contains("adir"), "{err:#}");
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["adir".to_string(), "nested".to_string()]);

    // Loading a missing file names the path.
    let err = load_image(dir.path().join("missing.png")).unwrap_err();
    assert!(format!("{err:#}").contains("missing.png"));
}

#[test]
fn strips() {
    let imgs = vec![
        solid(10, 10, [255, 0, 0]),
        solid(10, 12, [0, 255, 0]),
        solid(6, 10, [0, 0, 255]),
    ];
    let s = strip(&imgs, 3);
    assert_eq!(s.dimensions(), (10 + 10 + 6 + 6, 12));
    assert_eq!(s.get_pixel(0, 0).0, [255, 0, 0]);
    assert_eq!(s.get_pixel(13, 11).0, [0, 255, 0]);
    assert_eq!(s.get_pixel(11, 0).0, [255, 255, 255]);
    assert_eq!(s.get_pixel(26, 0).0, [0, 0, 255]);
    assert_eq!(strip(&[], 3).dimensions(), (0, 0));

    let tiny: Vec<_> = (0..4).map(|i| gradient(32, 32, i)).collect();
    let labels: Vec<String> = ["t=999", "t=750", "t=500", "t=250"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let ls = labelled_strip(&tiny, &labels);
    dump("labelled_strip.png", &ls);
    assert_eq!(ls.width(), 4 * 32 + 3 * 2);
    let top = ls.height() - 32;
    assert!(top > 8);
    let dark = (0..ls.width())
        .flat_map(|x| (0..top).map(move |y| (x, y)))
        .filter(|&(x, y)| is_dark(ls.get_pixel(x, y)))
        .count();
    assert!(dark > 10, "{dark}");
    for y in 0..32 {
        for x in 0..32 {
            assert_eq!(ls.get_pixel(34 + x, top + y), tiny[1].get_pixel(x, y));
        }
    }
}

#[test]
fn text_helpers() {
    assert_eq!(text_width("", 14.0), 0);
    let w1 = text_width("hello", 14.0);
    let w2 = text_width("hello hello", 14.0);
    assert!(w1 > 10 && w2 > w1);
    assert!(text_width("hello", 28.0) > w1);

    let mut img = solid(80, 24, [255, 255, 255]);
    draw_text(&mut img, 2, 2, "Hi there", 16.0, Rgb([0, 0, 0]));
    assert!(img.pixels().any(is_dark));
    // Anti-aliased: some intermediate grey values too.
    assert!(img.pixels().any(|p| p.0[0] > 40 && p.0[0] < 215));
    // Drawing partly outside the image does not panic.
    draw_text(
        &mut img,
        -10,
        -5,
        "clipped text that overflows",
        16.0,
        Rgb([0, 0, 0]),
    );

    let lines = fit_text("a very long prompt that must be wrapped", 14.0, 60, 2);
    assert_eq!(lines.len(), 2);
    assert!(lines[1].ends_with('\u{2026}'), "{lines:?}");
    for l in &lines {
        assert!(text_width(l, 14.0) <= 60, "{l}");
    }
    assert_eq!(fit_text("short", 14.0, 200, 3), vec!["short".to_string()]);
}
