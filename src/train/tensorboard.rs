//! TensorBoard event files: what `tensorboard --logdir runs/` reads.
//!
//! An event file (`events.out.tfevents.<unix seconds>.diffpref.<pid>.<n>`) is a sequence of TFRecords, each
//!
//! ```text
//! u64 length (little endian) | u32 masked_crc32c(length bytes) | length bytes of data | u32 masked_crc32c(data)
//! ```
//!
//! with `masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8` (wrapping), the data being a serialised
//! `tensorflow.Event` protocol buffer. The first event names the format (`file_version = "brain.Event:2"`); then
//! one event per logged step carries a `Summary` of scalars (`simple_value`) or PNG images. A resumed run writes a
//! new file that starts with `SessionLog { status: START }` at the first step it will log: TensorBoard then drops
//! what the interrupted run had written from that step on (its "purge orphaned data"), as it does for TensorFlow's
//! own restarts.
//!
//! The messages below carry only the fields we write, with TensorFlow's field numbers
//! (`tensorflow/core/util/event.proto`, `tensorflow/core/framework/summary.proto`).

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, ensure, Context, Result};
use prost::Message;

/// Prefix of every event file name (what TensorBoard looks for).
pub const EVENT_FILE_PREFIX: &str = "events.out.tfevents.";

/// `tensorflow.Event`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    pub what: Option<What>,
}

/// The payload of an [`Event`].
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(oneof = "ValueKind", tags = "2, 4")]
    pub value: Option<ValueKind>,
}

/// The value of a [`SummaryValue`].
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ValueKind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "4")]
    Image(SummaryImage),
}

/// `tensorflow.Summary.Image`: an encoded (PNG) image.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryImage {
    #[prost(int32, tag = "1")]
    pub height: i32,
    #[prost(int32, tag = "2")]
    pub width: i32,
    /// 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA.
    #[prost(int32, tag = "3")]
    pub colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    pub encoded_image_string: Vec<u8>,
}

/// `tensorflow.SessionLog`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionLog {
    /// `SessionStatus`: 0 unspecified, 1 START, 2 STOP, 3 CHECKPOINT.
    #[prost(int32, tag = "1")]
    pub status: i32,
}

/// `SessionLog.SessionStatus.START`.
pub const SESSION_START: i32 = 1;

/// The masked CRC-32C of a TFRecord.
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Appends events to one new event file in a run folder.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// A new event file in `dir` (never an existing one: the name holds the time, the process id and a counter),
    /// starting with the file-version event; `restart_at`: the first step this writer will log after a resume,
    /// written as a `SessionLog START` so that TensorBoard drops the interrupted run's events from that step on.
    pub fn create(dir: &Path, restart_at: Option<u64>) -> Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let now = wall_time();
        let path = loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let p = dir.join(format!(
                "{EVENT_FILE_PREFIX}{:010}.diffpref.{}.{n}",
                now as u64,
                std::process::id()
            ));
            if !p.exists() {
                break p;
            }
        };
        let file = File::options()
            .create_new(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("creating TensorBoard event file {}", path.display()))?;
        let mut w = EventWriter { path, file };
        w.write_event(&Event {
            wall_time: now,
            step: 0,
            what: Some(What::FileVersion("brain.Event:2".into())),
        })?;
        if let Some(step) = restart_at {
            w.write_event(&Event {
                wall_time: now,
                step: step_i64(step),
                what: Some(What::SessionLog(SessionLog {
                    status: SESSION_START,
                })),
            })?;
        }
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event with a scalar per `(tag, value)`; non-finite values are skipped (TensorBoard would plot them as
    /// gaps or spikes; `metrics.jsonl` keeps them as `null`).
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let value: Vec<SummaryValue> = values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(tag, v)| SummaryValue {
                tag: (*tag).to_string(),
                value: Some(ValueKind::SimpleValue(*v as f32)),
            })
            .collect();
        if value.is_empty() {
            return Ok(());
        }
        self.summary(step, value)
    }

    /// One image (encoded as PNG) under `tag`.
    pub fn image(&mut self, step: u64, tag: &str, img: &image::RgbImage) -> Result<()> {
        let mut png = Vec::new();
        img.write_with_encoder(image::codecs::png::PngEncoder::new(&mut png))
            .with_context(|| format!("encoding the {tag} image for TensorBoard"))?;
        self.summary(
            step,
            vec![SummaryValue {
                tag: tag.to_string(),
                value: Some(ValueKind::Image(SummaryImage {
                    height: i32::try_from(img.height()).context("image height")?,
                    width: i32::try_from(img.width()).context("image width")?,
                    colorspace: 3,
                    encoded_image_string: png,
                })),
            }],
        )
    }

    fn summary(&mut self, step: u64, value: Vec<SummaryValue>) -> Result<()> {
        self.write_event(&Event {
            wall_time: wall_time(),
            step: step_i64(step),
            what: Some(What::Summary(Summary { value })),
        })
    }

    fn write_event(&mut self, event: &Event) -> Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(&data);
        rec.extend_from_slice(&masked_crc(&data).to_le_bytes());
        self.file
            .write_all(&rec)
            .and_then(|()| self.file.flush())
            .with_context(|| format!("writing TensorBoard event file {}", self.path.display()))
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn step_i64(step: u64) -> i64 {
    i64::try_from(step).unwrap_or(i64::MAX)
}

/// Reads every event of an event file, checking each record's framing and both checksums; an error names the
/// file and the record's byte offset. A record cut short at the end of the file (a crash while writing) is an
/// error too: this is a verifier, not a lenient reader.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let mut r = BufReader::new(
        File::open(path).with_context(|| format!("opening event file {}", path.display()))?,
    );
    let mut events = Vec::new();
    let mut offset = 0u64;
    loop {
        let mut head = [0u8; 12];
        let n = read_full(&mut r, &mut head)
            .with_context(|| format!("reading event file {}", path.display()))?;
        if n == 0 {
            return Ok(events);
        }
        let at = || format!("{}: record at byte {offset}", path.display());
        ensure!(n == 12, "{}: truncated header", at());
        let len_bytes: [u8; 8] = head[..8].try_into().expect("8 bytes");
        let crc = u32::from_le_bytes(head[8..].try_into().expect("4 bytes"));
        ensure!(
            crc == masked_crc(&len_bytes),
            "{}: length checksum mismatch",
            at()
        );
        let len = u64::from_le_bytes(len_bytes);
        ensure!(len < 1 << 31, "{}: implausible length {len}", at());
        let mut data = vec![0u8; len as usize + 4];
        ensure!(
            read_full(&mut r, &mut data)? == data.len(),
            "{}: truncated data",
            at()
        );
        let crc = u32::from_le_bytes(data[len as usize..].try_into().expect("4 bytes"));
        data.truncate(len as usize);
        ensure!(crc == masked_crc(&data), "{}: data checksum mismatch", at());
        let event = Event::decode(data.as_slice())
            .with_context(|| format!("{}: not an Event message", at()))?;
        events.push(event);
        offset += 16 + len;
    }
}

/// Reads until `buf` is full or the input ends; the number of bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The event files of a run folder, oldest first (TensorBoard's order: by name).
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(EVENT_FILE_PREFIX))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The scalars of a run folder as TensorBoard shows them: every event file in name order, a `SessionLog START`
/// at step `s` dropping what came before it at steps ≥ `s`; `(step, value)` per tag, in logging order.
pub fn read_scalars(dir: &Path) -> Result<std::collections::BTreeMap<String, Vec<(i64, f32)>>> {
    let mut out: std::collections::BTreeMap<String, Vec<(i64, f32)>> = Default::default();
    let files = event_files(dir)?;
    if files.is_empty() {
        bail!("no TensorBoard event files in {}", dir.display());
    }
    for f in files {
        for e in read_events(&f)? {
            match e.what {
                Some(What::SessionLog(s)) if s.status == SESSION_START => {
                    for v in out.values_mut() {
                        v.retain(|(step, _)| *step < e.step);
                    }
                }
                Some(What::Summary(s)) => {
                    for v in s.value {
                        if let Some(ValueKind::SimpleValue(x)) = v.value {
                            out.entry(v.tag).or_default().push((e.step, x));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // crc32c("123456789") = 0xE3069283 (the CRC-32C check value); masked as TensorFlow's MaskedCrc.
        let c: u32 = 0xE306_9283;
        assert_eq!(crc32c::crc32c(b"123456789"), c);
        assert_eq!(
            masked_crc(b"123456789"),
            c.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }

    #[test]
    fn records_round_trip_and_corruption_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), None).unwrap();
        w.scalars(3, &[("loss", 0.5), ("bad", f64::NAN)]).unwrap();
        let img =
            image::RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 7]));
        w.image(3, "grid", &img).unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        let ev = read_events(&path).unwrap();
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[0].what, Some(What::FileVersion("brain.Event:2".into())));
        let Some(What::Summary(s)) = &ev[1].what else {
            panic!("{:?}", ev[1])
        };
        assert_eq!(ev[1].step, 3);
        assert_eq!(s.value.len(), 1, "the NaN is skipped");
        assert_eq!(s.value[0].value, Some(ValueKind::SimpleValue(0.5)));
        let Some(What::Summary(s)) = &ev[2].what else {
            panic!("{:?}", ev[2])
        };
        let Some(ValueKind::Image(im)) = &s.value[0].value else {
            panic!()
        };
        assert_eq!((im.width, im.height, im.colorspace), (5, 4, 3));
        let back = image::load_from_memory(&im.encoded_image_string)
            .unwrap()
            .to_rgb8();
        assert_eq!(back, img);

        // One flipped byte inside the second record's data: its data checksum fails, named by offset.
        let mut bytes = std::fs::read(&path).unwrap();
        let first = 16 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        bytes[first + 12 + 2] ^= 1;
        let bad = dir.path().join("corrupt");
        std::fs::write(&bad, &bytes).unwrap();
        let err = format!("{:#}", read_events(&bad).unwrap_err());
        assert!(err.contains(&format!("record at byte {first}")), "{err}");
        assert!(err.contains("data checksum"), "{err}");
        // A flipped length byte: the length checksum fails.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[first] ^= 1;
        std::fs::write(&bad, &bytes).unwrap();
        let err = format!("{:#}", read_events(&bad).unwrap_err());
        assert!(err.contains("length checksum"), "{err}");
        // Cut short.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&bad, &bytes[..bytes.len() - 3]).unwrap();
        assert!(format!("{:#}", read_events(&bad).unwrap_err()).contains("truncated"));
    }

    #[test]
    fn restart_drops_the_interrupted_steps() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), None).unwrap();
        for s in 1..=5 {
            w.scalars(s, &[("loss", s as f64)]).unwrap();
        }
        drop(w);
        // Resumed from the checkpoint of step 3: steps 4 and 5 are logged again.
        let mut w = EventWriter::create(dir.path(), Some(4)).unwrap();
        for s in 4..=6 {
            w.scalars(s, &[("loss", 10.0 * s as f64)]).unwrap();
        }
        drop(w);
        assert_eq!(event_files(dir.path()).unwrap().len(), 2);
        let s = read_scalars(dir.path()).unwrap();
        assert_eq!(
            s["loss"],
            vec![
                (1, 1.0),
                (2, 2.0),
                (3, 3.0),
                (4, 40.0),
                (5, 50.0),
                (6, 60.0)
            ]
        );
    }
}
