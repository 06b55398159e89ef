//! Training data: manifests, Pick-a-Pic parquet shards, preprocessing, caches and the resumable dataset.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use diffpref::data::cache::{CachedLatent, ImageId, LatentCache, TextEmbedCache};
use diffpref::data::dataset::{DatasetPosition, PairDataset, PairSource};
use diffpref::data::manifest::{
    load_manifest, load_unpaired_manifest, ManifestOptions, PreferencePair,
};
use diffpref::data::pickapic::{read_pickapic, PickapicIndex, PickapicOptions};
use diffpref::data::preprocess::{
    collate_pairs, maybe_drop_caption, preprocess_image, preprocess_pair, resized_size,
    PreprocessConfig,
};
use diffpref::pipelines::loading::PromptEmbeds;
use diffpref::train::rng::Rng;
use image::{Rgb, RgbImage};

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

fn solid(w: u32, h: u32, c: [u8; 3]) -> RgbImage {
    RgbImage::from_pixel(w, h, Rgb(c))
}

/// A horizontally and vertically asymmetric image (so flips and crops show).
fn gradient(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 255 / w.max(1)) as u8,
            (y * 255 / h.max(1)) as u8,
            ((x * 7 + y * 13) % 256) as u8,
        ])
    })
}

fn write_png(dir: &Path, rel: &str, img: &RgbImage) -> PathBuf {
    let p = dir.join(rel);
    diffpref::imaging::save_png(img, &p).unwrap();
    p
}

fn jpeg(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95)
        .encode_image(img)
        .unwrap();
    out
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.unwrap_err())
}

/// A manifest folder with images `img/a.png` (red), `img/b.png` (blue), `img/c.png` (green).
fn manifest_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_png(dir.path(), "img/a.png", &solid(8, 6, [255, 0, 0]));
    write_png(dir.path(), "img/b.png", &solid(6, 8, [0, 0, 255]));
    write_png(dir.path(), "img/c.png", &solid(8, 8, [0, 255, 0]));
    dir
}

fn write_manifest(dir: &Path, lines: &[&str]) -> PathBuf {
    let p = dir.join("manifest.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

// ---------------------------------------------------------------------------
// manifests
// ---------------------------------------------------------------------------

#[test]
fn manifest_happy_path_resolves_relative_paths_and_swaps_low_labels() {
    let dir = manifest_dir();
    let abs_c = dir.path().join("img/c.png");
    let m = write_manifest(
        dir.path(),
        &[
            "# a comment",
            r#"{"prompt": "fox", "chosen": "img/a.png", "rejected": "img/b.png", "extra": [1, 2]}"#,
            "",
            &format!(
                r#"{{"prompt": "castle", "chosen": "img/b.png", "rejected": "{}", "label": 0.8}}"#,
                abs_c.display()
            ),
            r#"{"prompt": "swap", "chosen": "img/a.png", "rejected": "img/c.png", "label": 0.0}"#,
            "   ",
        ],
    );
    let (pairs, report) = load_manifest(&m, &ManifestOptions::default()).unwrap();
    assert!(report.is_empty(), "{report}");
    assert_eq!(pairs.len(), 3);
    assert_eq!(
        pairs[0],
        PreferencePair {
            prompt: "fox".into(),
            chosen: dir.path().join("img/a.png"),
            rejected: dir.path().join("img/b.png"),
            label: 1.0,
            source: format!("{}:2", m.display()),
            latents: None,
        }
    );
    assert_eq!(pairs[1].chosen, dir.path().join("img/b.png"));
    assert_eq!(pairs[1].rejected, abs_c);
    assert!((pairs[1].label - 0.8).abs() < 1e-6);
    assert!(pairs[1].source.ends_with("manifest.jsonl:4"));
    // label 0: the rejected image is the winner, so the two swap and the label becomes 1.
    assert_eq!(pairs[2].chosen, dir.path().join("img/c.png"));
    assert_eq!(pairs[2].rejected, dir.path().join("img/a.png"));
    assert_eq!(pairs[2].label, 1.0);
    for p in &pairs {
        assert!(p.chosen.is_file() && p.rejected.is_file());
    }
}

#[test]
fn malformed_line_names_file_and_line() {
    let dir = manifest_dir();
    let m = write_manifest(
        dir.path(),
        &[
            r#"{"prompt": "a", "chosen": "img/a.png", "rejected": "img/b.png"}"#,
            "# fine",
            r#"{"prompt": "b", "chosen": "img/a.png", "rejected": "#,
        ],
    );
    let e = err_text(load_manifest(&m, &ManifestOptions::default()));
    assert!(e.contains("manifest.jsonl:3"), "{e}");
    assert!(e.contains("malformed JSON"), "{e}");
}

#[test]
fn missing_keys_and_wrong_types_name_the_key() {
    let dir = manifest_dir();
    let cases: &[(&str, &[&str])] = &[
        (
            r#"{"prompt": "a", "rejected": "img/b.png"}"#,
            &["manifest.jsonl:1", "missing key \"chosen\""],
        ),
        (
            r#"{"prompt": 3, "chosen": "img/a.png", "rejected": "img/b.png"}"#,
            &[
                "manifest.jsonl:1",
                "\"prompt\"",
                "must be a string",
                "number",
            ],
        ),
        (
            r#"{"prompt": "a", "chosen": "img/a.png", "rejected": "img/b.png", "label": "high"}"#,
            &["manifest.jsonl:1", "\"label\"", "\"high\""],
        ),
        (
            r#"{"prompt": "a", "chosen": "img/a.png", "rejected": "img/b.png", "label": 1.5}"#,
            &["manifest.jsonl:1", "\"label\"", "[0, 1]", "1.5"],
        ),
        (r#"[1, 2]"#, &["manifest.jsonl:1", "expected a JSON object"]),
        (
            r#"{"prompt": "a", "image": "img/a.png", "desirable": true}"#,
            &["manifest.jsonl:1", "\"chosen\"", "load_unpaired_manifest"],
        ),
        (
            r#"{"prompt": "a", "chosen": "img/a.png", "rejected": "img/a.png"}"#,
            &["manifest.jsonl:1", "same image"],
        ),
    ];
    for (line, needles) in cases {
        let m = write_manifest(dir.path(), &[line]);
        let e = err_text(load_manifest(&m, &ManifestOptions::default()));
        for n in *needles {
            assert!(e.contains(n), "{line}: {e} lacks {n}");
        }
    }
}

#[test]
fn missing_image_names_path_and_line() {
    let dir = manifest_dir();
    let m = write_manifest(
        dir.path(),
        &[
            r#"{"prompt": "a", "chosen": "img/a.png", "rejected": "img/b.png"}"#,
            r#"{"prompt": "b", "chosen": "img/a.png", "rejected": "img/nope.png"}"#,
        ],
    );
    let e = err_text(load_manifest(&m, &ManifestOptions::default()));
    assert!(e.contains("manifest.jsonl:2"), "{e}");
    assert!(e.contains("nope.png"), "{e}");
    assert!(e.contains("\"rejected\""), "{e}");
    // Without the check the pair loads (the path is still resolved).
    let opts = ManifestOptions {
        check_images: false,
        ..Default::default()
    };
    let (pairs, _) = load_manifest(&m, &opts).unwrap();
    assert_eq!(pairs[1].rejected, dir.path().join("img/nope.png"));
    // A missing manifest names itself.
    let e = err_text(load_manifest(
        dir.path().join("absent.jsonl"),
        &ManifestOptions::default(),
    ));
    assert!(e.contains("absent.jsonl"), "{e}");
}

#[test]
fn skip_bad_counts_and_keeps_the_good_lines() {
    let dir = manifest_dir();
    let m = write_manifest(
        dir.path(),
        &[
            r#"{"prompt": "a", "chosen": "img/a.png", "rejected": "img/b.png"}"#,
            r#"{"prompt": "b", "chosen": "img/a.png""#,
            r#"{"prompt": "c", "chosen": "img/a.png", "rejected": "img/missing.png"}"#,
            r#"{"prompt": "d", "chosen": "img/c.png", "rejected": "img/b.png"}"#,
            r#"{"prompt": "e", "chosen": "img/c.png", "rejected": "img/b.png", "label": 0.5}"#,
        ],
    );
    let opts = ManifestOptions {
        skip_bad: true,
        ..Default::default()
    };
    let (pairs, report) = load_manifest(&m, &opts).unwrap();
    assert_eq!(
        pairs.iter().map(|p| p.prompt.as_str()).collect::<Vec<_>>(),
        ["a", "d"]
    );
    assert_eq!(report.count, 2);
    assert_eq!(report.ties_dropped, 1);
    assert!(report.reasons[0].contains("manifest.jsonl:2"), "{report}");
    assert!(report.reasons[1].contains("manifest.jsonl:3"), "{report}");
    assert!(report.reasons[1].contains("missing.png"), "{report}");
}

#[test]
fn ties_are_dropped_by_default_and_kept_on_request() {
    let dir = manifest_dir();
    let m = write_manifest(
        dir.path(),
        &[
            r#"{"prompt": "a", "chosen": "img/a.png", "rejected": "img/b.png", "label": 0.5}"#,
            r#"{"prompt": "b", "chosen": "img/a.png", "rejected": "img/b.png", "label": 1}"#,
        ],
    );
    let (pairs, report) = load_manifest(&m, &ManifestOptions::default()).unwrap();
    assert_eq!(pairs.len(), 1);
    assert_eq!(pairs[0].prompt, "b");
    assert_eq!((report.ties_dropped, report.count), (1, 0));
    let keep = ManifestOptions {
        drop_ties: false,
        ..Default::default()
    };
    let (pairs, report) = load_manifest(&m, &keep).unwrap();
    assert_eq!(pairs.len(), 2);
    assert!(pairs[0].is_tie() && pairs[0].label == 0.5);
    assert!(report.is_empty());
}

#[test]
fn stored_latents_are_read_swapped_with_their_images_and_checked() {
    let dir = manifest_dir();
    let z = |v: f32| Tensor::full(v, (4, 2, 3), &Device::Cpu).unwrap();
    diffpref::data::latents::save_latent(&dir.path().join("img/a.latent"), &z(1.0)).unwrap();
    diffpref::data::latents::save_latent(&dir.path().join("img/b.latent"), &z(-2.0)).unwrap();
    let m = write_manifest(
        dir.path(),
        &[
            r#"{"prompt": "p", "chosen": "img/a.png", "rejected": "img/b.png", "chosen_latent": "img/a.latent", "rejected_latent": "img/b.latent"}"#,
            r#"{"prompt": "q", "chosen": "img/a.png", "rejected": "img/b.png", "chosen_latent": "img/a.latent", "rejected_latent": "img/b.latent", "label": 0.0}"#,
        ],
    );
    let (pairs, _) = load_manifest(&m, &ManifestOptions::default()).unwrap();
    assert_eq!(
        pairs[0].latents,
        Some((
            dir.path().join("img/a.latent"),
            dir.path().join("img/b.latent")
        ))
    );
    // The swap for label 0 moves the latents with their images.
    assert_eq!(pairs[1].chosen, dir.path().join("img/b.png"));
    assert_eq!(
        pairs[1].latents,
        Some((
            dir.path().join("img/b.latent"),
            dir.path().join("img/a.latent")
        ))
    );
    let mut ds = PairDataset::new(PairSource::Manifest(pairs), 0, false);
    let batch = ds.next_batch(2).unwrap();
    let (c, r) = batch[1].latents.as_ref().unwrap();
    assert_eq!(c.dims(), &[4, 2, 3]);
    assert_eq!(max_abs_diff(c, &z(-2.0)), 0.0);
    assert_eq!(max_abs_diff(r, &z(1.0)), 0.0);

    // One latent without the other, and a missing latent file, name the line and the key.
    let m = write_manifest(
        dir.path(),
        &[
            r#"{"prompt": "p", "chosen": "img/a.png", "rejected": "img/b.png", "chosen_latent": "img/a.latent"}"#,
        ],
    );
    let e = err_text(load_manifest(&m, &ManifestOptions::default()));
    assert!(
        e.contains("manifest.jsonl:1") && e.contains("\"rejected_latent\""),
        "{e}"
    );
    let m = write_manifest(
        dir.path(),
        &[
            r#"{"prompt": "p", "chosen": "img/a.png", "rejected": "img/b.png", "chosen_latent": "img/a.latent", "rejected_latent": "img/none.latent"}"#,
        ],
    );
    let e = err_text(load_manifest(&m, &ManifestOptions::default()));
    assert!(
        e.contains("manifest.jsonl:1") && e.contains("none.latent"),
        "{e}"
    );
}

#[test]
fn unpaired_manifest_reads_kto_records() {
    let dir = manifest_dir();
    let m = write_manifest(
        dir.path(),
        &[
            r#"{"prompt": "a", "image": "img/a.png", "desirable": true}"#,
            r#"{"prompt": "b", "image": "img/b.png", "desirable": false}"#,
        ],
    );
    let (s, _) = load_unpaired_manifest(&m, &ManifestOptions::default()).unwrap();
    assert_eq!(s.len(), 2);
    assert!(s[0].desirable && !s[1].desirable);
    assert_eq!(s[1].image, dir.path().join("img/b.png"));
    let m = write_manifest(
        dir.path(),
        &[
            r#"{"prompt": "a", "image": "img/a.png", "desirable": true}"#,
            r#"{"prompt": "b", "image": "img/b.png", "desirable": "yes"}"#,
        ],
    );
    let e = err_text(load_unpaired_manifest(&m, &ManifestOptions::default()));
    assert!(
        e.contains("manifest.jsonl:2") && e.contains("\"desirable\""),
        "{e}"
    );
}

// ---------------------------------------------------------------------------
// Pick-a-Pic parquet
// ---------------------------------------------------------------------------

struct Row {
    caption: &'static str,
    jpg_0: Vec<u8>,
    jpg_1: Vec<u8>,
    label_0: f64,
    label_1: f64,
}

/// Writes a Pick-a-Pic-like shard (optional columns as pyarrow writes them), `group` rows per row group,
/// Snappy-compressed.
fn write_shard(path: &Path, rows: &[Row], group: usize) {
    use parquet::basic::Compression;
    use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    let schema = parse_message_type(
        "message schema {
            OPTIONAL BYTE_ARRAY caption (UTF8);
            OPTIONAL BYTE_ARRAY jpg_0;
            OPTIONAL BYTE_ARRAY jpg_1;
            OPTIONAL DOUBLE label_0;
            OPTIONAL DOUBLE label_1;
            OPTIONAL BOOLEAN has_label;
            OPTIONAL BOOLEAN are_different;
        }",
    )
    .unwrap();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut w = SerializedFileWriter::new(
        File::create(path).unwrap(),
        Arc::new(schema),
        Arc::new(props),
    )
    .unwrap();
    for chunk in rows.chunks(group) {
        let def = vec![1i16; chunk.len()];
        let mut rg = w.next_row_group().unwrap();
        let mut col = 0;
        while let Some(mut c) = rg.next_column().unwrap() {
            match col {
                0..=2 => {
                    let vals: Vec<ByteArray> = chunk
                        .iter()
                        .map(|r| match col {
                            0 => ByteArray::from(r.caption),
                            1 => ByteArray::from(r.jpg_0.clone()),
                            _ => ByteArray::from(r.jpg_1.clone()),
                        })
                        .collect();
                    c.typed::<ByteArrayType>()
                        .write_batch(&vals, Some(&def), None)
                        .unwrap();
                }
                3 | 4 => {
                    let vals: Vec<f64> = chunk
                        .iter()
                        .map(|r| if col == 3 { r.label_0 } else { r.label_1 })
                        .collect();
                    c.typed::<DoubleType>()
                        .write_batch(&vals, Some(&def), None)
                        .unwrap();
                }
                _ => {
                    let vals = vec![true; chunk.len()];
                    c.typed::<BoolType>()
                        .write_batch(&vals, Some(&def), None)
                        .unwrap();
                }
            }
            c.close().unwrap();
            col += 1;
        }
        rg.close().unwrap();
    }
    w.close().unwrap();
}

const RED: [u8; 3] = [250, 10, 10];
const BLUE: [u8; 3] = [10, 10, 250];

fn is_colour(img: &RgbImage, c: [u8; 3]) -> bool {
    let p = img.get_pixel(img.width() / 2, img.height() / 2).0;
    (0..3).all(|i| (i32::from(p[i]) - i32::from(c[i])).abs() < 30)
}

/// Four rows: image 0 wins, image 1 wins, a tie, image 0 wins. The red image is always the winner.
fn four_rows() -> Vec<Row> {
    let red = jpeg(&solid(16, 12, RED));
    let blue = jpeg(&solid(12, 16, BLUE));
    vec![
        Row {
            caption: "first",
            jpg_0: red.clone(),
            jpg_1: blue.clone(),
            label_0: 1.0,
            label_1: 0.0,
        },
        Row {
            caption: "second",
            jpg_0: blue.clone(),
            jpg_1: red.clone(),
            label_0: 0.0,
            label_1: 1.0,
        },
        Row {
            caption: "tie",
            jpg_0: red.clone(),
            jpg_1: blue.clone(),
            label_0: 0.5,
            label_1: 0.5,
        },
        Row {
            caption: "fourth",
            jpg_0: red,
            jpg_1: blue,
            label_0: 1.0,
            label_1: 0.0,
        },
    ]
}

#[test]
fn parquet_round_trip_drops_ties_and_puts_the_winner_first() {
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("train-00000.parquet");
    write_shard(&shard, &four_rows(), 2);

    let (pairs, report) = read_pickapic(&shard, &PickapicOptions::default()).unwrap();
    assert_eq!(
        pairs.iter().map(|p| p.prompt.as_str()).collect::<Vec<_>>(),
        ["first", "second", "fourth"]
    );
    assert_eq!((report.ties_dropped, report.count), (1, 0));
    for p in &pairs {
        assert!(is_colour(&p.chosen, RED), "{}: chosen is not red", p.source);
        assert!(
            is_colour(&p.rejected, BLUE),
            "{}: rejected is not blue",
            p.source
        );
        assert_eq!(p.chosen.dimensions(), (16, 12));
        assert_eq!(p.label, 1.0);
    }
    assert!(
        pairs[1].source.ends_with("train-00000.parquet row 1"),
        "{}",
        pairs[1].source
    );

    let keep = PickapicOptions {
        drop_ties: false,
        ..Default::default()
    };
    let (pairs, report) = read_pickapic(&shard, &keep).unwrap();
    assert_eq!(pairs.len(), 4);
    assert_eq!(pairs[2].label, 0.5);
    assert!(
        is_colour(&pairs[2].chosen, RED),
        "a tie keeps the file order"
    );
    assert!(report.is_empty());

    // Random access through the index gives the same pairs.
    let (mut index, report) =
        PickapicIndex::open(std::slice::from_ref(&shard), &PickapicOptions::default()).unwrap();
    assert_eq!((index.len(), report.ties_dropped), (3, 1));
    let (all, _) = read_pickapic(&shard, &PickapicOptions::default()).unwrap();
    for i in [2, 0, 1] {
        assert_eq!(index.get(i).unwrap(), all[i]);
    }
}

#[test]
fn parquet_corrupt_row_names_file_and_row() {
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("bad.parquet");
    let mut rows = four_rows();
    rows[3].jpg_1 = b"definitely not a jpeg".to_vec();
    rows[1].label_0 = 1.0; // label_0 + label_1 = 2: inconsistent
    write_shard(&shard, &rows, 3);

    let e = err_text(read_pickapic(&shard, &PickapicOptions::default()));
    assert!(e.contains("bad.parquet row 1"), "{e}");
    assert!(e.contains("label_1"), "{e}");

    let skip = PickapicOptions {
        skip_bad: true,
        ..Default::default()
    };
    let (pairs, report) = read_pickapic(&shard, &skip).unwrap();
    assert_eq!(pairs.len(), 1);
    assert_eq!(pairs[0].prompt, "first");
    assert_eq!((report.count, report.ties_dropped), (2, 1));
    assert!(report.reasons[1].contains("bad.parquet row 3"), "{report}");
    assert!(report.reasons[1].contains("jpg_1"), "{report}");

    // The index only reads light columns: the corrupt image shows when the pair is loaded.
    let (mut index, report) = PickapicIndex::open(std::slice::from_ref(&shard), &skip).unwrap();
    assert_eq!((index.len(), report.count), (2, 1));
    let e = err_text(index.get(1));
    assert!(
        e.contains("bad.parquet row 3") && e.contains("jpg_1"),
        "{e}"
    );
}

#[test]
fn parquet_schema_and_file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let not_parquet = dir.path().join("junk.parquet");
    std::fs::write(&not_parquet, b"hello").unwrap();
    let e = err_text(read_pickapic(&not_parquet, &PickapicOptions::default()));
    assert!(e.contains("junk.parquet"), "{e}");

    // A shard without label_0.
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::writer::SerializedFileWriter;
    let schema = parquet::schema::parser::parse_message_type(
        "message schema { REQUIRED BYTE_ARRAY caption (UTF8); REQUIRED BYTE_ARRAY jpg_0; \
         REQUIRED BYTE_ARRAY jpg_1; }",
    )
    .unwrap();
    let p = dir.path().join("nolabel.parquet");
    let mut w = SerializedFileWriter::new(
        File::create(&p).unwrap(),
        Arc::new(schema),
        Default::default(),
    )
    .unwrap();
    let mut rg = w.next_row_group().unwrap();
    while let Some(mut c) = rg.next_column().unwrap() {
        c.typed::<ByteArrayType>()
            .write_batch(&[ByteArray::from("x")], None, None)
            .unwrap();
        c.close().unwrap();
    }
    rg.close().unwrap();
    w.close().unwrap();
    let e = err_text(read_pickapic(&p, &PickapicOptions::default()));
    assert!(
        e.contains("nolabel.parquet") && e.contains("\"label_0\""),
        "{e}"
    );
}

// ---------------------------------------------------------------------------
// preprocessing
// ---------------------------------------------------------------------------

#[test]
fn resize_follows_torchvision() {
    assert_eq!(resized_size(512, 768, 256), (256, 384));
    assert_eq!(resized_size(768, 512, 256), (384, 256));
    assert_eq!(resized_size(100, 333, 64), (64, 213)); // int(64 * 333 / 100) = 213
    assert_eq!(resized_size(64, 64, 64), (64, 64));
    let cfg = PreprocessConfig::new(8);
    let t = cfg.sample_transform(9, 20, &mut Rng::new(0)).unwrap();
    assert_eq!(t.resized_size, (8, 17));
    assert_eq!((t.crop_top, t.crop_left), (0, 4)); // round(4.5) = 4 (half to even)
    let t = cfg.sample_transform(8, 15, &mut Rng::new(0)).unwrap();
    assert_eq!(t.crop_left, 4); // round(3.5) = 4
    assert_eq!(t.sdxl_time_ids(), [8, 15, 0, 4, 8, 8]);
}

#[test]
fn preprocessing_gives_shapes_in_range_and_one_transform_per_pair() {
    let img = gradient(48, 32);
    let cfg = PreprocessConfig {
        resolution: 16,
        center_crop: false,
        random_flip: true,
    };
    let (t, tr) = preprocess_image(&img, &cfg, &mut Rng::new(3)).unwrap();
    assert_eq!(t.dims(), &[3, 16, 16]);
    assert_eq!(t.dtype(), DType::F32);
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
    assert!(v.iter().any(|&x| x < -0.5) && v.iter().any(|&x| x > 0.5));
    assert_eq!(tr.resized_size, (16, 24));

    // The same image as both members: any shared flip and crop gives identical tensors; independent ones would
    // not (the image is asymmetric). Both flips and several crops occur over the seeds.
    let mut flips = [0; 2];
    let mut lefts = std::collections::BTreeSet::new();
    for seed in 0..24 {
        let mut rng = Rng::new(seed);
        let p = preprocess_pair(&img, &img, &cfg, &mut rng).unwrap();
        assert_eq!(max_abs_diff(&p.chosen, &p.rejected), 0.0);
        flips[usize::from(p.transform.flip)] += 1;
        lefts.insert(p.transform.crop_left);
        // Reproducible from the same seed.
        let q = preprocess_pair(&img, &img, &cfg, &mut Rng::new(seed)).unwrap();
        assert_eq!(q.transform, p.transform);
        assert_eq!(max_abs_diff(&p.chosen, &q.chosen), 0.0);
    }
    assert!(flips[0] > 0 && flips[1] > 0, "{flips:?}");
    assert!(lefts.len() > 2, "{lefts:?}");

    // A flip mirrors the crop of the flipped image.
    let mut flip_cfg = cfg;
    flip_cfg.center_crop = true;
    flip_cfg.random_flip = false;
    let plain = preprocess_image(&img, &flip_cfg, &mut Rng::new(0))
        .unwrap()
        .0;
    let mut t = flip_cfg.sample_transform(32, 48, &mut Rng::new(0)).unwrap();
    t.flip = true;
    let flipped = diffpref::data::preprocess::image_to_tensor(&t.apply(&img).unwrap()).unwrap();
    let mirrored = plain.flip(&[2]).unwrap();
    assert_eq!(max_abs_diff(&flipped, &mirrored), 0.0);

    // A rejected image of another size is resized to the chosen one's first, then cropped alike.
    let big = image::imageops::resize(&img, 96, 64, image::imageops::FilterType::Nearest);
    let p = preprocess_pair(&img, &big, &cfg, &mut Rng::new(5)).unwrap();
    assert_eq!(p.rejected.dims(), &[3, 16, 16]);
    assert!(max_abs_diff(&p.chosen, &p.rejected) < 0.1);
    assert_eq!(p.transform.original_size, (32, 48));

    let batch = collate_pairs(&[p.clone(), p.clone()], &Device::Cpu).unwrap();
    assert_eq!(batch.dims(), &[4, 3, 16, 16]);
    assert_eq!(
        max_abs_diff(&batch.get(2).unwrap(), &p.rejected),
        0.0,
        "losers follow the winners"
    );

    let bad = PreprocessConfig::new(0);
    assert!(preprocess_image(&img, &bad, &mut Rng::new(0)).is_err());
}

#[test]
fn caption_dropout_uses_the_given_rate() {
    let mut rng = Rng::new(9);
    let dropped = (0..4000)
        .filter(|_| maybe_drop_caption("a cat", 0.2, &mut rng).is_empty())
        .count();
    assert!((650..950).contains(&dropped), "{dropped}");
    assert_eq!(maybe_drop_caption("a cat", 0.0, &mut rng), "a cat");
    assert_eq!(maybe_drop_caption("a cat", 1.0, &mut rng), "");
}

// ---------------------------------------------------------------------------
// caches
// ---------------------------------------------------------------------------

fn fake_latent(seed: u64) -> CachedLatent {
    let mut r = Rng::new(seed);
    CachedLatent {
        mean: r.normal_tensor(&[4, 2, 2], &Device::Cpu).unwrap(),
        std: (r
            .normal_tensor(&[4, 2, 2], &Device::Cpu)
            .unwrap()
            .abs()
            .unwrap()
            + 0.1)
            .unwrap(),
    }
}

fn no_tmp_files(dir: &Path) {
    for e in walk(dir) {
        let n = e.file_name().unwrap().to_string_lossy().to_string();
        assert!(!n.ends_with(".tmp"), "left behind: {}", e.display());
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn latent_cache_hits_return_identical_tensors_and_keys_track_inputs() {
    let dir = manifest_dir();
    let cache = LatentCache::new(dir.path().join("cache"), "tiny-vae").unwrap();
    let cfg = PreprocessConfig::new(8);
    let t = cfg.sample_transform(6, 8, &mut Rng::new(0)).unwrap();
    let img = dir.path().join("img/a.png");
    let key = cache.key(ImageId::Path(&img), &t).unwrap();
    assert_eq!(key, cache.key(ImageId::Path(&img), &t).unwrap());
    let mut flipped = t;
    flipped.flip = true;
    assert_ne!(key, cache.key(ImageId::Path(&img), &flipped).unwrap());
    assert_ne!(
        key,
        cache
            .key(ImageId::Path(&dir.path().join("img/b.png")), &t)
            .unwrap()
    );
    let other_model = LatentCache::new(dir.path().join("cache"), "other-vae").unwrap();
    assert_ne!(key, other_model.key(ImageId::Path(&img), &t).unwrap());
    assert_ne!(
        cache.key(ImageId::Bytes(b"abc"), &t).unwrap(),
        cache.key(ImageId::Named("abc"), &t).unwrap()
    );

    let mut calls = 0;
    let first = cache
        .get_or_compute(&key, &Device::Cpu, || {
            calls += 1;
            Ok(fake_latent(1))
        })
        .unwrap();
    let second = cache
        .get_or_compute(&key, &Device::Cpu, || {
            calls += 1;
            Ok(fake_latent(2))
        })
        .unwrap();
    assert_eq!(calls, 1);
    assert_eq!(max_abs_diff(&first.mean, &second.mean), 0.0);
    assert_eq!(max_abs_diff(&first.std, &second.std), 0.0);
    assert_eq!(max_abs_diff(&first.mean, &fake_latent(1).mean), 0.0);
    assert_eq!(cache.cache().stats().get(), (2, 1));

    // Sampling from the cached posterior: mean + std * noise.
    let noise = Tensor::ones((4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let s = second.sample(&noise).unwrap();
    let expect = (&second.mean + &second.std).unwrap();
    assert!(max_abs_diff(&s, &expect) < 1e-6);
    let stacked = CachedLatent::stack(&[first.clone(), second.clone()], &Device::Cpu).unwrap();
    assert_eq!(stacked.mean.dims(), &[2, 4, 2, 2]);
    let back = CachedLatent::split(&stacked).unwrap();
    assert!(max_abs_diff(&back[1].std, &second.std) < 1e-6);

    // Batched: only misses are computed, in order.
    let keys: Vec<_> = ["x", "y", "z"]
        .iter()
        .map(|n| cache.key(ImageId::Named(n), &t).unwrap())
        .collect();
    cache.put(&keys[1], &fake_latent(11)).unwrap();
    let got = cache
        .get_or_compute_many(&keys, &Device::Cpu, |missing| {
            assert_eq!(missing, &[0, 2]);
            Ok(vec![fake_latent(10), fake_latent(12)])
        })
        .unwrap();
    for (i, g) in got.iter().enumerate() {
        assert_eq!(max_abs_diff(&g.mean, &fake_latent(10 + i as u64).mean), 0.0);
    }
    no_tmp_files(dir.path());

    // f16 storage.
    let half = LatentCache::new(dir.path().join("cache16"), "tiny-vae")
        .unwrap()
        .with_storage_dtype(DType::F16)
        .unwrap();
    let l = half
        .get_or_compute(&key, &Device::Cpu, || Ok(fake_latent(1)))
        .unwrap();
    assert_eq!(l.mean.dtype(), DType::F16);

    // A damaged file is an error naming it.
    let path = cache.cache().path(&key);
    std::fs::write(&path, b"garbage").unwrap();
    let e = err_text(cache.get(&key, &Device::Cpu));
    assert!(e.contains(&path.display().to_string()), "{e}");
    // A file holding another key (e.g. copied by hand) is refused.
    std::fs::copy(cache.cache().path(&keys[0]), &path).unwrap();
    let e = err_text(cache.get(&key, &Device::Cpu));
    assert!(e.contains("holds key"), "{e}");
}

const CHILD_ENV: &str = "DIFFPREF_TEST_CACHE_CHILD_DIR";

#[test]
fn cache_is_visible_to_a_second_process() {
    let dir = tempfile::tempdir().unwrap();
    let cache = LatentCache::new(dir.path(), "shared-vae").unwrap();
    let key = cache.key(ImageId::Named("img-1"), &transform8()).unwrap();
    cache.put(&key, &fake_latent(42)).unwrap();
    let text = TextEmbedCache::new(dir.path(), "shared-te").unwrap();
    text.get_or_compute_many(&["hello"], &Device::Cpu, |p| Ok(fake_embeds(p)))
        .unwrap();

    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "cache_child_process_reader",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 passed"), "{stdout}");
    assert!(stdout.contains("child saw the cached entries"), "{stdout}");
}

/// Runs only as the child of `cache_is_visible_to_a_second_process`, which starts it with `--ignored` and the
/// cache folder in the environment.
#[test]
#[ignore = "the child process of cache_is_visible_to_a_second_process (run by it)"]
fn cache_child_process_reader() {
    let dir = std::env::var_os(CHILD_ENV).expect("run by cache_is_visible_to_a_second_process");
    let cache = LatentCache::new(&dir, "shared-vae").unwrap();
    let key = cache.key(ImageId::Named("img-1"), &transform8()).unwrap();
    let l = cache
        .get_or_compute(&key, &Device::Cpu, || {
            panic!("the child must hit the cache")
        })
        .unwrap();
    assert_eq!(max_abs_diff(&l.mean, &fake_latent(42).mean), 0.0);
    let text = TextEmbedCache::new(&dir, "shared-te").unwrap();
    let e = text
        .get_or_compute_many(&["hello"], &Device::Cpu, |_| {
            panic!("the child must hit the text cache")
        })
        .unwrap();
    assert_eq!(
        max_abs_diff(&e.hidden_states, &fake_embeds(&["hello"]).hidden_states),
        0.0
    );
    println!("child saw the cached entries");
}

fn transform8() -> diffpref::data::preprocess::Transform {
    PreprocessConfig::new(8)
        .sample_transform(8, 8, &mut Rng::new(0))
        .unwrap()
}

/// Deterministic per-prompt embeddings: `[B, 3, 4]` hidden states and `[B, 2]` pooled.
fn fake_embeds(prompts: &[&str]) -> PromptEmbeds {
    let rows: Vec<Tensor> = prompts
        .iter()
        .map(|p| {
            let seed = p.bytes().map(u64::from).sum::<u64>();
            Rng::new(seed).normal_tensor(&[3, 4], &Device::Cpu).unwrap()
        })
        .collect();
    let pooled: Vec<Tensor> = prompts
        .iter()
        .map(|p| Tensor::new(&[p.len() as f32, 1.0], &Device::Cpu).unwrap())
        .collect();
    PromptEmbeds {
        hidden_states: Tensor::stack(&rows, 0).unwrap(),
        pooled: Some(Tensor::stack(&pooled, 0).unwrap()),
    }
}

#[test]
fn text_cache_encodes_each_missing_prompt_once() {
    let dir = tempfile::tempdir().unwrap();
    let cache = TextEmbedCache::new(dir.path(), "te").unwrap();
    let mut seen: Vec<Vec<String>> = Vec::new();
    let batch = ["a cat", "a dog", "a cat", ""];
    let e = cache
        .get_or_compute_many(&batch, &Device::Cpu, |p| {
            seen.push(p.iter().map(|s| s.to_string()).collect());
            Ok(fake_embeds(p))
        })
        .unwrap();
    assert_eq!(seen, vec![vec!["a cat", "a dog", ""]]);
    assert_eq!(e.hidden_states.dims(), &[4, 3, 4]);
    assert_eq!(e.pooled.as_ref().unwrap().dims(), &[4, 2]);
    let direct = fake_embeds(&batch);
    assert_eq!(max_abs_diff(&e.hidden_states, &direct.hidden_states), 0.0);
    assert_eq!(
        max_abs_diff(e.pooled.as_ref().unwrap(), direct.pooled.as_ref().unwrap()),
        0.0
    );
    // Second time: all hits, the encoder is not called.
    let again = cache
        .get_or_compute_many(&["a dog", "a cat"], &Device::Cpu, |_| {
            panic!("everything is cached")
        })
        .unwrap();
    assert_eq!(
        max_abs_diff(
            &again.hidden_states.get(0).unwrap(),
            &direct.hidden_states.get(1).unwrap()
        ),
        0.0
    );
    // A different model id does not see these entries.
    let other = TextEmbedCache::new(dir.path(), "te-2").unwrap();
    assert!(other.get("a cat", &Device::Cpu).unwrap().is_none());
    no_tmp_files(dir.path());
}

// ---------------------------------------------------------------------------
// dataset
// ---------------------------------------------------------------------------

fn five_pair_dataset(dir: &Path, seed: u64) -> PairDataset {
    let lines: Vec<String> = (0..5)
        .map(|i| {
            let (c, r) = if i % 2 == 0 { ("a", "b") } else { ("c", "a") };
            format!(r#"{{"prompt": "p{i}", "chosen": "img/{c}.png", "rejected": "img/{r}.png"}}"#)
        })
        .collect();
    let refs: Vec<&str> = lines.iter().map(|s| s.as_str()).collect();
    let m = write_manifest(dir, &refs);
    PairDataset::from_manifest(&m, &ManifestOptions::default(), seed)
        .unwrap()
        .0
}

#[test]
fn dataset_wraps_epochs_and_resumes_from_a_position() {
    let dir = manifest_dir();
    let mut ds = five_pair_dataset(dir.path(), 17);
    assert_eq!(ds.len(), 5);
    // Each epoch is a permutation; epochs differ.
    let e0 = ds.epoch_order(0);
    let e1 = ds.epoch_order(1);
    let mut sorted = e0.clone();
    sorted.sort();
    assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
    assert_ne!(e0, e1);

    let first: Vec<usize> = ds.next_indices(3).unwrap();
    assert_eq!(first, e0[..3]);
    let second = ds.next_indices(3).unwrap(); // crosses into epoch 1
    assert_eq!(second, vec![e0[3], e0[4], e1[0]]);
    let saved = ds.position();
    assert_eq!(saved, DatasetPosition { epoch: 1, index: 1 });
    let saved_json = serde_json::to_string(&saved).unwrap();
    let rest: Vec<Vec<usize>> = (0..4).map(|_| ds.next_indices(3).unwrap()).collect();

    let mut resumed = five_pair_dataset(dir.path(), 17);
    resumed
        .seek(serde_json::from_str(&saved_json).unwrap())
        .unwrap();
    let again: Vec<Vec<usize>> = (0..4).map(|_| resumed.next_indices(3).unwrap()).collect();
    assert_eq!(rest, again);

    // Loading images follows the same order.
    let mut a = five_pair_dataset(dir.path(), 17);
    a.seek(saved).unwrap();
    let b1 = a.next_batch(4).unwrap();
    let mut b = five_pair_dataset(dir.path(), 17);
    b.seek(saved).unwrap();
    let refs = b.next_refs(4).unwrap();
    assert_eq!(
        b1.iter().map(|p| &p.prompt).collect::<Vec<_>>(),
        refs.iter()
            .map(|r| &r.paths.as_ref().unwrap().prompt)
            .collect::<Vec<_>>()
    );
    assert!(is_colour(
        &b1[0].chosen,
        if refs[0].paths.as_ref().unwrap().chosen.ends_with("a.png") {
            [255, 0, 0]
        } else {
            [0, 255, 0]
        }
    ));

    // Another seed, another order; a position past the end is refused; end-of-epoch normalises.
    let other = five_pair_dataset(dir.path(), 18);
    assert_ne!(other.epoch_order(0), e0);
    let e = err_text(ds.seek(DatasetPosition { epoch: 0, index: 6 }));
    assert!(e.contains("beyond"), "{e}");
    ds.seek(DatasetPosition { epoch: 2, index: 5 }).unwrap();
    assert_eq!(ds.position(), DatasetPosition { epoch: 3, index: 0 });

    // Unshuffled order and the empty dataset.
    let mut plain = PairDataset::new(PairSource::Manifest(Vec::new()), 0, false);
    assert!(plain.next_indices(1).is_err());
    assert!(plain.next_indices(0).unwrap().is_empty());
}

#[test]
fn dataset_over_parquet_serves_decoded_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.parquet");
    let b = dir.path().join("b.parquet");
    write_shard(&a, &four_rows(), 2);
    write_shard(&b, &four_rows()[..2], 1);
    let (mut ds, report) =
        PairDataset::from_parquet(&[a, b], &PickapicOptions::default(), 5).unwrap();
    assert_eq!((ds.len(), report.ties_dropped), (5, 1));
    let batch = ds.next_batch(7).unwrap(); // wraps into the second epoch
    assert_eq!(batch.len(), 7);
    for p in &batch {
        assert!(
            is_colour(&p.chosen, RED) && is_colour(&p.rejected, BLUE),
            "{}",
            p.source
        );
    }
    let sources: std::collections::BTreeSet<_> = batch[..5].iter().map(|p| &p.source).collect();
    assert_eq!(sources.len(), 5, "one epoch visits every pair once");
}
