//! The one way diffpref writes files: atomically and durably.
//!
//! Every file is written into a uniquely named hidden temporary file in the destination's folder
//! (`.<name>.<pid>-<n>.tmp`), flushed and fsynced, then renamed over the destination, and the folder entry is
//! fsynced too. A reader (this process, another one, or the next run after a crash or power loss) sees either
//! the old file (or none) or the whole new one, never a torn one. On any error the temporary file is removed
//! and the destination is untouched. Folders (a model, a checkpoint) are built the same way as a temporary
//! sibling folder, synced file by file, and renamed into place ([`write_dir_atomic`]).
//!
//! The one exception is `metrics.jsonl`, an append-only log ([`crate::train::metrics::MetricsWriter`]): a
//! crash can only cut its last line, which the reader skips.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The folder `path` lives in (`.` for a bare file name).
fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A unique temporary path next to `path`: `.<name>.<pid>-<counter>.tmp` (or `.tmpdir` for folders).
fn temp_sibling(path: &Path, suffix: &str) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?
        .to_string_lossy();
    Ok(parent_of(path).join(format!(
        ".{name}.{}-{}.{suffix}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )))
}

/// Removes a temporary file or folder on drop unless it was committed.
struct TempPath {
    path: Option<PathBuf>,
    dir: bool,
}

impl TempPath {
    fn commit(mut self) {
        self.path = None;
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = if self.dir {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
        }
    }
}

/// Best effort: persists a folder's entries (a rename, a new file) on Unix.
pub fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// fsyncs every file below `dir`, then the folders themselves.
pub fn sync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            File::open(&path)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("syncing {}", path.display()))?;
        }
    }
    sync_dir(dir);
    Ok(())
}

/// Writes `path` atomically with a writer: `write` fills a buffered temporary file, which is then flushed,
/// fsynced and renamed over `path` (parent folders are created). See the module docs.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
) -> Result<()> {
    write_atomic_path(path, |tmp| {
        let file = File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = BufWriter::new(file);
        write(&mut w)?;
        w.flush()
            .with_context(|| format!("writing {}", tmp.display()))?;
        Ok(())
    })
}

/// Writes `path` atomically through a temporary path: `write(tmp)` creates the file `tmp` (for writers that
/// take a path, such as safetensors'), which is then fsynced and renamed over `path`.
pub fn write_atomic_path(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = parent_of(path);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = temp_sibling(path, "tmp")?;
    let guard = TempPath {
        path: Some(tmp.clone()),
        dir: false,
    };
    write(&tmp).with_context(|| format!("cannot write {}", path.display()))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    guard.commit();
    sync_dir(&dir);
    Ok(())
}

/// Writes `bytes` to `path` atomically (see the module docs).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| {
        w.write_all(bytes)?;
        Ok(())
    })
}

/// Writes `value` as pretty JSON (with a final newline) to `path`, atomically.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)? + "\n";
    write_atomic(path, text.as_bytes())
}

/// Copies the file `src` to `dst`, atomically.
pub fn copy_atomic(src: &Path, dst: &Path) -> Result<()> {
    let bytes = fs::read(src).with_context(|| format!("cannot read {}", src.display()))?;
    write_atomic(dst, &bytes)
}

/// Writes named tensors (moved to the CPU, made contiguous, dtypes kept) as safetensors, atomically.
pub fn save_safetensors<S: AsRef<str>>(path: &Path, tensors: &[(S, Tensor)]) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| {
            Ok((
                k.as_ref().to_string(),
                v.to_device(&Device::Cpu)?.contiguous()?,
            ))
        })
        .collect::<Result<_>>()?;
    write_atomic_path(path, |tmp| {
        candle_core::safetensors::save(&map, tmp)?;
        Ok(())
    })
}

/// Named tensors read back from a safetensors file (e.g. what [`save_safetensors`] wrote into a checkpoint),
/// with errors naming the file.
pub struct SavedTensors {
    map: HashMap<String, Tensor>,
    path: std::path::PathBuf,
}

impl SavedTensors {
    /// Reads `path` onto `device`; `what` names the file's content in the error.
    pub fn load(path: &Path, device: &Device, what: &str) -> Result<SavedTensors> {
        let map = candle_core::safetensors::load(path, device)
            .with_context(|| format!("reading {what} {}", path.display()))?;
        Ok(SavedTensors {
            map,
            path: path.to_path_buf(),
        })
    }

    /// The tensor `key` split along its first dimension (a stacked list, as the checkpoints store them).
    pub fn rows(&self, key: &str) -> Result<Vec<Tensor>> {
        let t = self
            .map
            .get(key)
            .with_context(|| format!("{}: no tensor `{key}`", self.path.display()))?;
        Ok((0..t.dim(0)?)
            .map(|i| t.get(i))
            .collect::<candle_core::Result<_>>()?)
    }
}

/// Writes a folder atomically: `fill(tmp)` populates a temporary sibling folder, whose files are fsynced
/// before it is renamed to `dst`. An existing `dst` is replaced only once the new folder is complete (moved
/// aside, then removed); on error the temporary folder is removed and `dst` is untouched.
pub fn write_dir_atomic(dst: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = parent_of(dst);
    fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = temp_sibling(dst, "tmpdir")?;
    fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let guard = TempPath {
        path: Some(tmp.clone()),
        dir: true,
    };
    fill(&tmp)?;
    sync_tree(&tmp)?;
    let old = temp_sibling(dst, "old")?;
    let replaced = dst.exists();
    if replaced {
        fs::rename(dst, &old)
            .with_context(|| format!("cannot move the old {} aside", dst.display()))?;
    }
    if let Err(e) = fs::rename(&tmp, dst) {
        if replaced {
            let _ = fs::rename(&old, dst);
        }
        return Err(e)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), dst.display()));
    }
    guard.commit();
    sync_dir(&parent);
    if replaced {
        fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::bail;

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with('.'))
            .collect()
    }

    #[test]
    fn writes_replace_whole_files_and_leave_no_temporaries() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/a.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        write_json(&p, &serde_json::json!({"k": 1})).unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "{\n  \"k\": 1\n}\n");
        assert!(leftovers(&d.path().join("sub")).is_empty());
    }

    #[test]
    fn a_failing_writer_keeps_the_old_file_and_removes_its_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.bin");
        write_atomic(&p, b"old").unwrap();
        let mut tmp_seen = None;
        let err = write_atomic_with(&p, |w| {
            w.write_all(b"half of the new")?;
            w.flush()?;
            tmp_seen = Some(leftovers(d.path()));
            bail!("disk full")
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("disk full"), "{err:#}");
        // The temporary was a hidden sibling named after the file, and it is gone.
        let seen = tmp_seen.unwrap();
        assert_eq!(seen.len(), 1);
        assert!(
            seen[0].starts_with(".a.bin.") && seen[0].ends_with(".tmp"),
            "{seen:?}"
        );
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert!(leftovers(d.path()).is_empty());
        // The same through a path-taking writer.
        assert!(write_atomic_path(&p, |t| {
            fs::write(t, "x")?;
            bail!("encoder failed")
        })
        .is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert!(leftovers(d.path()).is_empty());
    }

    #[test]
    fn folders_are_replaced_only_when_complete() {
        let d = tempfile::tempdir().unwrap();
        let dst = d.path().join("model");
        write_dir_atomic(&dst, |t| Ok(fs::write(t.join("w"), "1")?)).unwrap();
        assert!(write_dir_atomic(&dst, |t| {
            fs::write(t.join("w"), "2")?;
            bail!("export failed")
        })
        .is_err());
        assert_eq!(fs::read_to_string(dst.join("w")).unwrap(), "1");
        write_dir_atomic(&dst, |t| Ok(fs::write(t.join("v"), "3")?)).unwrap();
        assert!(!dst.join("w").exists());
        assert_eq!(fs::read_to_string(dst.join("v")).unwrap(), "3");
        assert!(leftovers(d.path()).is_empty());
    }

    #[test]
    fn safetensors_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.safetensors");
        let t = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
        save_safetensors(&p, &[("x", t)]).unwrap();
        let back = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
        assert_eq!(back["x"].to_vec1::<f32>().unwrap(), vec![1., 2., 3.]);
    }
}
