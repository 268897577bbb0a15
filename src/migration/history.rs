//! Finished migrations (completed, rolled back, aborted, failed then aborted), kept in
//! `state_dir/migration_history.jsonl`, one JSON line each, so an operator can see yesterday's moves and their
//! figures after any number of restarts. Bounded: beyond `migration.history_keep` entries the oldest go.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::record::{Record, State, VerifyLevel};
use crate::state::StateError;
use crate::tenant::TenantId;

const FILE: &str = "migration_history.jsonl";

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Finalized on the target.
    Completed,
    /// Moved back to the source after the swap.
    RolledBack,
    /// Abandoned before the swap.
    Aborted,
    /// Abandoned after failing (the error is kept).
    Failed,
}

/// Where a side of a move was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Place {
    pub backend: String,
    pub database: String,
    pub schema: String,
}

/// Time spent in one state (a state entered twice, e.g. dual_write after a fallback, counts both stays).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stay {
    pub state: State,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub tenant: TenantId,
    pub outcome: Outcome,
    pub source: Place,
    pub target: Place,
    pub started_at: String,
    pub ended_at: String,
    /// Unix seconds of the end, for `--since` and the summary.
    pub ended_unix: u64,
    pub duration_s: f64,
    pub states: Vec<Stay>,
    pub started_by: Option<String>,
    pub tables: usize,
    pub rows_copied: u64,
    pub bytes_copied: u64,
    /// The gate-closed time of the last cutover or rollback.
    pub pause_ms: Option<f64>,
    pub cutover_attempts: u64,
    pub verification_level: Option<VerifyLevel>,
    pub verification_passed: Option<bool>,
    #[serde(default)]
    pub verification_rows_per_s: Option<f64>,
    /// How far the estimate of the copy's time was off: (estimated - actual) / actual, in percent.
    #[serde(default)]
    pub copy_estimate_error_percent: Option<f64>,
    pub error: Option<String>,
}

pub use super::record::now_ms;

impl HistoryEntry {
    /// The entry for `rec`, which has just ended with `outcome`.
    pub fn of(rec: &Record, outcome: Outcome) -> HistoryEntry {
        let place = |r: &crate::routing::Route, db: &str| Place {
            backend: r.backend.to_string(),
            database: db.to_owned(),
            schema: rec.schema.clone(),
        };
        let end = rec.entered.last().map(|(_, t)| *t).unwrap_or_else(now_ms);
        let states = rec
            .entered
            .windows(2)
            .map(|w| Stay {
                state: w[0].0,
                seconds: w[1].1.saturating_sub(w[0].1) as f64 / 1000.0,
            })
            .collect();
        let start = rec.entered.first().map(|(_, t)| *t).unwrap_or(end);
        HistoryEntry {
            tenant: rec.tenant.clone(),
            outcome,
            source: place(&rec.source, &rec.source_database),
            target: place(&rec.target, &rec.target_database),
            started_at: rec.started_at.clone(),
            ended_at: crate::state::audit::rfc3339_now(),
            ended_unix: end / 1000,
            duration_s: end.saturating_sub(start) as f64 / 1000.0,
            states,
            started_by: rec.started_by.clone(),
            tables: rec.tables.len(),
            rows_copied: rec.rows_copied,
            bytes_copied: rec.bytes_copied,
            pause_ms: rec.last_pause_ms,
            cutover_attempts: rec.cutover_attempts,
            verification_level: rec.verification.as_ref().and_then(|v| v.level),
            verification_passed: rec.verification.as_ref().map(|v| v.passed),
            verification_rows_per_s: rec
                .verification
                .as_ref()
                .filter(|v| v.duration_ms > 0)
                .map(|v| v.rows as f64 * 1000.0 / v.duration_ms as f64),
            copy_estimate_error_percent: estimate_error(rec),
            error: rec.last_error.clone(),
        }
    }
}

/// Until a move has been measured: rows copied per second. pgbench rows on this project's 2-core machine copy
/// at 630 000/s on an idle source and about 190 000/s under the demo's pgbench load (505 910 rows in 2.65 s);
/// a move usually runs under load.
pub const DEFAULT_COPY_ROWS_PER_S: f64 = 200_000.0;

/// Until a move has been measured: seconds of fixed cost per table (its own transaction, its checkpoint
/// written and synced, its change-log cleanup); about what this project's machine shows for small tables.
pub const DEFAULT_COPY_TABLE_S: f64 = 0.03;

/// How long a bulk copy takes: a fixed cost per table plus the rows at a rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CopyModel {
    pub rows_per_s: f64,
    pub per_table_s: f64,
    /// Earlier moves it was measured from (0: the defaults).
    pub moves: usize,
    /// Both figures fitted (moves of different shapes), not only the rate.
    pub fitted: bool,
}

impl CopyModel {
    pub fn seconds(&self, rows: u64, tables: usize) -> f64 {
        tables as f64 * self.per_table_s + rows as f64 / self.rows_per_s
    }
}

/// (tables, rows, seconds of bulk copy) of each finished move that copied (completed or rolled back).
fn copy_samples(history: &[HistoryEntry]) -> Vec<(f64, f64, f64)> {
    history
        .iter()
        .filter(|e| e.outcome == Outcome::Completed || e.outcome == Outcome::RolledBack)
        .filter_map(|e| {
            let secs: f64 = e
                .states
                .iter()
                .filter(|s| s.state == State::BulkCopy)
                .map(|s| s.seconds)
                .sum();
            (e.rows_copied > 0 && secs > 0.01).then_some((
                e.tables as f64,
                e.rows_copied as f64,
                secs,
            ))
        })
        .collect()
}

/// The copy model of this proxy's earlier moves: with moves of different shapes, both figures by least
/// squares of `seconds = per_table * tables + rows / rate`; otherwise the default per-table cost and the median
/// rate of the time left after it; with no move, the defaults.
pub fn copy_model(history: &[HistoryEntry]) -> CopyModel {
    let samples = copy_samples(history);
    if let Some(m) = fit(&samples) {
        return m;
    }
    let rates: Vec<f64> = samples
        .iter()
        .map(|&(t, r, s)| {
            let left = s - t * DEFAULT_COPY_TABLE_S;
            r / if left > 0.2 * s { left } else { s }
        })
        .collect();
    // A move's copy time varies by a fifth from run to run on a busy machine: with few moves the mean is the
    // better guess, from three on the median (robust to one odd move).
    let rate = match rates.len() {
        0 => None,
        1 | 2 => Some(rates.iter().sum::<f64>() / rates.len() as f64),
        _ => median(rates),
    };
    CopyModel {
        rows_per_s: rate.unwrap_or(DEFAULT_COPY_ROWS_PER_S),
        per_table_s: DEFAULT_COPY_TABLE_S,
        moves: samples.len(),
        fitted: false,
    }
}

/// Least squares of `s = a t + b r` (no intercept); `None` when the moves do not tell the two apart or the fit
/// makes no physical sense.
fn fit(samples: &[(f64, f64, f64)]) -> Option<CopyModel> {
    if samples.len() < 2 {
        return None;
    }
    let sum = |f: &dyn Fn(&(f64, f64, f64)) -> f64| samples.iter().map(f).sum::<f64>();
    let (tt, tr, rr) = (
        sum(&|x| x.0 * x.0),
        sum(&|x| x.0 * x.1),
        sum(&|x| x.1 * x.1),
    );
    let (ts, rs) = (sum(&|x| x.0 * x.2), sum(&|x| x.1 * x.2));
    let det = tt * rr - tr * tr;
    if det.abs() <= 1e-6 * tt * rr {
        return None;
    }
    let a = (ts * rr - rs * tr) / det;
    let b = (tt * rs - tr * ts) / det;
    (a >= 0.0 && b > 0.0).then_some(CopyModel {
        rows_per_s: 1.0 / b,
        per_table_s: a,
        moves: samples.len(),
        fitted: true,
    })
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// (estimated - actual) / actual of the bulk copy's time, in percent.
fn estimate_error(rec: &Record) -> Option<f64> {
    let model = CopyModel {
        rows_per_s: rec.expected_copy_rows_per_s?,
        per_table_s: rec.expected_copy_per_table_s.unwrap_or(0.0),
        moves: 0,
        fitted: false,
    };
    let actual: f64 = rec
        .entered
        .windows(2)
        .filter(|w| w[0].0 == State::BulkCopy)
        .map(|w| w[1].1.saturating_sub(w[0].1) as f64 / 1000.0)
        .sum();
    let estimated = model.seconds(rec.rows_copied, rec.tables.len());
    (actual > 0.0 && model.rows_per_s > 0.0).then(|| (estimated - actual) / actual * 100.0)
}

/// The history file.
#[derive(Debug)]
pub struct History {
    path: PathBuf,
    lock: Mutex<()>,
}

impl History {
    pub fn new(dir: &Path) -> History {
        History {
            path: dir.join(FILE),
            lock: Mutex::new(()),
        }
    }

    /// Appends `entry` (durable when this returns); beyond `keep` entries the oldest are dropped, a quarter
    /// at a time so the rewrite is rare.
    pub fn append(&self, entry: &HistoryEntry, keep: usize) -> Result<(), StateError> {
        let err = |e| StateError::io(&self.path, e);
        let line = serde_json::to_string(entry).map_err(|e| StateError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        // After a line cut short by a crash, the new one starts on a line of its own.
        let torn = match std::fs::read(&self.path) {
            Ok(b) => b.last().is_some_and(|c| *c != b'\n'),
            Err(_) => false,
        };
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(err)?;
        let lead = if torn { "\n" } else { "" };
        f.write_all(format!("{lead}{line}\n").as_bytes())
            .map_err(err)?;
        f.sync_data().map_err(err)?;
        let entries = self.read_locked()?;
        if entries.len() > keep + keep / 4 {
            let kept: String = entries[entries.len() - keep..]
                .iter()
                .filter_map(|e| serde_json::to_string(e).ok())
                .map(|l| l + "\n")
                .collect();
            crate::state::atomic::write(&self.path, kept.as_bytes())?;
        }
        Ok(())
    }

    /// Every kept entry, oldest first.
    pub fn read(&self) -> Result<Vec<HistoryEntry>, StateError> {
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.read_locked()
    }

    fn read_locked(&self) -> Result<Vec<HistoryEntry>, StateError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StateError::io(&self.path, e)),
        };
        // A line cut short by a crash (the last one) is skipped; its migration's record still says how it ended.
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }
}

/// Figures over the history, as `migrate history` shows them above the list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Migrations not finished (any state but completed and rolled back).
    pub active: usize,
    pub completed_today: usize,
    pub failed_last_7_days: usize,
    /// Over completed moves.
    pub average_duration_s: Option<f64>,
    /// Over every entry with a cutover or rollback.
    pub pause_p50_ms: Option<f64>,
    pub pause_p99_ms: Option<f64>,
}

impl Summary {
    pub fn of(entries: &[HistoryEntry], active: usize, now_unix: u64) -> Summary {
        let today = now_unix - now_unix % 86_400;
        let completed: Vec<&HistoryEntry> = entries
            .iter()
            .filter(|e| e.outcome == Outcome::Completed)
            .collect();
        let mut pauses: Vec<f64> = entries.iter().filter_map(|e| e.pause_ms).collect();
        pauses.sort_by(f64::total_cmp);
        let pick = |q: f64| {
            (!pauses.is_empty()).then(|| pauses[((pauses.len() - 1) as f64 * q).round() as usize])
        };
        Summary {
            active,
            completed_today: completed.iter().filter(|e| e.ended_unix >= today).count(),
            failed_last_7_days: entries
                .iter()
                .filter(|e| e.outcome == Outcome::Failed && e.ended_unix + 7 * 86_400 >= now_unix)
                .count(),
            average_duration_s: (!completed.is_empty()).then(|| {
                completed.iter().map(|e| e.duration_s).sum::<f64>() / completed.len() as f64
            }),
            pause_p50_ms: pick(0.5),
            pause_p99_ms: pick(0.99),
        }
    }
}

/// `--since`: a date (`2026-12-01`, UTC midnight), or a span back from now (`7d`, `12h`, `30m`). Unix seconds.
pub fn parse_since(text: &str, now_unix: u64) -> Option<u64> {
    match super::clock::span(text) {
        Some(back) => Some(now_unix.saturating_sub(back)),
        None => super::clock::date(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        outcome: Outcome,
        ended_unix: u64,
        duration_s: f64,
        pause: Option<f64>,
    ) -> HistoryEntry {
        let mut rec = Record::for_tests("acme");
        rec.entered = vec![
            (State::Pending, 0),
            (State::BulkCopy, 1000),
            (State::Completed, 4500),
        ];
        let mut e = HistoryEntry::of(&rec, outcome);
        e.ended_unix = ended_unix;
        e.duration_s = duration_s;
        e.pause_ms = pause;
        e
    }

    #[test]
    fn an_entry_has_the_time_spent_in_each_state() {
        let e = entry(Outcome::Completed, 0, 0.0, None);
        let stays: Vec<(State, f64)> = e.states.iter().map(|s| (s.state, s.seconds)).collect();
        assert_eq!(stays, [(State::Pending, 1.0), (State::BulkCopy, 3.5)]);
    }

    #[test]
    fn the_summary_counts_today_the_last_week_and_pause_percentiles() {
        let now = 100 * 86_400 + 3_600;
        let entries = [
            entry(Outcome::Completed, now - 60, 10.0, Some(12.0)),
            entry(Outcome::Completed, now - 86_400, 30.0, Some(20.0)),
            entry(Outcome::Failed, now - 3 * 86_400, 5.0, None),
            entry(Outcome::Failed, now - 9 * 86_400, 5.0, None),
            entry(Outcome::RolledBack, now - 10, 8.0, Some(40.0)),
        ];
        let s = Summary::of(&entries, 2, now);
        assert_eq!(s.active, 2);
        assert_eq!(s.completed_today, 1);
        assert_eq!(s.failed_last_7_days, 1);
        assert_eq!(s.average_duration_s, Some(20.0));
        assert_eq!(s.pause_p50_ms, Some(20.0));
        assert_eq!(s.pause_p99_ms, Some(40.0));
        assert_eq!(Summary::of(&[], 0, now).pause_p50_ms, None);
    }

    #[test]
    fn since_takes_a_date_or_a_span() {
        let now = 1_765_000_000;
        assert_eq!(parse_since("7d", now), Some(now - 7 * 86_400));
        assert_eq!(parse_since("12h", now), Some(now - 12 * 3_600));
        assert_eq!(parse_since("1970-01-02", now), Some(86_400));
        assert_eq!(parse_since("2026-12-06", now), Some(1_796_515_200));
        assert_eq!(parse_since("2026-13-01", now), None);
        assert_eq!(parse_since("soon", now), None);
    }

    #[test]
    fn the_file_keeps_the_newest_entries() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::new(dir.path());
        for i in 0..30 {
            h.append(&entry(Outcome::Completed, i, 1.0, None), 8)
                .unwrap();
        }
        let kept = h.read().unwrap();
        assert!(kept.len() >= 8 && kept.len() <= 10, "{}", kept.len());
        assert_eq!(kept.last().unwrap().ended_unix, 29);
        // A torn last line is skipped.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap();
        f.write_all(b"{\"tenant\":\"ac").unwrap();
        assert_eq!(h.read().unwrap().len(), kept.len());
        h.append(&entry(Outcome::Completed, 30, 1.0, None), 8)
            .unwrap();
        assert_eq!(h.read().unwrap().last().unwrap().ended_unix, 30);
    }

    fn copied(tables: usize, rows: u64, secs: f64) -> HistoryEntry {
        let mut e = entry(Outcome::Completed, 0, 0.0, None);
        e.tables = tables;
        e.rows_copied = rows;
        e.states = vec![Stay {
            state: State::BulkCopy,
            seconds: secs,
        }];
        e
    }

    #[test]
    fn the_copy_model_separates_per_table_cost_from_the_rate() {
        // 50 ms per table, 100 000 rows/s.
        let truth = |t: usize, r: u64| t as f64 * 0.05 + r as f64 / 100_000.0;
        let h = [
            copied(3, 4_000, truth(3, 4_000)),
            copied(2, 300_000, truth(2, 300_000)),
        ];
        let m = copy_model(&h);
        assert!(m.fitted);
        assert!((m.per_table_s - 0.05).abs() < 1e-6, "{m:?}");
        assert!((m.rows_per_s - 100_000.0).abs() < 1.0, "{m:?}");
        // One move: the default per-table cost, the rate of the rest; the same move is estimated exactly.
        let one = copy_model(&h[..1]);
        assert!(!one.fitted);
        assert!((one.seconds(4_000, 3) - truth(3, 4_000)).abs() < 1e-9);
        // Nothing measured: the defaults.
        let none = copy_model(&[]);
        assert_eq!((none.rows_per_s, none.moves), (DEFAULT_COPY_ROWS_PER_S, 0));
    }
}
