//! Checkpoints of a run, and a Ctrl-C [`StopFlag`] so a trainer can save one and exit cleanly.
//!
//! A checkpoint is a folder `checkpoint-<step>/` under the run directory holding whatever files the caller
//! writes (e.g. `lora.safetensors`, `optimizer.safetensors`, `ema.safetensors`) plus `state.json` (a JSON value
//! the caller supplies: step, random streams, data position, config). [`Checkpointer::save`]:
//!
//! 1. writes everything into `checkpoint-<step>.tmp/`, `state.json` last, and fsyncs the files and the folder;
//! 2. renames the folder to `checkpoint-<step>/` (atomic), so a checkpoint folder is either complete or absent;
//! 3. only then prunes older checkpoints down to `keep_last`.
//!
//! A folder named `checkpoint-<step>` without `state.json` is never reported as a checkpoint. `.tmp` leftovers
//! of an interrupted save are ignored and removed by [`latest`] / [`list`].

use crate::io::{sync_dir, sync_tree};
use candle_core::{Device, Tensor, Var};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{bail, ensure, Context, Result};

/// Name of the caller's state file inside a checkpoint folder.
pub const STATE_FILE: &str = "state.json";
const PREFIX: &str = "checkpoint-";
const TMP_SUFFIX: &str = ".tmp";
const OLD_SUFFIX: &str = ".old";

/// Folder name of the checkpoint of `step`: `checkpoint-<step>`.
pub fn checkpoint_name(step: u64) -> String {
    format!("{PREFIX}{step}")
}

/// The step of a folder named `checkpoint-<step>` (digits only), else `None`.
pub fn parse_step(dir: &Path) -> Option<u64> {
    let name = dir.file_name()?.to_str()?;
    let digits = name.strip_prefix(PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Writes and prunes the checkpoints of one run directory.
#[derive(Clone, Debug)]
pub struct Checkpointer {
    pub run_dir: PathBuf,
    /// How many checkpoints to keep (the newest by step, always including the one just written); 0 keeps all.
    pub keep_last: usize,
}

impl Checkpointer {
    pub fn new(run_dir: impl Into<PathBuf>, keep_last: usize) -> Self {
        Checkpointer {
            run_dir: run_dir.into(),
            keep_last,
        }
    }

    /// Writes `checkpoint-<step>/`: `write(dir)` puts the caller's files into the (temporary) folder `dir`, then
    /// `state` is written as `state.json`, and the folder is renamed into place (see the module docs). An
    /// existing checkpoint of the same step is replaced only once the new one is complete. On error the
    /// temporary folder is removed and the existing checkpoints are untouched. Returns the final folder.
    pub fn save<F>(&self, step: u64, state: &serde_json::Value, write: F) -> Result<PathBuf>
    where
        F: FnOnce(&Path) -> Result<()>,
    {
        fs::create_dir_all(&self.run_dir)
            .with_context(|| format!("creating run directory {}", self.run_dir.display()))?;
        let name = checkpoint_name(step);
        let final_dir = self.run_dir.join(&name);
        let tmp = self.run_dir.join(format!("{name}{TMP_SUFFIX}"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp)
                .with_context(|| format!("removing stale {}", tmp.display()))?;
        }
        fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let written = (|| -> Result<()> {
            write(&tmp)
                .with_context(|| format!("writing checkpoint files into {}", tmp.display()))?;
            crate::io::write_json(&tmp.join(STATE_FILE), state)?;
            sync_tree(&tmp)
        })();
        if let Err(e) = written {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }

        // Replace an existing checkpoint of the same step only after the new one is complete.
        let old = self.run_dir.join(format!("{name}{OLD_SUFFIX}"));
        if final_dir.exists() {
            if old.exists() {
                fs::remove_dir_all(&old)
                    .with_context(|| format!("removing stale {}", old.display()))?;
            }
            fs::rename(&final_dir, &old).with_context(|| {
                format!("moving {} aside to {}", final_dir.display(), old.display())
            })?;
        }
        fs::rename(&tmp, &final_dir)
            .with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()))?;
        sync_dir(&self.run_dir);
        if old.exists() {
            fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        self.prune(step)?;
        Ok(final_dir)
    }

    /// Removes checkpoints beyond `keep_last`: keeps `keep`, plus the `keep_last − 1` highest other steps.
    fn prune(&self, keep: u64) -> Result<()> {
        if self.keep_last == 0 {
            return Ok(());
        }
        let others: Vec<(u64, PathBuf)> = list(&self.run_dir)?
            .into_iter()
            .filter(|(s, _)| *s != keep)
            .collect();
        let n_remove = others.len().saturating_sub(self.keep_last - 1);
        for (_, dir) in others.into_iter().take(n_remove) {
            fs::remove_dir_all(&dir)
                .with_context(|| format!("pruning old checkpoint {}", dir.display()))?;
        }
        Ok(())
    }
}

/// Complete checkpoints of `run_dir` (folders `checkpoint-<step>` holding `state.json`), sorted by step.
/// Leftovers of interrupted saves (`checkpoint-<step>.tmp`) are removed; a `checkpoint-<step>.old` left by a
/// save interrupted while replacing the same step is moved back if its replacement is missing, else removed.
/// A missing `run_dir` has no checkpoints.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(run_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", run_dir.display())),
    };
    let mut out = Vec::new();
    let mut olds = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", run_dir.display()))?;
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if !name.starts_with(PREFIX) || !path.is_dir() {
            continue;
        }
        if let Some(base) = name.strip_suffix(TMP_SUFFIX) {
            if parse_step(Path::new(base)).is_some() {
                fs::remove_dir_all(&path).with_context(|| {
                    format!("removing incomplete checkpoint {}", path.display())
                })?;
            }
            continue;
        }
        if let Some(base) = name.strip_suffix(OLD_SUFFIX) {
            if parse_step(Path::new(base)).is_some() {
                olds.push((path, run_dir.join(base)));
            }
            continue;
        }
        if let Some(step) = parse_step(&path) {
            if path.join(STATE_FILE).is_file() {
                out.push((step, path));
            }
        }
    }
    for (old, target) in olds {
        if target.join(STATE_FILE).is_file() {
            fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        } else if old.join(STATE_FILE).is_file() {
            if target.exists() {
                fs::remove_dir_all(&target)
                    .with_context(|| format!("removing incomplete {}", target.display()))?;
            }
            fs::rename(&old, &target)
                .with_context(|| format!("restoring {} to {}", old.display(), target.display()))?;
            if let Some(step) = parse_step(&target) {
                out.push((step, target));
            }
        }
    }
    out.sort_by_key(|(s, _)| *s);
    Ok(out)
}

/// The checkpoint with the highest step in `run_dir`, if any (see [`list`], which also cleans up leftovers).
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(run_dir)?.pop().map(|(_, p)| p))
}

/// Reads `state.json` of a checkpoint folder.
pub fn load_state(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&path)
        .with_context(|| format!("reading checkpoint state {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("checkpoint state {} is not valid JSON", path.display()))
}

// ---------------------------------------------------------------------------
// Ctrl-C
// ---------------------------------------------------------------------------

/// A shared "please stop" flag. [`StopFlag::install`] sets it on the first Ctrl-C (SIGINT); the trainer checks
/// [`StopFlag::is_set`] between steps, saves a checkpoint and returns. A second Ctrl-C exits at once (code 130).
#[derive(Clone, Debug, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// A flag not connected to any signal (for tests and library use).
    pub fn new() -> Self {
        Self::default()
    }

    /// The process-wide flag set by Ctrl-C; installs the handler on the first call, later calls return the same
    /// flag. Errors if another Ctrl-C handler was installed by other code.
    pub fn install() -> Result<StopFlag> {
        static GLOBAL: OnceLock<std::result::Result<StopFlag, String>> = OnceLock::new();
        let r = GLOBAL.get_or_init(|| {
            let flag = StopFlag::new();
            let handler_flag = flag.clone();
            ctrlc::set_handler(move || {
                if handler_flag.0.swap(true, Ordering::SeqCst) {
                    eprintln!("\ninterrupted again: exiting without saving");
                    std::process::exit(130);
                }
                eprintln!(
                    "\ninterrupt: stopping after the current step and saving a checkpoint \
                     (Ctrl-C again to exit at once)"
                );
            })
            .map(|()| flag)
            .map_err(|e| e.to_string())
        });
        match r {
            Ok(f) => Ok(f.clone()),
            Err(e) => bail!("installing the Ctrl-C handler: {e}"),
        }
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn clear(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Errors unless `dir` is a complete checkpoint folder (named `checkpoint-<step>`, holding `state.json`);
/// returns its step.
pub fn validate(dir: &Path) -> Result<u64> {
    let step = parse_step(dir).with_context(|| {
        format!(
            "{} is not a checkpoint folder (expected a name like checkpoint-<step>)",
            dir.display()
        )
    })?;
    ensure!(
        dir.join(STATE_FILE).is_file(),
        "checkpoint {} is incomplete: {STATE_FILE} is missing",
        dir.display()
    );
    Ok(step)
}

/// Writes trainable vars (name → current value) as safetensors, atomically, for checkpoints and exports.
pub fn save_vars(path: &Path, params: &[(String, Var)]) -> Result<()> {
    let tensors: Vec<(&str, Tensor)> = params
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_tensor().detach()))
        .collect();
    crate::io::save_safetensors(path, &tensors)
}

/// Restores trainable vars from a file written by [`save_vars`]; errors name the file, a missing name or
/// both shapes.
pub fn load_vars(path: &Path, params: &[(String, Var)]) -> Result<()> {
    let map = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read {}", path.display()))?;
    for (n, v) in params {
        let t = map
            .get(n)
            .with_context(|| format!("{}: missing tensor `{n}`", path.display()))?;
        ensure!(
            t.dims() == v.dims(),
            "{}: `{n}` has shape {:?}, expected {:?}",
            path.display(),
            t.dims(),
            v.dims()
        );
        v.set(&t.to_dtype(v.dtype())?.to_device(v.device())?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write_file(name: &'static str, body: &'static str) -> impl FnOnce(&Path) -> Result<()> {
        move |d: &Path| Ok(fs::write(d.join(name), body)?)
    }

    #[test]
    fn save_is_atomic_and_latest_ignores_tmp() {
        let run = tempfile::tempdir().unwrap();
        let ck = Checkpointer::new(run.path(), 0);
        assert_eq!(latest(run.path()).unwrap(), None);
        let d = ck
            .save(
                10,
                &json!({"step": 10}),
                write_file("lora.safetensors", "A"),
            )
            .unwrap();
        assert_eq!(d, run.path().join("checkpoint-10"));
        assert_eq!(fs::read_to_string(d.join("lora.safetensors")).unwrap(), "A");
        assert_eq!(load_state(&d).unwrap()["step"], 10);
        assert_eq!(validate(&d).unwrap(), 10);

        // A crash mid-save leaves a .tmp folder (even of a higher step): ignored and removed.
        let tmp = run.path().join("checkpoint-20.tmp");
        fs::create_dir(&tmp).unwrap();
        fs::write(tmp.join(STATE_FILE), "{}").unwrap();
        // And a folder without state.json is not a checkpoint.
        fs::create_dir(run.path().join("checkpoint-30")).unwrap();
        assert_eq!(latest(run.path()).unwrap(), Some(d.clone()));
        assert!(!tmp.exists());
        assert!(validate(&run.path().join("checkpoint-30")).is_err());

        // A failing writer leaves no trace and keeps the previous checkpoint.
        let err = ck
            .save(40, &json!({}), |_: &Path| bail!("disk full"))
            .unwrap_err();
        assert!(format!("{err:#}").contains("disk full"));
        assert!(!run.path().join("checkpoint-40.tmp").exists());
        assert!(!run.path().join("checkpoint-40").exists());
        assert_eq!(latest(run.path()).unwrap(), Some(d));
    }

    #[test]
    fn keep_last_prunes_older() {
        let run = tempfile::tempdir().unwrap();
        let ck = Checkpointer::new(run.path(), 2);
        for s in [100, 200, 300, 400] {
            ck.save(s, &json!({"step": s}), |_: &Path| Ok(())).unwrap();
        }
        let steps: Vec<u64> = list(run.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, vec![300, 400]);
        // Re-saving an existing step replaces it, and the one just written is always kept.
        ck.save(300, &json!({"step": 300, "again": true}), |_: &Path| Ok(()))
            .unwrap();
        assert_eq!(
            load_state(&run.path().join("checkpoint-300")).unwrap()["again"],
            true
        );
        assert_eq!(list(run.path()).unwrap().len(), 2);
        let ck1 = Checkpointer::new(run.path(), 1);
        ck1.save(250, &json!({}), |_: &Path| Ok(())).unwrap();
        let steps: Vec<u64> = list(run.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, vec![250]);
        // Unrelated files in the run dir are left alone.
        fs::write(run.path().join("metrics.jsonl"), "").unwrap();
        ck1.save(260, &json!({}), |_: &Path| Ok(())).unwrap();
        assert!(run.path().join("metrics.jsonl").exists());
    }

    #[test]
    fn interrupted_replacement_is_recovered() {
        let run = tempfile::tempdir().unwrap();
        let ck = Checkpointer::new(run.path(), 0);
        ck.save(5, &json!({"v": 1}), |_: &Path| Ok(())).unwrap();
        // Simulate a crash between moving checkpoint-5 aside and renaming its replacement into place.
        fs::rename(
            run.path().join("checkpoint-5"),
            run.path().join("checkpoint-5.old"),
        )
        .unwrap();
        let l = latest(run.path()).unwrap().unwrap();
        assert_eq!(l, run.path().join("checkpoint-5"));
        assert_eq!(load_state(&l).unwrap()["v"], 1);
        assert!(!run.path().join("checkpoint-5.old").exists());
    }

    #[test]
    fn parse_and_stop_flag() {
        assert_eq!(parse_step(Path::new("/x/checkpoint-42")), Some(42));
        assert_eq!(parse_step(Path::new("checkpoint-42.tmp")), None);
        assert_eq!(parse_step(Path::new("checkpoint-")), None);
        assert_eq!(parse_step(Path::new("ckpt-1")), None);
        let f = StopFlag::new();
        let g = f.clone();
        assert!(!f.is_set());
        g.set();
        assert!(f.is_set());
        f.clear();
        assert!(!g.is_set());
        let a = StopFlag::install().unwrap();
        let b = StopFlag::install().unwrap();
        a.set();
        assert!(b.is_set());
        a.clear();
    }
}
