//! The audit log: append-only JSON lines, one per admin command (and reload), each carrying an HMAC (keyed
//! with the proxy key, which lives outside the state directory) chained to the line before it, so an edited,
//! dropped or reordered line is detected, and whoever can write the log but not read the key cannot forge a
//! new chain. A line is fsynced before the command answers. Lines written before the key existed carry an
//! unkeyed checksum (`sum`); they verify only as a prefix of the log, never after a keyed line.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::key::ProxyKey;
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
    /// Unkeyed checksum of lines written by older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sum: Option<String>,
    /// HMAC-SHA-256 (first 16 bytes, hex) of the previous line's value and this line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl AuditEntry {
    /// The chain value this line carries.
    fn link(&self) -> &str {
        self.mac.as_deref().or(self.sum.as_deref()).unwrap_or("")
    }
}

struct Tail {
    file: File,
    seq: u64,
    sum: String,
}

pub struct AuditLog {
    path: PathBuf,
    key: ProxyKey,
    tail: Mutex<Tail>,
    /// Entries appended since the control plane last took them (only while `mirror` is on), for the shared
    /// audit table; bounded, the oldest dropped.
    outbox: Mutex<std::collections::VecDeque<AuditEntry>>,
    mirror: std::sync::atomic::AtomicBool,
}

/// The line as signed: without its chain fields.
fn body(entry: &AuditEntry) -> String {
    let mut bare = entry.clone();
    bare.sum = None;
    bare.mac = None;
    serde_json::to_string(&bare).unwrap_or_default()
}

/// Unkeyed checksum of older versions.
fn legacy_checksum(prev: &str, entry: &AuditEntry) -> String {
    let digest = Sha256::digest(format!("{prev}\n{}", body(entry)).as_bytes());
    hex(&digest[..16])
}

fn mac(key: &ProxyKey, prev: &str, entry: &AuditEntry) -> String {
    let m = key.mac(
        "pgtenant audit chain",
        &[prev.as_bytes(), b"\n", body(entry).as_bytes()],
    );
    hex(&m[..16])
}

/// Verifies a whole log's text; returns the entries, the last chain value, and the 1-based line of the first
/// problem (if any).
fn parse_chain(key: &ProxyKey, text: &str) -> (Vec<AuditEntry>, String, Option<usize>) {
    let mut prev = String::new();
    let mut entries = Vec::new();
    let mut bad = None;
    let mut keyed = false;
    for (i, line) in text.lines().enumerate() {
        let entry: AuditEntry = match serde_json::from_str(line) {
            Ok(e) => e,
            Err(_) => {
                bad.get_or_insert(i + 1);
                continue;
            }
        };
        let ok = match (&entry.mac, &entry.sum) {
            (Some(m), None) => {
                keyed = true;
                *m == mac(key, &prev, &entry)
            }
            // An unkeyed line after a keyed one is a forgery, however well it sums.
            (None, Some(s)) => !keyed && *s == legacy_checksum(&prev, &entry),
            _ => false,
        };
        if !ok {
            bad.get_or_insert(i + 1);
        }
        prev = entry.link().to_owned();
        entries.push(entry);
    }
    (entries, prev, bad)
}

/// Audit entries waiting for the control plane at most.
const OUTBOX_MAX: usize = 10_000;

impl AuditLog {
    /// Opens the log for appending. A last line without its newline was never acknowledged (we fsync before
    /// answering), so it is cut off.
    pub fn open(path: &Path, key: ProxyKey) -> Result<AuditLog, StateError> {
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
        let (entries, sum, _) = parse_chain(&key, &text);
        let seq = entries.last().map_or(0, |e| e.seq);
        Ok(AuditLog {
            path: path.to_owned(),
            key,
            tail: Mutex::new(Tail { file, seq, sum }),
            outbox: Mutex::new(std::collections::VecDeque::new()),
            mirror: std::sync::atomic::AtomicBool::new(false),
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
            mac: None,
        };
        entry.mac = Some(mac(&self.key, &tail.sum, &entry));
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
        tail.sum = entry.link().to_owned();
        tail.file.sync_data().map_err(err)?;
        if self.mirror.load(std::sync::atomic::Ordering::Relaxed) {
            let mut out = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
            if out.len() >= OUTBOX_MAX {
                out.pop_front();
            }
            out.push_back(entry.clone());
        }
        Ok(entry)
    }

    /// From now on, keeps appended entries for [`AuditLog::take_outbox`] (a control plane mirrors them).
    pub fn start_mirror(&self) {
        self.mirror
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The entries appended since the last call.
    pub fn take_outbox(&self) -> Vec<AuditEntry> {
        let mut out = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
        out.drain(..).collect()
    }

    /// Entries that could not be mirrored go back to the front, to be tried again.
    pub fn return_outbox(&self, entries: Vec<AuditEntry>) {
        let mut out = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
        for e in entries.into_iter().rev() {
            if out.len() < OUTBOX_MAX {
                out.push_front(e);
            }
        }
    }

    /// The last `n` entries and whether the whole chain verifies (`None`) or the line where it breaks.
    /// Reads the file under the writers' lock (no half-written line) and verifies the chain after letting go,
    /// so appends wait for a read, not for the verification of the whole chain.
    pub fn tail(&self, n: usize) -> Result<(Vec<AuditEntry>, Option<usize>), StateError> {
        let text = {
            let _writer = self.tail.lock().unwrap_or_else(|p| p.into_inner());
            std::fs::read_to_string(&self.path).map_err(|e| StateError::io(&self.path, e))?
        };
        let (mut entries, _, bad) = parse_chain(&self.key, &text);
        let skip = entries.len().saturating_sub(n);
        Ok((entries.split_off(skip), bad))
    }
}

/// Current UTC time as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339_at(now.as_secs() as i64, now.subsec_millis())
}

/// `unix` seconds as RFC 3339 UTC.
pub fn rfc3339_of(unix: u64) -> String {
    rfc3339_at(unix as i64, 0)
}

fn rfc3339_at(secs: i64, millis: u32) -> String {
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
        millis
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
        let log = AuditLog::open(&path, ProxyKey::for_tests(7)).unwrap();
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
        let log = AuditLog::open(&path, ProxyKey::for_tests(7)).unwrap();
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
    fn a_chain_rewritten_without_the_key_does_not_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, ProxyKey::for_tests(7)).unwrap();
        log.append("a", "pause", None, json!(null), json!(null), "ok")
            .unwrap();
        log.append("a", "resume", None, json!(null), json!(null), "ok")
            .unwrap();
        drop(log);
        // Someone with write access but another key re-signs an edited history.
        let text = std::fs::read_to_string(&path).unwrap();
        let mut prev = String::new();
        let forger = ProxyKey::for_tests(9);
        let mut forged = String::new();
        for line in text.replacen("\"pause\"", "\"tenant.remove\"", 1).lines() {
            let mut e: AuditEntry = serde_json::from_str(line).unwrap();
            e.mac = Some(mac(&forger, &prev, &e));
            prev = e.mac.clone().unwrap();
            forged.push_str(&serde_json::to_string(&e).unwrap());
            forged.push('\n');
        }
        std::fs::write(&path, forged).unwrap();
        let log = AuditLog::open(&path, ProxyKey::for_tests(7)).unwrap();
        assert_eq!(log.tail(10).unwrap().1, Some(1));
        // Nor does one rewritten in the old unkeyed form after keyed lines.
        let mut e: AuditEntry = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        e.mac = None;
        e.sum = Some(legacy_checksum("", &e));
        let legacy = serde_json::to_string(&e).unwrap();
        std::fs::write(
            &path,
            format!("{}\n{legacy}\n", text.lines().next().unwrap()),
        )
        .unwrap();
        assert_eq!(log.tail(10).unwrap().1, Some(2));
        // Lines of older versions at the start still verify.
        std::fs::write(&path, format!("{legacy}\n")).unwrap();
        assert_eq!(log.tail(10).unwrap().1, None);
    }

    #[test]
    fn torn_last_line_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, ProxyKey::for_tests(7)).unwrap();
        log.append("a", "x", None, json!(null), json!(null), "ok")
            .unwrap();
        drop(log);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":2,\"ti").unwrap();
        let log = AuditLog::open(&path, ProxyKey::for_tests(7)).unwrap();
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
