//! The exclusive lock on `state_dir`: two proxies writing one state directory would corrupt its routes and
//! audit chain, so the second refuses to start and names the first's pid. The lock is an advisory `flock` on
//! `state_dir/pgtenant.pid`, released by the kernel when the holder exits, however it exits.
//!
//! A refused lock is retried for a short while before it counts as held. A `flock` belongs to the open file
//! description, and a child forked by this process (or by a predecessor) holds a copy of it until the child's
//! `exec` closes it; a restart that races such a fork, or a predecessor that is still exiting, would otherwise be
//! refused although nobody is left to hold the directory.

use std::time::{Duration, Instant};

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

const FILE: &str = "pgtenant.pid";
/// How long a refused lock is retried: far above a fork-to-exec window, far below a supervisor's patience.
const WAIT: Duration = Duration::from_secs(2);
const RETRY_EVERY: Duration = Duration::from_millis(20);

#[derive(Debug, Error)]
pub enum LockError {
    #[error("state_dir {dir} is in use by another pgtenant (pid {pid}); stop it or give this one its own state_dir")]
    InUse { dir: PathBuf, pid: String },
    #[error("cannot lock state_dir {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// Held for as long as the proxy runs.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    pub async fn acquire(dir: &Path) -> Result<StateLock, LockError> {
        Self::acquire_within(dir, WAIT).await
    }

    /// Takes the lock, retrying a refusal until `wait` has passed.
    pub async fn acquire_within(dir: &Path, wait: Duration) -> Result<StateLock, LockError> {
        let deadline = Instant::now() + wait;
        loop {
            match Self::try_acquire(dir) {
                Err(LockError::InUse { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(RETRY_EVERY).await
                }
                other => return other,
            }
        }
    }

    fn try_acquire(dir: &Path) -> Result<StateLock, LockError> {
        let io = |source| LockError::Io {
            dir: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(FILE))
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(LockError::InUse {
                    dir: dir.to_owned(),
                    pid: pid.trim().to_owned(),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(StateLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::acquire(dir.path()).await.unwrap();
        let e = StateLock::acquire_within(dir.path(), Duration::from_millis(50))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(first);
        StateLock::acquire(dir.path()).await.unwrap();
    }

    #[tokio::test]
    async fn a_lock_let_go_while_the_next_holder_waits_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::acquire(dir.path()).await.unwrap();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(first);
        });
        StateLock::acquire_within(dir.path(), Duration::from_secs(10))
            .await
            .unwrap();
        releaser.join().unwrap();
    }
}
