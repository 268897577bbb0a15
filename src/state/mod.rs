//! Durable state in `state_dir`: the routing table (with its epoch) and the audit log.
//!
//! Routes are a snapshot (`routes.json`, written atomically: temp file, fsync, rename, fsync of the directory)
//! plus an append-only log of the changes since (see [`routes_log`]). Everything carries a checksum, so a
//! corrupted file stops startup with a clear message instead of routing tenants wrong.

pub mod atomic;
pub mod audit;
pub mod json_list;
pub mod key;
pub mod lock;
pub mod routes_log;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::ids::BackendId;
use crate::routing::{Change, Epoch, Route, RoutingTable};
use crate::tenant::TenantId;
use routes_log::{LogRecord, RoutesLog};

pub use audit::{AuditEntry, AuditLog};

const ROUTES_FILE: &str = "routes.json";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt or truncated ({reason}); refusing to start rather than route tenants wrong. Restore it from a backup or remove it to reseed routes from the config")]
    Corrupt { path: PathBuf, reason: String },
}

impl StateError {
    pub fn io(path: &Path, source: std::io::Error) -> StateError {
        StateError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// What `routes.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoutesFile {
    pub version: u32,
    pub epoch: Epoch,
    pub routes: BTreeMap<String, Route>,
    /// Tenants removed through the admin socket, so a reload does not bring them back from the config.
    #[serde(default)]
    pub removed: BTreeSet<String>,
}

impl RoutesFile {
    pub fn from_table(table: &RoutingTable, removed: BTreeSet<String>) -> RoutesFile {
        RoutesFile {
            version: FORMAT_VERSION,
            epoch: table.epoch,
            routes: table
                .iter()
                .map(|(k, v)| (k.to_string(), (**v).clone()))
                .collect(),
            removed,
        }
    }

    /// What [`RoutesFile::to_table`] would refuse, without building the table.
    pub fn check(&self) -> Result<(), String> {
        for (name, route) in &self.routes {
            TenantId::parse(name).map_err(|e| e.to_string())?;
            BackendId::parse(route.backend.as_str()).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    pub fn to_table(&self) -> Result<RoutingTable, String> {
        let mut routes = std::collections::HashMap::with_capacity(self.routes.len());
        // One fresh name per backend, shared by its routes: not one per route, and none pointing back into the
        // memory the file was parsed in (see `load_routes`).
        let mut names: std::collections::HashMap<&str, BackendId> =
            std::collections::HashMap::new();
        for (name, original) in &self.routes {
            let id = TenantId::parse(name).map_err(|e| e.to_string())?;
            let key = original.backend.as_str();
            let backend = match names.get(key) {
                Some(shared) => shared.clone(),
                None => {
                    let fresh = BackendId::parse(key).map_err(|e| e.to_string())?;
                    names.insert(key, fresh.clone());
                    fresh
                }
            };
            let route = Route {
                backend,
                ..original.clone()
            };
            routes.insert(id, std::sync::Arc::new(route));
        }
        Ok(RoutingTable::new(self.epoch, routes))
    }
}

/// A [`RoutesFile`] written straight from a routing table (sorted by tenant, as the file's map is), without
/// copying every route into one first: at 100 000 tenants the copy was 30 MB.
pub struct SnapshotOf<'a> {
    table: &'a RoutingTable,
    removed: &'a BTreeSet<String>,
}

impl<'a> SnapshotOf<'a> {
    pub fn new(table: &'a RoutingTable, removed: &'a BTreeSet<String>) -> SnapshotOf<'a> {
        SnapshotOf { table, removed }
    }
}

impl Serialize for SnapshotOf<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut routes: Vec<(&TenantId, &std::sync::Arc<Route>)> = self.table.iter().collect();
        routes.sort_unstable_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        let mut st = s.serialize_struct("RoutesFile", 4)?;
        st.serialize_field("version", &FORMAT_VERSION)?;
        st.serialize_field("epoch", &self.table.epoch)?;
        st.serialize_field("routes", &SortedRoutes(&routes))?;
        st.serialize_field("removed", self.removed)?;
        st.end()
    }
}

struct SortedRoutes<'a>(&'a [(&'a TenantId, &'a std::sync::Arc<Route>)]);

impl Serialize for SortedRoutes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(t, r)| (t.as_str(), &***r)))
    }
}

/// Text plus a checksum line: `<json>\nsha256:<hex>\n`.
pub(crate) fn seal(json: &str) -> String {
    format!("{json}\nsha256:{}\n", hex(&Sha256::digest(json.as_bytes())))
}

pub(crate) fn unseal<'a>(path: &Path, text: &'a str) -> Result<&'a str, StateError> {
    let corrupt = |reason: &str| StateError::Corrupt {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let body = text
        .strip_suffix('\n')
        .ok_or_else(|| corrupt("no final newline"))?;
    let (json, sum) = body
        .rsplit_once('\n')
        .ok_or_else(|| corrupt("no checksum line"))?;
    let sum = sum
        .strip_prefix("sha256:")
        .ok_or_else(|| corrupt("no checksum line"))?;
    if hex(&Sha256::digest(json.as_bytes())) != sum {
        return Err(corrupt("checksum mismatch"));
    }
    Ok(json)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The state directory.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    log: RoutesLog,
}

impl StateStore {
    /// Opens (creating if needed) the state directory.
    pub fn open(dir: &Path) -> Result<StateStore, StateError> {
        std::fs::create_dir_all(dir).map_err(|e| StateError::io(dir, e))?;
        Ok(StateStore {
            dir: dir.to_owned(),
            log: RoutesLog::new(dir, 0),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The persisted routes (the snapshot with the logged changes after it), `None` when none were ever
    /// written.
    pub fn load_routes(&mut self) -> Result<Option<RoutesFile>, StateError> {
        // Read, replayed and checked on a thread of its own: the JSON text and its parse (100 000 routes: tens
        // of MB) are garbage once the caller has built its table from the file, and in that thread's malloc
        // arena a trim gives them back whole, instead of leaving holes between the tables the proxy keeps.
        let dir = &self.dir;
        let loaded = std::thread::scope(|s| {
            s.spawn(|| read_and_replay(dir)).join().unwrap_or_else(|_| {
                Err(StateError::Corrupt {
                    path: dir.join(ROUTES_FILE),
                    reason: "its reader panicked".into(),
                })
            })
        })?;
        let Some((file, lines)) = loaded else {
            return Ok(None);
        };
        self.log = RoutesLog::new(&self.dir, lines);
        Ok(Some(file))
    }

    /// Writes a whole snapshot (the first one, seeded from the config); durable when this returns.
    pub fn save_routes(&self, file: &RoutesFile) -> Result<(), StateError> {
        StateStore::write_snapshot(&self.dir, file)
    }

    pub(crate) fn write_snapshot(dir: &Path, file: &impl Serialize) -> Result<(), StateError> {
        let path = dir.join(ROUTES_FILE);
        let json = serde_json::to_string(file).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        atomic::write(&path, seal(&json).as_bytes())
    }

    /// Persists one route change (`table` is the table it made); durable when this returns. Every
    /// [`routes_log::SNAPSHOT_EVERY`] changes a new snapshot is written on a thread of its own.
    pub fn record_routes(
        &self,
        table: &RoutingTable,
        changes: &[Change],
        removed: &BTreeSet<String>,
    ) -> Result<(), StateError> {
        let record = LogRecord::new(table.epoch, changes, removed);
        if !self.log.append(&record)? {
            return Ok(());
        }
        // The change is durable; a failed rotation only postpones the snapshot.
        let rotated = self.log.rotate().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not move routes.log aside for a snapshot");
            false
        });
        if rotated {
            let (dir, table, removed) = (self.dir.clone(), table.clone(), removed.clone());
            let spawned = std::thread::Builder::new()
                .name("pgtenant-snapshot".into())
                .spawn(move || {
                    if let Err(e) =
                        RoutesLog::finish_snapshot(&dir, &SnapshotOf::new(&table, &removed))
                    {
                        // The changes stay in routes.log.prev (the log grows meanwhile): the next start
                        // replays them and writes the snapshot.
                        tracing::warn!(error = %e, "writing a routes snapshot failed");
                    }
                    drop((table, removed));
                    crate::heap::trim();
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "could not start the routes snapshot");
            }
        }
        Ok(())
    }

    pub fn audit_path(&self) -> PathBuf {
        self.dir.join("audit.log")
    }
}

fn read_snapshot(path: &Path) -> Result<Option<RoutesFile>, StateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StateError::io(path, e)),
    };
    let json = unseal(path, &text)?;
    let file: RoutesFile = serde_json::from_str(json).map_err(|e| StateError::Corrupt {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    if file.version != FORMAT_VERSION {
        return Err(StateError::Corrupt {
            path: path.to_owned(),
            reason: format!("unknown format version {}", file.version),
        });
    }
    Ok(Some(file))
}

/// The snapshot with the log's changes applied and checked, and the number of log lines; `None` when no
/// snapshot was ever written.
fn read_and_replay(dir: &Path) -> Result<Option<(RoutesFile, usize)>, StateError> {
    let path = dir.join(ROUTES_FILE);
    let Some(mut file) = read_snapshot(&path)? else {
        if dir.join(routes_log::LOG_FILE).exists() || dir.join(routes_log::PREV_FILE).exists() {
            return Err(StateError::Corrupt {
                path,
                reason: "missing, while routes.log holds changes made after it; remove routes.log too to \
                         reseed routes from the config"
                    .into(),
            });
        }
        return Ok(None);
    };
    let lines = routes_log::replay(dir, &mut file)?;
    file.check()
        .map_err(|reason| StateError::Corrupt { path, reason })?;
    Ok(Some((file, lines)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_round_trip_and_corruption_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = StateStore::open(dir.path()).unwrap();
        assert!(store.load_routes().unwrap().is_none());
        let mut routes = BTreeMap::new();
        routes.insert(
            "acme".to_string(),
            Route::new(
                crate::routing::BackendId::parse("b").unwrap(),
                None,
                Some("s".into()),
            ),
        );
        let file = RoutesFile {
            version: 1,
            epoch: crate::routing::Epoch(7),
            routes,
            removed: BTreeSet::new(),
        };
        store.save_routes(&file).unwrap();
        assert_eq!(store.load_routes().unwrap(), Some(file));
        let path = dir.path().join(ROUTES_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"epoch\":7", "\"epoch\":8")).unwrap();
        assert!(matches!(
            store.load_routes(),
            Err(StateError::Corrupt { .. })
        ));
        std::fs::write(&path, &text[..text.len() / 2]).unwrap();
        assert!(matches!(
            store.load_routes(),
            Err(StateError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_snapshot_written_from_the_table_reads_back_as_the_file() {
        let mut routes = std::collections::HashMap::new();
        for name in ["zeta", "acme", "mid"] {
            let route = Route::new(
                crate::routing::BackendId::parse("b").unwrap(),
                None,
                Some(format!("s_{name}")),
            );
            routes.insert(TenantId::parse(name).unwrap(), std::sync::Arc::new(route));
        }
        let table = RoutingTable::new(crate::routing::Epoch(9), routes);
        let removed: BTreeSet<String> = ["gone".to_string()].into();
        let direct = serde_json::to_string(&SnapshotOf::new(&table, &removed)).unwrap();
        let copied = serde_json::to_string(&RoutesFile::from_table(&table, removed)).unwrap();
        assert_eq!(direct, copied);
    }
}
