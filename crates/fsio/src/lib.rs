//! Crash-safe files and folders, and the stable hashes that key optimsyn's caches and random
//! streams, in one small crate with no heavy dependencies so that every crate (the libtorch ones
//! included) can share them.
//!
//! - [`write_atomic`]: a file is either its old contents or the complete new ones, and survives a
//!   power loss once the call returns (file and folder are both synced).
//! - [`publish_dir`]: a finished temporary folder replaces a checkpoint folder without a moment in
//!   which neither the old nor the new checkpoint exists on disk.
//! - [`hash`]: FNV-1a and the SplitMix64 finalizer, bit-identical to the copies they replace.
#![deny(missing_docs)]

pub mod hash;

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The one error of this crate: an operating-system call failed on a named path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or folder could not be created, written, synced, renamed or removed.
    #[error("{}: {action}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What was being done ("cannot write temporary file", …).
        action: &'static str,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io {
        path,
        action,
        source,
    }
}

/// The folder holding `path` (`.` for a bare file name).
fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A hidden sibling of `path` named `.{name}.{tag}-{pid}`: same folder, so a rename never crosses
/// file systems, and per process, so two processes never share one.
fn sibling(path: &Path, tag: &str) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| Error::Io {
        path: path.to_path_buf(),
        action: "not a file or folder name",
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no final name"),
    })?;
    let mut s = std::ffi::OsString::from(".");
    s.push(name);
    s.push(format!(".{tag}-{}", std::process::id()));
    Ok(parent_of(path).join(s))
}

/// Syncs a folder, so that renames and creations in it survive a power loss. Platforms that cannot
/// open a folder (Windows) have nothing to sync this way; the error is ignored there only.
pub fn sync_dir(dir: &Path) -> Result<()> {
    match File::open(dir) {
        Ok(d) => d.sync_all().map_err(io("cannot sync folder", dir)),
        Err(_) if cfg!(windows) => Ok(()),
        Err(e) => Err(io("cannot open folder to sync it", dir)(e)),
    }
}

/// Writes a whole file atomically and durably: to a temporary sibling, synced, renamed over `path`,
/// then the folder synced. A reader (or a restart after a crash) sees the old file or the complete
/// new one, never a torn one; once this returns, the new one is on disk.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    let tmp = sibling(path, "tmp")?;
    let result = (|| {
        let mut f = File::create(&tmp).map_err(io("cannot create temporary file", &tmp))?;
        f.write_all(bytes)
            .map_err(io("cannot write temporary file", &tmp))?;
        f.sync_all()
            .map_err(io("cannot sync temporary file", &tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(io("cannot rename temporary file over", path))
    })();
    if result.is_err() {
        // Best effort: the temporary file is ours and useless now; the error above is the news.
        let _ = fs::remove_file(&tmp);
        return result;
    }
    sync_dir(&parent_of(path))
}

/// Syncs every file and folder under `dir` (and `dir` itself), so that a folder about to be
/// published is on disk whatever wrote it.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(io("cannot list", dir))? {
        let entry = entry.map_err(io("cannot list", dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io("cannot stat", &path))?;
        if kind.is_dir() {
            sync_tree(&path)?;
        } else if kind.is_file() {
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io("cannot sync", &path))?;
        }
    }
    sync_dir(dir)
}

/// Publishes the finished folder `tmp` as `dir` (both in the same parent folder).
///
/// `tmp` is synced first. If `dir` exists it is renamed aside to a hidden sibling, `tmp` is renamed
/// to `dir`, the parent is synced, and only then is the old folder removed: at every moment the old
/// or the new checkpoint is complete on disk (between the two renames under the hidden name; a
/// crash exactly there leaves it as `.{name}.old-{pid}`). Unlike removing `dir` before the rename,
/// no crash can lose both.
pub fn publish_dir(tmp: impl AsRef<Path>, dir: impl AsRef<Path>) -> Result<()> {
    let (tmp, dir) = (tmp.as_ref(), dir.as_ref());
    sync_tree(tmp)?;
    let aside = sibling(dir, "old")?;
    if aside.exists() {
        // Left by an earlier publish of this process id that crashed after publishing; stale.
        fs::remove_dir_all(&aside).map_err(io("cannot remove stale folder", &aside))?;
    }
    let had_old = dir.exists();
    if had_old {
        fs::rename(dir, &aside).map_err(io("cannot move the old folder aside", dir))?;
    }
    if let Err(e) = fs::rename(tmp, dir) {
        if had_old {
            // Put the old checkpoint back so that a failed publish changes nothing.
            let _ = fs::rename(&aside, dir);
        }
        return Err(io("cannot move the new folder into place", dir)(e));
    }
    sync_dir(&parent_of(dir))?;
    if had_old {
        fs::remove_dir_all(&aside).map_err(io("cannot remove the old folder", &aside))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.json")]);
    }

    #[test]
    fn write_atomic_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing").join("a.json");
        let e = write_atomic(&p, b"x").unwrap_err().to_string();
        assert!(e.contains("missing") && e.contains("cannot create"), "{e}");
    }

    #[test]
    fn publish_dir_replaces_an_existing_folder() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("checkpoint-3");
        for (content, fresh) in [("old", true), ("new", false)] {
            let tmp = root.path().join("checkpoint-3.tmp");
            fs::create_dir_all(tmp.join("sub")).unwrap();
            write_atomic(tmp.join("state.json"), content.as_bytes()).unwrap();
            write_atomic(tmp.join("sub").join("x"), b"x").unwrap();
            assert_eq!(dir.exists(), !fresh);
            publish_dir(&tmp, &dir).unwrap();
            assert!(!tmp.exists());
            assert_eq!(fs::read_to_string(dir.join("state.json")).unwrap(), content);
        }
        let names: Vec<_> = fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("checkpoint-3")]);
    }

    #[test]
    fn failed_publish_keeps_the_old_folder() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("checkpoint-1");
        fs::create_dir(&dir).unwrap();
        write_atomic(dir.join("f"), b"old").unwrap();
        let e = publish_dir(root.path().join("absent"), &dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent"), "{e}");
        assert_eq!(fs::read(dir.join("f")).unwrap(), b"old");
    }
}
