//! `ctl`'s human-readable output: tables for lists, `key: value` lines for everything else. Lists are read
//! back into the server's own reply types, so a renamed field is a compile error, not a blank column.

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{CtlCommand, MigrateAction, TenantAction};
use crate::admin::reply::{
    AuditView, BackendList, BackupList, StatsView, TenantList, WebhookLogView,
};
use crate::migration::ops::reply::{HistoryView, Status, StatusList};

/// The result as the command's table, or as `key: value` lines.
pub fn human(cmd: &CtlCommand, result: &Value) -> String {
    let rendered = match cmd {
        CtlCommand::Tenants => typed(result, tenants),
        CtlCommand::Backends => typed(result, backends),
        CtlCommand::Stats => typed(result, stats),
        CtlCommand::Audit(_) => typed(result, audit),
        CtlCommand::Webhooks { .. } => typed(result, webhooks),
        CtlCommand::Tenant {
            action: TenantAction::Backups(_),
        } => typed(result, backups),
        CtlCommand::Migrate {
            action: MigrateAction::Status { who, .. },
        } if who.tenant.is_none() => typed(result, migrations),
        CtlCommand::Migrate {
            action: MigrateAction::History(_),
        } => typed(result, history),
        _ => None,
    };
    rendered.unwrap_or_else(|| key_values(result, ""))
}

fn typed<T: DeserializeOwned>(result: &Value, render: fn(T) -> String) -> Option<String> {
    serde_json::from_value(result.clone()).ok().map(render)
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or("-".into(), T::to_string)
}

fn tenants(list: TenantList) -> String {
    let rows = list
        .tenants
        .iter()
        .map(|t| {
            vec![
                t.tenant.to_string(),
                t.route.backend.to_string(),
                opt(&t.route.database),
                opt(&t.route.schema),
                if t.gate.paused { "paused" } else { "open" }.into(),
                t.sessions.to_string(),
                t.sessions_on_old_route.to_string(),
            ]
        })
        .collect();
    let headers = [
        "TENANT",
        "BACKEND",
        "DATABASE",
        "SCHEMA",
        "GATE",
        "SESSIONS",
        "ON_OLD_ROUTE",
    ];
    format!("epoch {}\n{}", list.epoch, table(&headers, rows))
}

fn stats(view: StatsView) -> String {
    let rows = view
        .tenant_stats
        .iter()
        .map(|t| {
            vec![
                t.tenant.to_string(),
                t.clients.to_string(),
                format!("{:.1}", t.xact_per_s),
                format!("{:.1}", t.query_per_s),
                format!("{:.2}", t.avg_xact_time_us as f64 / 1000.0),
                format!("{:.2}", t.avg_query_time_us as f64 / 1000.0),
                format!("{:.2}", t.avg_wait_time_us as f64 / 1000.0),
                format!("{:.0}", t.avg_recv),
                format!("{:.0}", t.avg_sent),
                t.total_xact_count.to_string(),
                t.total_query_count.to_string(),
                t.total_received.to_string(),
                t.total_sent.to_string(),
                t.total_errors.to_string(),
            ]
        })
        .collect();
    let headers = [
        "TENANT",
        "CLIENTS",
        "XACT/S",
        "QUERY/S",
        "AVG_XACT_MS",
        "AVG_QUERY_MS",
        "AVG_WAIT_MS",
        "RECV_B/S",
        "SENT_B/S",
        "XACTS",
        "QUERIES",
        "RECEIVED_B",
        "SENT_B",
        "ERRORS",
    ];
    let paused: Vec<String> = view.paused_tenants.iter().map(|t| t.to_string()).collect();
    format!(
        "uptime {} s, routing epoch {}, {} tenants routed, {} client sessions, paused: {}\n\n{}\n{}",
        view.uptime_s,
        view.epoch,
        view.tenants,
        view.client_sessions,
        if paused.is_empty() { "none".to_string() } else { paused.join(", ") },
        table(&headers, rows),
        backends(BackendList {
            backends: view.backends
        })
    )
}

fn backends(list: BackendList) -> String {
    let rows = list
        .backends
        .iter()
        .map(|b| {
            let pools: Vec<String> = b
                .pools
                .iter()
                .map(|p| format!("{}:{}/{}", p.database, p.active, p.open))
                .collect();
            vec![
                b.backend.clone(),
                format!("{}:{}", b.host, b.port),
                b.pool_size.to_string(),
                match &b.last_error {
                    None => "ok".into(),
                    Some(e) => e.clone(),
                },
                pools.join(" "),
            ]
        })
        .collect();
    let headers = [
        "BACKEND",
        "ADDRESS",
        "POOL_SIZE",
        "HEALTH",
        "POOLS (db:active/open)",
    ];
    table(&headers, rows)
}

fn audit(view: AuditView) -> String {
    let rows = view
        .entries
        .iter()
        .map(|e| {
            vec![
                e.seq.to_string(),
                e.time.clone(),
                e.actor.clone(),
                e.command.clone(),
                opt(&e.tenant),
                e.result.clone(),
            ]
        })
        .collect();
    let verified = if view.verified {
        "checksums verified".to_string()
    } else {
        format!(
            "CHECKSUM CHAIN BROKEN at line {}",
            opt(&view.broken_at_line)
        )
    };
    let headers = ["SEQ", "TIME", "ACTOR", "COMMAND", "TENANT", "RESULT"];
    format!("{}{verified}\n", table(&headers, rows))
}

fn backups(list: BackupList) -> String {
    let rows = list
        .backups
        .iter()
        .map(|b| {
            vec![
                b.taken_at.clone(),
                format!("{:?}", b.holds).to_lowercase(),
                format!("{}/{}/{}", b.backend, b.database, b.schema),
                b.tables.to_string(),
                b.rows.to_string(),
                b.size.to_string(),
                b.file.clone(),
            ]
        })
        .collect();
    let headers = ["TAKEN", "HOLDS", "FROM", "TABLES", "ROWS", "BYTES", "FILE"];
    format!("{} in {}\n{}", list.tenant, list.dir, table(&headers, rows))
}

fn webhooks(view: WebhookLogView) -> String {
    let rows = view
        .deliveries
        .iter()
        .map(|d| {
            vec![
                d.at.clone(),
                d.url.clone(),
                d.event.clone(),
                d.tenant.clone(),
                d.outcome.clone(),
                d.attempts.to_string(),
                opt(&d.status),
                format!("{} ms", d.duration_ms),
                opt(&d.error),
            ]
        })
        .collect();
    let headers = [
        "TIME", "URL", "EVENT", "TENANT", "OUTCOME", "ATTEMPTS", "STATUS", "TOOK", "ERROR",
    ];
    format!("{} receiver(s)\n{}", view.receivers, table(&headers, rows))
}

fn migrations(list: StatusList) -> String {
    let rows = list
        .migrations
        .iter()
        .map(|m| {
            vec![
                m.tenant.to_string(),
                m.state.clone(),
                format!("{}%", m.progress_percent),
                format!("{}/{}", m.rows_copied, m.rows_total),
                m.lag_events.to_string(),
                opt(&m.last_pause_ms),
                m.cutover_attempts.to_string(),
                opt(&m.verification.as_ref().map(|v| v.passed)),
                format!("{} -> {}", m.source.backend, m.target.backend),
            ]
        })
        .collect();
    let headers = [
        "TENANT", "STATE", "PROGRESS", "ROWS", "LAG", "PAUSE_MS", "ATTEMPTS", "VERIFIED", "ROUTE",
    ];
    table(&headers, rows)
}

/// A one-line progress bar for `migrate status --watch`.
pub fn progress_line(s: &Status) -> String {
    let pct = s.progress_percent.clamp(0.0, 100.0);
    let filled = (pct / 100.0 * 30.0).round() as usize;
    format!(
        "{:<8} [{}{}] {:>5.1}%  {:<14} rows {}/{}  lag {}  pause {} ms",
        s.tenant,
        "#".repeat(filled),
        ".".repeat(30 - filled),
        pct,
        s.state,
        s.rows_copied,
        s.rows_total,
        s.lag_events,
        s.last_pause_ms
            .map_or("-".to_string(), |p| format!("{p:.1}")),
    )
}

/// Renders rows as an aligned table.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        if let Some(last) = out.last_mut() {
            *last = last.trim_end().to_string();
        }
        out.join("  ") + "\n"
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out += &line(r);
    }
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn key_values(v: &Value, prefix: &str) -> String {
    match v {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match v {
                    Value::Object(_) => key_values(v, &key),
                    other => format!("{key}: {}\n", scalar(other)),
                }
            })
            .collect(),
        other => format!("{}\n", scalar(other)),
    }
}

fn history(view: HistoryView) -> String {
    let s = &view.summary;
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1} ms"));
    let head = format!(
        "active {}, completed today {}, failed in the last 7 days {}, average duration {}, pause p50 {} p99 {}",
        s.active,
        s.completed_today,
        s.failed_last_7_days,
        s.average_duration_s.map_or("-".into(), |d| format!("{d:.1} s")),
        ms(s.pause_p50_ms),
        ms(s.pause_p99_ms),
    );
    let rows = view
        .entries
        .iter()
        .map(|e| {
            vec![
                e.tenant.to_string(),
                serde_json::to_value(e.outcome)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                format!("{} -> {}", e.source.backend, e.target.backend),
                e.ended_at.clone(),
                format!("{:.1} s", e.duration_s),
                e.rows_copied.to_string(),
                e.bytes_copied.to_string(),
                ms(e.pause_ms),
                opt(&e.started_by),
            ]
        })
        .collect();
    let headers = [
        "TENANT", "OUTCOME", "MOVE", "ENDED", "DURATION", "ROWS", "BYTES", "PAUSE", "BY",
    ];
    format!("{head}\n{}", table(&headers, rows))
}
