//! Named failpoints, so tests can stop a migration exactly between two steps. Set through
//! `PGTENANT_FAILPOINTS=name=action,...` at start or [`Failpoints::set`] in-process. Actions: `error` (the step
//! fails as if the database had refused it) and `hang` (the step waits until the failpoint is cleared, as a
//! process that stopped there would; a restart then resumes from the persisted state).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::MigrateError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Error,
    Hang,
}

#[derive(Debug, Default)]
pub struct Failpoints {
    set: Mutex<HashMap<String, Action>>,
    /// The proxy is stopping: a hanging failpoint ends (with `Cancelled`), as the process would.
    closed: std::sync::atomic::AtomicBool,
}

impl Failpoints {
    pub fn from_env() -> Failpoints {
        let f = Failpoints::default();
        if let Ok(spec) = std::env::var("PGTENANT_FAILPOINTS") {
            for item in spec.split(',').filter(|s| !s.is_empty()) {
                let (name, action) = item.split_once('=').unwrap_or((item, "error"));
                let action = if action == "hang" {
                    Action::Hang
                } else {
                    Action::Error
                };
                f.set(name, Some(action));
            }
        }
        f
    }

    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn set(&self, name: &str, action: Option<Action>) {
        let mut set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        match action {
            Some(a) => set.insert(name.to_owned(), a),
            None => set.remove(name),
        };
    }

    fn get(&self, name: &str) -> Option<Action> {
        let set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        if set.is_empty() {
            return None;
        }
        set.get(name).copied()
    }

    /// Checks `name`: `Err` for `error`; waits while `hang` is set.
    pub async fn check(&self, name: &str) -> Result<(), MigrateError> {
        self.check_until(name, &tokio_util::sync::CancellationToken::new())
            .await
    }

    /// Like [`Failpoints::check`]; a hang also ends (with `Cancelled`) when `stop` fires.
    pub async fn check_until(
        &self,
        name: &str,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<(), MigrateError> {
        loop {
            if stop.is_cancelled() {
                return Err(MigrateError::Cancelled);
            }
            match self.get(name) {
                None => return Ok(()),
                Some(Action::Error) => return Err(MigrateError::Failpoint(name.to_owned())),
                Some(Action::Hang) => {
                    if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
                        return Err(MigrateError::Cancelled);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
            }
        }
    }
}
