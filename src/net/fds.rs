//! File descriptors: the soft limit raised to the hard one at start, and what the accept loop does when they
//! run out. At `EMFILE` a listener cannot even accept a client to tell it why, so one descriptor is kept spare:
//! it is closed to accept one waiting client, which gets a clear `53300` error and is closed, and the spare is
//! taken again. Accepting then backs off (doubling to a second) instead of spinning, and the log says so once
//! every ten seconds with the number refused since.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tracing::warn;

use crate::protocol::messages::PgError;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the limit now in force.
pub fn raise_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to and read from the struct passed, which lives on this stack frame.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    Ok(lim.rlim_cur)
}

/// Out of descriptors (the process's or the system's).
pub fn exhausted(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// The accept loop's state while descriptors are short.
pub struct Shortage {
    spare: Option<std::fs::File>,
    backoff: Duration,
    refused: u64,
    logged: Option<Instant>,
}

impl Default for Shortage {
    fn default() -> Self {
        Shortage {
            spare: std::fs::File::open("/dev/null").ok(),
            backoff: Duration::ZERO,
            refused: 0,
            logged: None,
        }
    }
}

impl Shortage {
    /// An accept succeeded: descriptors are available again.
    pub fn over(&mut self) {
        self.backoff = Duration::ZERO;
        if self.spare.is_none() {
            self.spare = std::fs::File::open("/dev/null").ok();
        }
    }

    /// An accept failed with `EMFILE`/`ENFILE`: refuse one waiting client clearly, then back off.
    pub async fn hit(&mut self, listener: &TcpListener, limit_hint: &str) {
        if self.spare.take().is_some() {
            if let Ok(Ok((mut tcp, _))) =
                tokio::time::timeout(Duration::from_millis(10), listener.accept()).await
            {
                let mut buf = BytesMut::new();
                PgError::fatal(
                    crate::protocol::sqlstate::TOO_MANY_CONNECTIONS,
                    format!(
                        "pgtenant is out of file descriptors ({limit_hint}); try again shortly"
                    ),
                )
                .encode(&mut buf);
                let _ = tokio::time::timeout(Duration::from_millis(100), tcp.write_all(&buf)).await;
                self.refused += 1;
            }
            self.spare = std::fs::File::open("/dev/null").ok();
        }
        let due = self
            .logged
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
        if due {
            warn!(refused = self.refused, "out of file descriptors: accepting backs off; raise ulimit -n or lower max_client_conn");
            self.logged = Some(Instant::now());
            self.refused = 0;
        }
        self.backoff = (self.backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        tokio::time::sleep(self.backoff).await;
    }
}
