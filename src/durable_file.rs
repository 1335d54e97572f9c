//! Files the daemon writes beside the store, written so that a power cut leaves either the old
//! contents or the new ones, never a mix or an empty file: the bytes go to a temporary file
//! beside the target, which is fsync'd, renamed over the target, and the directory fsync'd (so
//! the rename itself survives).

use std::fs;
use std::io::Write;
use std::path::Path;

/// Replace `path` with `bytes` durably: `<path>.tmp` written and fsync'd, renamed over `path`,
/// the directory fsync'd.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}
