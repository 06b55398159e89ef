//! The one rule for every folder (or file) a command writes: never into or over the command's own inputs,
//! and never into a non-empty folder that is not the command's own earlier output unless the user says
//! `overwrite`.
//!
//! A command marks the folders it creates with a small file, [`MARKER`], holding its name (`train dpo`,
//! `pretrain`, `data make-prefs`, ...). A later run of the same command may write there again (resume a run,
//! re-export, overwrite its own report); anything else — a folder of the user's files, another command's
//! output, a model folder, a parent such as `runs/` — is refused with the path and the reason, before any
//! expensive work. Paths are compared after resolving symlinks, `.` and `..`, so `out/../model` is `model`.

use anyhow::{bail, Context, Result};
use std::path::{Component, Path, PathBuf};

/// The marker file a command leaves in the folders it writes.
pub const MARKER: &str = ".diffpref-output";

/// Something a command reads, which its output must not overwrite.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    /// What it is, for the message (`model`, `[eval] prompts file`, ...).
    pub what: &'a str,
    pub path: &'a Path,
    /// The output may lie inside it (e.g. a run folder holding the exported model); it may still not be it or
    /// a parent of it.
    pub may_hold_output: bool,
}

impl<'a> Input<'a> {
    /// An input the output may not be, contain or lie inside.
    pub fn new(what: &'a str, path: &'a Path) -> Self {
        Input {
            what,
            path,
            may_hold_output: false,
        }
    }

    /// An input the output may lie inside but not be or contain.
    pub fn holder(what: &'a str, path: &'a Path) -> Self {
        Input {
            what,
            path,
            may_hold_output: true,
        }
    }
}

/// A folder a command is about to write.
#[derive(Clone, Debug)]
pub struct OutputDir<'a> {
    /// The folder.
    pub path: &'a Path,
    /// How the user named it (`output_dir`, `--out`, `run_dir`): errors say this.
    pub key: &'a str,
    /// The command writing it (`train dpo`, `pretrain`, ...): the marker's content.
    pub command: &'a str,
    /// Files whose presence marks an earlier output of this command written before markers existed (e.g. a
    /// run folder's `metrics.jsonl`).
    pub legacy: &'a [&'a str],
}

impl OutputDir<'_> {
    /// Refuses `self` when it is, contains or lies inside one of `inputs` (inputs that do not exist locally,
    /// such as hub ids, are skipped; [`Input::holder`]s may hold it), when it is a file, or when it is a
    /// non-empty folder that this command did not write and `overwrite` is false.
    pub fn check(&self, inputs: &[Input], overwrite: bool) -> Result<()> {
        let out = resolve(self.path)?;
        let shown = self.path.display();
        for input in inputs {
            if !input.path.exists() {
                continue;
            }
            let inp = resolve(input.path)?;
            let relation = if out == inp {
                "is"
            } else if out.starts_with(&inp) && !input.may_hold_output {
                "lies inside"
            } else if inp.starts_with(&out) {
                "contains"
            } else {
                continue;
            };
            bail!(
                "{} {shown} {relation} the {} {}: writing there could destroy it; choose another folder",
                self.key,
                input.what,
                input.path.display()
            );
        }
        let cwd = resolve(Path::new("."))?;
        if cwd.starts_with(&out) {
            bail!(
                "{} {shown} is or contains the working directory: choose a folder of its own",
                self.key
            );
        }
        if !self.path.exists() {
            return Ok(());
        }
        if !self.path.is_dir() {
            bail!(
                "{} {shown} is a file, not a folder; choose another path",
                self.key
            );
        }
        let mut entries = std::fs::read_dir(self.path)
            .with_context(|| format!("{} {shown}: cannot read the folder", self.key))?;
        if entries.next().is_none() || overwrite || self.is_own()? {
            return Ok(());
        }
        bail!(
            "{} {shown} exists, is not empty and was not written by `diffpref {}`: choose a new folder, or pass \
             --overwrite to write into it anyway",
            self.key,
            self.command
        )
    }

    /// Whether the folder holds this command's marker (or one of its legacy files).
    fn is_own(&self) -> Result<bool> {
        let marker = self.path.join(MARKER);
        if marker.is_file() {
            let text = std::fs::read_to_string(&marker)
                .with_context(|| format!("cannot read {}", marker.display()))?;
            return Ok(text.trim() == self.command);
        }
        Ok(self.legacy.iter().any(|f| self.path.join(f).exists()))
    }

    /// Creates the folder (and its parents) and leaves the command's marker in it.
    pub fn create(&self) -> Result<()> {
        std::fs::create_dir_all(self.path)
            .with_context(|| format!("{} {}: cannot create it", self.key, self.path.display()))?;
        mark(self.path, self.command)
            .with_context(|| format!("{} {}", self.key, self.path.display()))
    }
}

/// Writes the marker of `command` into `dir` (atomically; e.g. inside a folder being built by
/// [`crate::io::write_dir_atomic`]).
pub fn mark(dir: &Path, command: &str) -> Result<()> {
    crate::io::write_atomic(&dir.join(MARKER), format!("{command}\n").as_bytes())
}

/// Refuses to write the file `out` (named `key`) when it is one of `inputs` or lies inside one of them (a
/// folder input), or when it is a folder.
pub fn check_output_file(out: &Path, key: &str, inputs: &[Input]) -> Result<()> {
    let o = resolve(out)?;
    for input in inputs {
        if !input.path.exists() {
            continue;
        }
        let i = resolve(input.path)?;
        if o == i || (o.starts_with(&i) && !input.may_hold_output) {
            bail!(
                "{key} {} {} the {} {}: writing it would destroy an input; choose another path",
                out.display(),
                if o == i { "is" } else { "lies inside" },
                input.what,
                input.path.display()
            );
        }
    }
    if out.is_dir() {
        bail!("{key} {} is a folder, not a file", out.display());
    }
    Ok(())
}

/// `p` made absolute, `.` and `..` removed, and its longest existing prefix with symlinks resolved.
pub fn resolve(p: &Path) -> Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .context("cannot read the working directory")?
            .join(p)
    };
    let mut lexical = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                lexical.pop();
            }
            c => lexical.push(c),
        }
    }
    let mut existing = lexical.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match existing.file_name() {
            Some(name) => rest.push(name.to_os_string()),
            None => break,
        }
        existing.pop();
    }
    let mut out = existing.canonicalize().unwrap_or(existing);
    for name in rest.into_iter().rev() {
        out.push(name);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir<'a>(path: &'a Path) -> OutputDir<'a> {
        OutputDir {
            path,
            key: "--out",
            command: "data render",
            legacy: &["manifest.jsonl"],
        }
    }

    #[test]
    fn new_empty_and_own_folders_pass_others_are_refused_unless_overwrite() {
        let t = tempfile::tempdir().unwrap();
        let fresh = t.path().join("a/b");
        dir(&fresh).check(&[], false).unwrap();
        dir(&fresh).create().unwrap();
        dir(&fresh).check(&[], false).unwrap();
        std::fs::write(fresh.join("x.png"), b"img").unwrap();
        // Own output (the marker): fine.
        dir(&fresh).check(&[], false).unwrap();
        // Another command's folder, or a folder of the user's files: refused, naming the key and the path.
        let mut other = dir(&fresh);
        other.command = "pretrain";
        let e = other.check(&[], false).unwrap_err().to_string();
        assert!(
            e.contains("--out") && e.contains("not empty") && e.contains("pretrain"),
            "{e}"
        );
        other.check(&[], true).unwrap();
        let user = t.path().join("photos");
        std::fs::create_dir(&user).unwrap();
        std::fs::write(user.join("me.jpg"), b"x").unwrap();
        assert!(dir(&user).check(&[], false).is_err());
        // A legacy output (written before markers) is recognised by its files.
        std::fs::write(user.join("manifest.jsonl"), b"").unwrap();
        dir(&user).check(&[], false).unwrap();
        // A file is not a folder.
        let e = dir(&user.join("me.jpg"))
            .check(&[], true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a file"), "{e}");
    }

    #[test]
    fn inputs_their_parents_and_children_are_refused_also_through_dot_dot() {
        let t = tempfile::tempdir().unwrap();
        let model = t.path().join("model");
        std::fs::create_dir_all(model.join("unet")).unwrap();
        let inputs = [Input::new("model", &model)];
        for (out, rel) in [
            (model.clone(), "is"),
            (model.join("unet"), "lies inside"),
            (t.path().to_path_buf(), "contains"),
            (t.path().join("x/../model"), "is"),
            (model.join("new/run"), "lies inside"),
        ] {
            let e = dir(&out).check(&inputs, true).unwrap_err().to_string();
            assert!(e.contains(rel) && e.contains("model"), "{out:?}: {e}");
        }
        dir(&t.path().join("elsewhere"))
            .check(&inputs, false)
            .unwrap();
        // Hub ids (no such local path) are not compared.
        dir(&t.path().join("out"))
            .check(&[Input::new("model", Path::new("org/some-model"))], false)
            .unwrap();
        // Files.
        let list = t.path().join("prompts.txt");
        std::fs::write(&list, "a red circle\n").unwrap();
        let e = check_output_file(&list, "--out", &[Input::new("--exclude file", &list)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--out") && e.contains("--exclude"), "{e}");
        check_output_file(
            &t.path().join("new.txt"),
            "--out",
            &[Input::new("--exclude file", &list)],
        )
        .unwrap();
        // A holder may hold the output, not be it or be inside it.
        let run = t.path().join("run");
        std::fs::create_dir(&run).unwrap();
        let holder = [Input::holder("run_dir", &run)];
        dir(&run.join("model")).check(&holder, false).unwrap();
        assert!(dir(&run).check(&holder, false).is_err());
        assert!(dir(t.path()).check(&holder, false).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_are_resolved() {
        let t = tempfile::tempdir().unwrap();
        let model = t.path().join("model");
        std::fs::create_dir(&model).unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&model, &link).unwrap();
        let e = dir(&link.join("sub"))
            .check(&[Input::new("model", &model)], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lies inside"), "{e}");
    }
}
