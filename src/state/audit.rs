//! The audit log: append-only JSON lines, one per admin command (and reload), each carrying a checksum chained
//! to the line before it, so an edited, dropped or reordered line is detected. A line is fsynced before the
//! command answers.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{hex, StateError};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditEntry {
    pub seq: u64,
    /// UTC, RFC 3339.
    pub time: String,
    /// Who: `uid:<n>` for the unix socket, `tcp:<addr>` for the token listener, `signal:SIGHUP`, `proxy`.
    pub actor: String,
    pub command: String,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub before: serde_json::Value,
    #[serde(default)]
    pub after: serde_json::Value,
    /// `ok`, or `error: <code>`.
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sum: Option<String>,
}

struct Tail {
    file: File,
    seq: u64,
    sum: String,
}

pub struct AuditLog {
    path: PathBuf,
    tail: Mutex<Tail>,
}

fn checksum(prev: &str, entry: &AuditEntry) -> String {
    let mut unsummed = entry.clone();
    unsummed.sum = None;
    let json = serde_json::to_string(&unsummed).unwrap_or_default();
    let digest = Sha256::digest(format!("{prev}\n{json}").as_bytes());
    hex(&digest[..16])
}

/// Verifies a whole log's text; returns the entries, the last checksum, and the 1-based line of the first
/// problem (if any).
fn parse_chain(text: &str) -> (Vec<AuditEntry>, String, Option<usize>) {
    let mut prev = String::new();
    let mut entries = Vec::new();
    let mut bad = None;
    for (i, line) in text.lines().enumerate() {
        let entry: AuditEntry = match serde_json::from_str(line) {
            Ok(e) => e,
            Err(_) => {
                bad.get_or_insert(i + 1);
                continue;
            }
        };
        let expected = checksum(&prev, &entry);
        if entry.sum.as_deref() != Some(expected.as_str()) {
            bad.get_or_insert(i + 1);
        }
        prev = entry.sum.clone().unwrap_or_default();
        entries.push(entry);
    }
    (entries, prev, bad)
}

impl AuditLog {
    /// Opens the log for appending. A last line without its newline was never acknowledged (we fsync before
    /// answering), so it is cut off.
    pub fn open(path: &Path) -> Result<AuditLog, StateError> {
        let err = |e| StateError::io(path, e);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(err)?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(err)?;
        if !text.is_empty() && !text.ends_with('\n') {
            let keep = text.rfind('\n').map_or(0, |i| i + 1);
            file.set_len(keep as u64).map_err(err)?;
            file.seek(SeekFrom::End(0)).map_err(err)?;
            text.truncate(keep);
        }
        let (entries, sum, _) = parse_chain(&text);
        let seq = entries.last().map_or(0, |e| e.seq);
        Ok(AuditLog {
            path: path.to_owned(),
            tail: Mutex::new(Tail { file, seq, sum }),
        })
    }

    /// Appends an entry (seq, time and checksum are filled in) and fsyncs it.
    pub fn append(
        &self,
        actor: &str,
        command: &str,
        tenant: Option<&str>,
        before: serde_json::Value,
        after: serde_json::Value,
        result: &str,
    ) -> Result<AuditEntry, StateError> {
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let mut entry = AuditEntry {
            seq: tail.seq + 1,
            time: rfc3339_now(),
            actor: actor.to_owned(),
            command: command.to_owned(),
            tenant: tenant.map(str::to_owned),
            before,
            after,
            result: result.to_owned(),
            sum: None,
        };
        entry.sum = Some(checksum(&tail.sum, &entry));
        let mut line = serde_json::to_string(&entry).unwrap_or_default();
        line.push('\n');
        let err = |e| StateError::io(&self.path, e);
        let len_before = tail.file.metadata().map_err(err)?.len();
        if let Err(e) = tail.file.write_all(line.as_bytes()) {
            // Never leave half a line for the next entry to be glued onto.
            let _ = tail.file.set_len(len_before);
            return Err(err(e));
        }
        // The line is in the file now: the chain moves on even if the fsync below fails.
        tail.seq = entry.seq;
        tail.sum = entry.sum.clone().unwrap_or_default();
        tail.file.sync_data().map_err(err)?;
        Ok(entry)
    }

    /// The last `n` entries and whether the whole chain verifies (`None`) or the line where it breaks.
    pub fn tail(&self, n: usize) -> Result<(Vec<AuditEntry>, Option<usize>), StateError> {
        let _writer = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let text =
            std::fs::read_to_string(&self.path).map_err(|e| StateError::io(&self.path, e))?;
        let (mut entries, _, bad) = parse_chain(&text);
        let skip = entries.len().saturating_sub(n);
        Ok((entries.split_off(skip), bad))
    }
}

/// Current UTC time as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chain_verifies_and_detects_edits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        log.append(
            "uid:0",
            "tenant.set",
            Some("acme"),
            json!(null),
            json!({"backend": "b"}),
            "ok",
        )
        .unwrap();
        log.append(
            "uid:0",
            "pause",
            Some("acme"),
            json!(null),
            json!(null),
            "ok",
        )
        .unwrap();
        let (entries, bad) = log.tail(10).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(bad, None);
        assert_eq!(entries[1].seq, 2);
        drop(log);
        // Reopen continues the chain.
        let log = AuditLog::open(&path).unwrap();
        log.append(
            "uid:0",
            "resume",
            Some("acme"),
            json!(null),
            json!(null),
            "ok",
        )
        .unwrap();
        assert_eq!(log.tail(1).unwrap().0[0].seq, 3);
        assert_eq!(log.tail(10).unwrap().1, None);
        // An edited line breaks the chain there.
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replacen("\"pause\"", "\"resume\"", 1)).unwrap();
        assert_eq!(log.tail(10).unwrap().1, Some(2));
    }

    #[test]
    fn torn_last_line_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        log.append("a", "x", None, json!(null), json!(null), "ok")
            .unwrap();
        drop(log);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":2,\"ti").unwrap();
        let log = AuditLog::open(&path).unwrap();
        log.append("a", "y", None, json!(null), json!(null), "ok")
            .unwrap();
        let (entries, bad) = log.tail(10).unwrap();
        assert_eq!((entries.len(), bad), (2, None));
    }

    #[test]
    fn time_format() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 24);
        assert!(t.starts_with("20") && t.ends_with('Z'));
    }
}
