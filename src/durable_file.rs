//! Files the daemon writes beside the store, written so that a power cut leaves either the old
//! contents or the new ones, never a mix or an empty file: the bytes go to a temporary file
//! beside the target (`<name>.tmp`), which is fsync'd, renamed over the target, and the
//! directory fsync'd (so the rename itself survives).
//!
//! Every such file goes through [`write`] (or [`write_private`], 0600): the district epoch
//! ([`crate::epoch`]), the pseudonym, sealing and care keys ([`crate::keys`]), the installer's
//! device requests and their answers ([`crate::devices`]). The store is redb's to make durable.
//! The order of the calls is tested through [`FsOps`], the seam the real calls go through.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Replace `path` with `bytes` durably: `<path>.tmp` written and fsync'd, renamed over `path`,
/// the directory fsync'd. A new file gets the default mode (0666 less the umask).
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_with(&mut RealFs, path, bytes, 0o666)
}

/// As [`write`], for a file only its owner may read (0600 from its creation: keys).
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_with(&mut RealFs, path, bytes, 0o600)
}

/// The temporary file [`write`] uses for `path`: its name with `.tmp` appended, beside it.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// The file-system calls a durable write makes. [`RealFs`] makes them; a test records them.
pub(crate) trait FsOps {
    /// An open file.
    type File;
    /// Create (or truncate) `path` for writing, with `mode` if it is new.
    fn create(&mut self, path: &Path, mode: u32) -> io::Result<Self::File>;
    /// Write all of `bytes` to `file`.
    fn write_all(&mut self, file: &mut Self::File, bytes: &[u8]) -> io::Result<()>;
    /// fsync `file` (data and metadata).
    fn sync_file(&mut self, file: &mut Self::File) -> io::Result<()>;
    /// Rename `from` over `to`.
    fn rename(&mut self, from: &Path, to: &Path) -> io::Result<()>;
    /// fsync the directory `dir` (its entries: the rename).
    fn sync_dir(&mut self, dir: &Path) -> io::Result<()>;
}

/// The real calls.
pub(crate) struct RealFs;

impl FsOps for RealFs {
    type File = fs::File;

    fn create(&mut self, path: &Path, mode: u32) -> io::Result<fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
    }

    fn write_all(&mut self, file: &mut fs::File, bytes: &[u8]) -> io::Result<()> {
        file.write_all(bytes)
    }

    fn sync_file(&mut self, file: &mut fs::File) -> io::Result<()> {
        file.sync_all()
    }

    fn rename(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn sync_dir(&mut self, dir: &Path) -> io::Result<()> {
        fs::File::open(dir)?.sync_all()
    }
}

/// [`write`] through `ops`: write the temporary file, fsync it, close it, rename it over
/// `path`, fsync the directory. Stops at the first failure (the target is then untouched,
/// unless the failure was the directory's fsync, after the rename).
pub(crate) fn write_with<F: FsOps>(
    ops: &mut F,
    path: &Path,
    bytes: &[u8],
    mode: u32,
) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = tmp_path(path);
    {
        let mut f = ops.create(&tmp, mode)?;
        ops.write_all(&mut f, bytes)?;
        ops.sync_file(&mut f)?;
    }
    ops.rename(&tmp, path)?;
    ops.sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Create(PathBuf, u32),
        Write(usize),
        SyncFile,
        Rename(PathBuf, PathBuf),
        SyncDir(PathBuf),
    }

    /// Records every call and makes it for real, failing the `fail_at`th (0-based) instead.
    struct Recorder {
        calls: Vec<Call>,
        fail_at: Option<usize>,
    }

    impl Recorder {
        fn call(&mut self, c: Call) -> io::Result<()> {
            self.calls.push(c);
            if self.fail_at == Some(self.calls.len() - 1) {
                return Err(io::Error::other("injected"));
            }
            Ok(())
        }
    }

    impl FsOps for Recorder {
        type File = fs::File;
        fn create(&mut self, path: &Path, mode: u32) -> io::Result<fs::File> {
            self.call(Call::Create(path.to_path_buf(), mode))?;
            RealFs.create(path, mode)
        }
        fn write_all(&mut self, file: &mut fs::File, bytes: &[u8]) -> io::Result<()> {
            self.call(Call::Write(bytes.len()))?;
            RealFs.write_all(file, bytes)
        }
        fn sync_file(&mut self, file: &mut fs::File) -> io::Result<()> {
            self.call(Call::SyncFile)?;
            RealFs.sync_file(file)
        }
        fn rename(&mut self, from: &Path, to: &Path) -> io::Result<()> {
            self.call(Call::Rename(from.to_path_buf(), to.to_path_buf()))?;
            RealFs.rename(from, to)
        }
        fn sync_dir(&mut self, dir: &Path) -> io::Result<()> {
            self.call(Call::SyncDir(dir.to_path_buf()))?;
            RealFs.sync_dir(dir)
        }
    }

    #[test]
    fn write_temp_fsync_rename_fsync_dir_in_that_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("upstream.epoch");
        let tmp = dir.path().join("upstream.epoch.tmp");
        let mut rec = Recorder {
            calls: Vec::new(),
            fail_at: None,
        };
        write_with(&mut rec, &path, b"42\n", 0o600).unwrap();
        assert_eq!(
            rec.calls,
            vec![
                Call::Create(tmp.clone(), 0o600),
                Call::Write(3),
                Call::SyncFile,
                Call::Rename(tmp.clone(), path.clone()),
                Call::SyncDir(dir.path().to_path_buf()),
            ]
        );
        assert_eq!(fs::read(&path).unwrap(), b"42\n");
        assert!(!tmp.exists());
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        // A relative path with no directory part syncs ".".
        let mut rec = Recorder {
            calls: Vec::new(),
            fail_at: Some(0),
        };
        assert!(write_with(&mut rec, Path::new("f"), b"", 0o666).is_err());
        assert_eq!(rec.calls, vec![Call::Create(PathBuf::from("f.tmp"), 0o666)]);
    }

    #[test]
    fn a_failure_before_the_rename_leaves_the_old_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subject-2026-12-04.key");
        write(&path, b"old").unwrap();
        for fail_at in 0..5 {
            let mut rec = Recorder {
                calls: Vec::new(),
                fail_at: Some(fail_at),
            };
            assert!(write_with(&mut rec, &path, b"new", 0o600).is_err());
            assert_eq!(rec.calls.len(), fail_at + 1, "stops at the first failure");
            let want: &[u8] = if fail_at < 4 { b"old" } else { b"new" };
            assert_eq!(fs::read(&path).unwrap(), want, "failing call {fail_at}");
        }
        write_private(&path, b"newer").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"newer");
    }
}
