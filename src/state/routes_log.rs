//! Route changes as an append-only log beside the `routes.json` snapshot, so persisting a change costs one
//! appended line and one `fdatasync`, not a rewrite of every tenant's route.
//!
//! Files: `routes.json` (a snapshot at some epoch), `routes.log` (the changes after it) and, while a new
//! snapshot is being written, `routes.log.prev` (the changes up to that snapshot's epoch). A snapshot is taken
//! by renaming the log to `.prev` (under the routing table's writer lock, so the snapshot's epoch is exactly the
//! last line in `.prev`), writing the snapshot on a thread of its own, then removing `.prev`. A restart at any
//! point reads the snapshot and replays the lines of both logs whose epoch is newer than it.
//!
//! A line is `<json>\t<sha256 of json>\n`. A last line cut short by a crash (no newline) was never acknowledged
//! and is dropped; any other bad line stops startup.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{hex, RoutesFile, StateError};
use crate::ids::Epoch;
use crate::routing::{Change, Route};

pub const LOG_FILE: &str = "routes.log";
pub const PREV_FILE: &str = "routes.log.prev";
/// Lines after which a new snapshot is taken (a restart replays at most about this many).
pub const SNAPSHOT_EVERY: usize = 10_000;

/// One route change as persisted: the epoch it made, and each tenant's new route and removed mark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    pub epoch: Epoch,
    pub changes: Vec<LoggedChange>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedChange {
    pub tenant: String,
    pub route: Option<Route>,
    /// Removed through the admin socket (a reload does not bring it back from the config).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
}

impl LogRecord {
    pub fn new(epoch: Epoch, changes: &[Change], removed: &BTreeSet<String>) -> LogRecord {
        LogRecord {
            epoch,
            changes: changes
                .iter()
                .map(|c| LoggedChange {
                    tenant: c.tenant.to_string(),
                    route: c.route.as_deref().cloned(),
                    removed: removed.contains(c.tenant.as_str()),
                })
                .collect(),
        }
    }

    fn apply(self, file: &mut RoutesFile) {
        file.epoch = self.epoch;
        for c in self.changes {
            match c.route {
                Some(r) => file.routes.insert(c.tenant.clone(), r),
                None => file.routes.remove(&c.tenant),
            };
            if c.removed {
                file.removed.insert(c.tenant);
            } else {
                file.removed.remove(&c.tenant);
            }
        }
    }
}

/// The open log and how many lines it holds.
#[derive(Debug)]
pub struct RoutesLog {
    dir: PathBuf,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    file: Option<File>,
    lines: usize,
    /// A failed append could not be taken back: nothing more is appended until a restart.
    broken: bool,
}

impl RoutesLog {
    pub fn new(dir: &Path, lines: usize) -> RoutesLog {
        RoutesLog {
            dir: dir.to_owned(),
            open: Mutex::new(Open {
                file: None,
                lines,
                broken: false,
            }),
        }
    }

    /// Appends `record`, durable when this returns. True when the log has grown enough for a new snapshot.
    pub fn append(&self, record: &LogRecord) -> Result<bool, StateError> {
        let path = self.dir.join(LOG_FILE);
        let err = |e| StateError::io(&path, e);
        let json = serde_json::to_string(record).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let line = format!("{json}\t{}\n", hex(&Sha256::digest(json.as_bytes())));
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.broken {
            return Err(err(std::io::Error::other(
                "an earlier failed append could not be taken back; restart the proxy",
            )));
        }
        if open.file.is_none() {
            // Whatever a failed append left at the end goes before anything else is added.
            cut_torn_tail(&path).map_err(err)?;
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(err)?;
            sync_dir(&self.dir);
            open.file = Some(f);
        }
        let Some(f) = open.file.as_mut() else {
            return Ok(false);
        };
        let before = f.metadata().map_err(err)?.len();
        if let Err(e) = f.write_all(line.as_bytes()).and_then(|_| f.sync_data()) {
            // The change is refused, so no trace of it may stay (a restart would apply it, and the next change
            // would reuse its epoch).
            let undone = f.set_len(before).and_then(|_| f.sync_data());
            open.file = None;
            open.broken = undone.is_err();
            return Err(err(e));
        }
        open.lines += 1;
        Ok(open.lines >= SNAPSHOT_EVERY && !self.dir.join(PREV_FILE).exists())
    }

    /// Moves the log aside for a snapshot taken at its last line's epoch. False when the previous snapshot is
    /// still being written (its `.prev` is still there).
    pub fn rotate(&self) -> Result<bool, StateError> {
        let (log, prev) = (self.dir.join(LOG_FILE), self.dir.join(PREV_FILE));
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if prev.exists() {
            return Ok(false);
        }
        open.file = None;
        std::fs::rename(&log, &prev).map_err(|e| StateError::io(&log, e))?;
        sync_dir(&self.dir);
        open.lines = 0;
        Ok(true)
    }

    /// Writes `snapshot` and removes the log lines it covers; run off the serving threads.
    pub fn finish_snapshot(dir: &Path, snapshot: &impl Serialize) -> Result<(), StateError> {
        super::StateStore::write_snapshot(dir, snapshot)?;
        let prev = dir.join(PREV_FILE);
        std::fs::remove_file(&prev).map_err(|e| StateError::io(&prev, e))
    }
}

/// Applies the lines of `.prev` and the log that are newer than `file`'s epoch. A `.prev` left by a crash (or
/// a snapshot that failed) is folded into a new snapshot here, so it never blocks the next rotation. Returns
/// the log's line count.
pub fn replay(dir: &Path, file: &mut RoutesFile) -> Result<usize, StateError> {
    let prev = dir.join(PREV_FILE);
    replay_one(&prev, file, false)?;
    let log = dir.join(LOG_FILE);
    cut_torn_tail(&log).map_err(|e| StateError::io(&log, e))?;
    let lines = replay_one(&log, file, true)?;
    if prev.exists() {
        super::StateStore::write_snapshot(dir, &*file)?;
        for path in [&prev, &log] {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(StateError::io(path, e))
                }
                _ => {}
            }
        }
        sync_dir(dir);
        return Ok(0);
    }
    Ok(lines)
}

fn replay_one(path: &Path, file: &mut RoutesFile, current: bool) -> Result<usize, StateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(StateError::io(path, e)),
    };
    let corrupt = |n: usize, reason: String| StateError::Corrupt {
        path: path.to_owned(),
        reason: format!("line {n}: {reason}"),
    };
    let all: Vec<&str> = text.lines().collect();
    let (mut lines, mut last) = (0, None);
    for (i, line) in all.iter().enumerate() {
        let record = match parse_line(line) {
            Ok(r) => r,
            // The current log's last line, complete but bad: an append cut short by a power loss (it was
            // never acknowledged).
            Err(reason) if current && i + 1 == all.len() => {
                tracing::warn!(path = %path.display(), reason, "dropping a route change cut short by a crash");
                cut_to(path, text.len() - line.len() - 1).map_err(|e| StateError::io(path, e))?;
                break;
            }
            Err(reason) => return Err(corrupt(i + 1, reason)),
        };
        if last.is_some_and(|l| record.epoch <= l) {
            return Err(corrupt(
                i + 1,
                format!("epoch {} repeats or goes back", record.epoch),
            ));
        }
        last = Some(record.epoch);
        lines += 1;
        if record.epoch <= file.epoch {
            continue;
        }
        if record.epoch != file.epoch.next() {
            return Err(corrupt(
                i + 1,
                format!(
                    "epoch {} follows {}: changes are missing",
                    record.epoch, file.epoch
                ),
            ));
        }
        record.apply(file);
    }
    Ok(if current { lines } else { 0 })
}

fn parse_line(line: &str) -> Result<LogRecord, String> {
    let (json, sum) = line.rsplit_once('\t').ok_or("no checksum")?;
    if hex(&Sha256::digest(json.as_bytes())) != sum {
        return Err("checksum mismatch".into());
    }
    serde_json::from_str(json).map_err(|e| e.to_string())
}

fn cut_to(path: &Path, len: usize) -> std::io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.set_len(len as u64)?;
    f.sync_all()
}

/// Makes a created or renamed file's directory entry durable (a failure is logged: the data itself is synced).
fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %e, "directory fsync failed");
    }
}

/// Drops a last line a crash cut short (it was never acknowledged: the append had not returned).
fn cut_torn_tail(path: &Path) -> std::io::Result<()> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if bytes.last().is_none_or(|b| *b == b'\n') {
        return Ok(());
    }
    let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    tracing::warn!(path = %path.display(), dropped = bytes.len() - keep, "dropping a route change cut short by a crash");
    let f = OpenOptions::new().write(true).open(path)?;
    f.set_len(keep as u64)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::routing::{BackendId, RoutingTable};
    use crate::state::StateStore;
    use crate::tenant::TenantId;

    fn change(tenant: &str, schema: Option<&str>) -> Change {
        Change {
            tenant: TenantId::parse(tenant).unwrap(),
            route: schema.map(|s| {
                Arc::new(Route::new(
                    BackendId::parse("b").unwrap(),
                    None,
                    Some(s.into()),
                ))
            }),
        }
    }

    fn table(epoch: u64) -> RoutingTable {
        RoutingTable::new(Epoch(epoch), Default::default())
    }

    fn seeded(dir: &Path) -> StateStore {
        let store = StateStore::open(dir).unwrap();
        store
            .save_routes(&RoutesFile::from_table(&table(1), BTreeSet::new()))
            .unwrap();
        store
    }

    fn reload(dir: &Path) -> Result<RoutesFile, StateError> {
        let mut store = StateStore::open(dir)?;
        Ok(store.load_routes()?.expect("a snapshot"))
    }

    #[test]
    fn changes_are_replayed_over_the_snapshot_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = seeded(dir.path());
        let none = BTreeSet::new();
        store
            .record_routes(
                &table(2),
                &[change("a", Some("s1")), change("b", Some("s2"))],
                &none,
            )
            .unwrap();
        let removed: BTreeSet<String> = ["b".to_string()].into();
        store
            .record_routes(&table(3), &[change("b", None)], &removed)
            .unwrap();
        // A crash in the middle of the next append.
        let log = dir.path().join(LOG_FILE);
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"{\"epoch\":4,\"chan").unwrap();
        let file = reload(dir.path()).unwrap();
        assert_eq!(file.epoch, Epoch(3));
        assert_eq!(file.routes.keys().collect::<Vec<_>>(), ["a"]);
        assert!(file.removed.contains("b"));
        assert!(std::fs::read_to_string(&log).unwrap().ends_with('\n'));
        // A changed line (not the torn tail) stops startup.
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::write(&log, text.replace("s1", "s9")).unwrap();
        assert!(matches!(
            reload(dir.path()),
            Err(StateError::Corrupt { .. })
        ));
        // So does a missing line (an epoch gap).
        let second = text.lines().nth(1).unwrap();
        std::fs::write(&log, format!("{second}\n")).unwrap();
        assert!(matches!(
            reload(dir.path()),
            Err(StateError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_snapshot_covers_the_rotated_log_and_a_leftover_prev_is_folded_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = seeded(dir.path());
        let none = BTreeSet::new();
        store
            .record_routes(&table(2), &[change("a", Some("s1"))], &none)
            .unwrap();
        assert!(store.log.rotate().unwrap());
        // A second rotation waits for the snapshot of the first.
        assert!(!store.log.rotate().unwrap());
        store
            .record_routes(&table(3), &[change("b", Some("s2"))], &none)
            .unwrap();
        // Snapshot at epoch 2 written and .prev removed: the log's newer line still applies.
        let mut at2 = RoutesFile::from_table(&table(2), none.clone());
        at2.routes.insert(
            "a".into(),
            (*change("a", Some("s1")).route.unwrap()).clone(),
        );
        let prev_text = std::fs::read_to_string(dir.path().join(PREV_FILE)).unwrap();
        RoutesLog::finish_snapshot(dir.path(), &at2).unwrap();
        let file = reload(dir.path()).unwrap();
        assert_eq!((file.epoch, file.routes.len()), (Epoch(3), 2));
        // A crash before the snapshot (or a snapshot that failed) leaves .prev: the next start replays it and
        // the log, writes the snapshot and removes both.
        std::fs::write(dir.path().join(PREV_FILE), prev_text).unwrap();
        let file = reload(dir.path()).unwrap();
        assert_eq!((file.epoch, file.routes.len()), (Epoch(3), 2));
        assert!(!dir.path().join(PREV_FILE).exists());
        assert!(!dir.path().join(LOG_FILE).exists());
        let file = reload(dir.path()).unwrap();
        assert_eq!((file.epoch, file.routes.len()), (Epoch(3), 2));
        // Without its snapshot, a .prev is refused rather than replayed over a fresh seed.
        std::fs::write(dir.path().join(PREV_FILE), "x").unwrap();
        std::fs::remove_file(dir.path().join("routes.json")).unwrap();
        assert!(matches!(
            reload(dir.path()),
            Err(StateError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_bad_last_line_is_dropped_and_a_repeated_epoch_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = seeded(dir.path());
        let none = BTreeSet::new();
        for (epoch, tenant) in [(2, "a"), (3, "b")] {
            store
                .record_routes(&table(epoch), &[change(tenant, Some("s"))], &none)
                .unwrap();
        }
        let log = dir.path().join(LOG_FILE);
        let good = std::fs::read_to_string(&log).unwrap();
        // A whole last line whose bytes did not all reach the disk.
        std::fs::write(&log, format!("{good}{{\"epoch\":4}}\tbad\n")).unwrap();
        assert_eq!(reload(dir.path()).unwrap().epoch, Epoch(3));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), good);
        // The same epoch twice is not a crash's doing.
        let first = good.lines().next().unwrap();
        std::fs::write(&log, format!("{first}\n{first}\n{good}")).unwrap();
        assert!(matches!(
            reload(dir.path()),
            Err(StateError::Corrupt { .. })
        ));
    }
}
