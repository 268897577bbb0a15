//! Atomic file replacement: write a temp file beside the target, fsync it, rename it over the target, fsync the
//! directory. A crash leaves either the old or the new file, never a mix.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use super::StateError;

pub fn write(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let err = |e| StateError::io(path, e);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)?;
    // Past the rename the new file is what a restart reads, so the write counts as done even if the directory
    // fsync fails (reporting failure here would leave memory and disk disagreeing).
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(path = %path.display(), error = %e, "directory fsync failed after rename");
    }
    Ok(())
}
