//! A small durable list kept as one JSON file (queued moves, scheduled source drops): every change is written
//! (atomically, fsynced) before it returns, and undone in memory when the write fails.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::StateError;

#[derive(Debug)]
pub struct JsonList<T> {
    path: PathBuf,
    entries: Mutex<Vec<T>>,
}

impl<T: Clone + Serialize + DeserializeOwned> JsonList<T> {
    /// The list in `dir/file` (empty when the file does not exist; a file that does not parse is an error).
    pub fn open(dir: &Path, file: &str) -> Result<JsonList<T>, StateError> {
        let path = dir.join(file);
        let entries = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(StateError::io(&path, e)),
        };
        Ok(JsonList {
            path,
            entries: Mutex::new(entries),
        })
    }

    pub fn all(&self) -> Vec<T> {
        self.lock().clone()
    }

    pub fn any(&self, f: impl Fn(&T) -> bool) -> bool {
        self.lock().iter().any(f)
    }

    /// Adds `t` (durable when this returns).
    pub fn push(&self, t: T) -> Result<(), StateError> {
        let mut entries = self.lock();
        entries.push(t);
        self.save(&entries).inspect_err(|_| {
            entries.pop();
        })
    }

    /// Removes and returns the first entry `f` picks.
    pub fn remove(&self, f: impl Fn(&T) -> bool) -> Result<Option<T>, StateError> {
        let mut entries = self.lock();
        let Some(i) = entries.iter().position(f) else {
            return Ok(None);
        };
        let t = entries.remove(i);
        if let Err(e) = self.save(&entries) {
            entries.insert(i, t);
            return Err(e);
        }
        Ok(Some(t))
    }

    /// Changes the first entry `f` picks with `change`.
    pub fn update(
        &self,
        f: impl Fn(&T) -> bool,
        change: impl FnOnce(&mut T),
    ) -> Result<(), StateError> {
        let mut entries = self.lock();
        let Some(i) = entries.iter().position(f) else {
            return Ok(());
        };
        let before = entries[i].clone();
        change(&mut entries[i]);
        self.save(&entries).inspect_err(|_| {
            entries[i] = before;
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<T>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, entries: &[T]) -> Result<(), StateError> {
        let json = serde_json::to_string_pretty(entries).map_err(|e| StateError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        super::atomic::write(&self.path, json.as_bytes())
    }
}
