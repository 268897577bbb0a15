//! Row sets of the console: command results (JSON, the admin replies) flattened into columns, and the listings
//! that have no command of their own (pools, servers, stats, config, version, help).

use serde_json::{Map, Value};

use super::parse::Listing;
use crate::admin::reply::{BackendList, ClientList, StatsView};
use crate::context::Shared;

#[derive(Debug, Default, PartialEq)]
pub struct RowSet {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl RowSet {
    fn new(columns: &[&str]) -> RowSet {
        RowSet {
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    fn push(&mut self, row: Vec<String>) {
        self.rows.push(row.into_iter().map(Some).collect());
    }
}

/// A JSON value as one cell: text as it is, numbers and booleans printed, arrays joined, null as NULL.
fn cell(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => Some(a.iter().filter_map(cell).collect::<Vec<_>>().join(", ")),
        other => Some(other.to_string()),
    }
}

/// Nested objects become dotted columns (`route.backend`).
fn flatten(prefix: &str, o: &Map<String, Value>, out: &mut Vec<(String, Option<String>)>) {
    for (k, v) in o {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Object(inner) => flatten(&key, inner, out),
            other => out.push((key, cell(other))),
        }
    }
}

/// One row per object, the union of their (flattened) fields as columns, in first-seen order.
pub fn table(items: &[Value]) -> RowSet {
    let flat: Vec<Vec<(String, Option<String>)>> = items
        .iter()
        .map(|i| {
            let mut out = Vec::new();
            if let Value::Object(o) = i {
                flatten("", o, &mut out);
            }
            out
        })
        .collect();
    let mut columns: Vec<String> = Vec::new();
    for row in &flat {
        for (k, _) in row {
            if !columns.contains(k) {
                columns.push(k.clone());
            }
        }
    }
    let rows = flat
        .into_iter()
        .map(|row| {
            columns
                .iter()
                .map(|c| {
                    row.iter()
                        .find(|(k, _)| k == c)
                        .and_then(|(_, v)| v.clone())
                })
                .collect()
        })
        .collect();
    RowSet { columns, rows }
}

/// `key | value` rows of a result.
pub fn key_values(v: &Value) -> RowSet {
    let mut set = RowSet::new(&["key", "value"]);
    let mut out = Vec::new();
    match v {
        Value::Object(o) => flatten("", o, &mut out),
        other => out.push(("result".into(), cell(other))),
    }
    set.rows = out.into_iter().map(|(k, v)| vec![Some(k), v]).collect();
    set
}

/// The rows a listing shows of `result` (the command's answer).
pub fn of_result(listing: Listing, result: &Value) -> RowSet {
    let list = |field: &str| {
        result
            .get(field)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    match listing {
        Listing::Tenants => table(&list("tenants")),
        Listing::Clients => table(&list("clients")),
        Listing::Backends => {
            let mut items = list("backends");
            for b in items.iter_mut().filter_map(Value::as_object_mut) {
                b.remove("pools"); // SHOW POOLS has them
            }
            table(&items)
        }
        Listing::Migrations => table(&list("migrations")),
        Listing::Audit => table(&list("entries")),
        Listing::Queue => table(&list("queued")),
        Listing::History => table(&list("entries")),
        Listing::Tenant => {
            let mut o = result.clone();
            if let Some(m) = o.as_object_mut() {
                m.remove("sessions");
            }
            key_values(&o)
        }
        _ => key_values(result),
    }
}

/// `SHOW POOLS`: one row per (backend, database, role) pool, in PgBouncer's column names where one exists.
pub fn pools(list: &BackendList, pool_mode: &str) -> RowSet {
    let mut set = RowSet::new(&[
        "backend",
        "database",
        "user",
        "cl_waiting",
        "sv_active",
        "sv_idle",
        "sv_open",
        "pool_size",
        "pool_mode",
    ]);
    for b in &list.backends {
        for p in &b.pools {
            set.push(vec![
                b.backend.clone(),
                p.database.clone(),
                p.role.clone(),
                p.waiting.to_string(),
                p.active.to_string(),
                p.idle.to_string(),
                p.open.to_string(),
                b.pool_size.to_string(),
                pool_mode.to_owned(),
            ]);
        }
    }
    set
}

/// `SHOW SERVERS`: one row per backend connection: the ones clients hold now (`active`), then each pool's idle
/// ones (PgBouncer's columns where they apply; `remote_pid` is the backend's process id).
pub fn servers(list: &BackendList, clients: &ClientList) -> RowSet {
    let mut set = RowSet::new(&[
        "type",
        "backend",
        "database",
        "user",
        "state",
        "addr",
        "port",
        "remote_pid",
        "tenant",
        "client_id",
        "connected_s",
        "idle_ms",
    ]);
    let text = |v: Option<String>| v.unwrap_or_default();
    for c in &clients.clients {
        let (Some(pid), Some(addr)) = (c.server_pid, &c.server_addr) else {
            continue;
        };
        let (host, port) = addr.rsplit_once(':').unwrap_or((addr.as_str(), ""));
        let backend = text(c.backend.as_ref().map(|b| b.to_string()));
        // A route without a database of its own uses its backend's.
        let database = c.database.clone().or_else(|| {
            let b = list.backends.iter().find(|b| b.backend == backend)?;
            b.database.clone()
        });
        set.push(vec![
            "S".into(),
            backend,
            text(database),
            text(c.server_role.clone()),
            "active".into(),
            host.to_owned(),
            port.to_owned(),
            pid.to_string(),
            text(c.tenant.as_ref().map(|t| t.to_string())),
            c.id.to_string(),
            String::new(),
            "0".into(),
        ]);
    }
    for b in &list.backends {
        for p in &b.pools {
            for s in &p.idle_servers {
                set.push(vec![
                    "S".into(),
                    b.backend.clone(),
                    p.database.clone(),
                    p.role.clone(),
                    "idle".into(),
                    b.host.clone(),
                    b.port.to_string(),
                    s.pid.to_string(),
                    text(s.last_tenant.as_ref().map(|t| t.to_string())),
                    String::new(),
                    s.connected_s.to_string(),
                    s.idle_ms.to_string(),
                ]);
            }
        }
    }
    set
}

/// `SHOW STATS`: per tenant, totals since start and the last period's averages (PgBouncer's names, with
/// `tenant` for `database`; times in microseconds).
pub fn stats(view: &StatsView) -> RowSet {
    let mut set = RowSet::new(&[
        "tenant",
        "total_xact_count",
        "total_query_count",
        "total_received",
        "total_sent",
        "total_xact_time",
        "total_query_time",
        "total_wait_time",
        "total_errors",
        "avg_xact_count",
        "avg_query_count",
        "avg_recv",
        "avg_sent",
        "avg_xact_time",
        "avg_query_time",
        "avg_wait_time",
        "clients",
    ]);
    for t in &view.tenant_stats {
        set.push(vec![
            t.tenant.to_string(),
            t.total_xact_count.to_string(),
            t.total_query_count.to_string(),
            t.total_received.to_string(),
            t.total_sent.to_string(),
            t.total_xact_time_us.to_string(),
            t.total_query_time_us.to_string(),
            t.total_wait_time_us.to_string(),
            t.total_errors.to_string(),
            format!("{:.2}", t.xact_per_s),
            format!("{:.2}", t.query_per_s),
            format!("{:.0}", t.avg_recv),
            format!("{:.0}", t.avg_sent),
            t.avg_xact_time_us.to_string(),
            t.avg_query_time_us.to_string(),
            t.avg_wait_time_us.to_string(),
            t.clients.to_string(),
        ]);
    }
    set
}

/// `SHOW CONFIG`: the settings of `[proxy]` and `[migration]` (no secrets: tokens and passwords are left out),
/// with whether `reload` changes them.
pub fn config(shared: &Shared) -> RowSet {
    const RESTART: &[&str] = &[
        "listen",
        "admin_socket",
        "admin_listen",
        "metrics_listen",
        "state_dir",
        "pool_mode",
        "max_client_conn",
        "workers",
        "key_file",
        "max_login_conn",
    ];
    const SECRET: &[&str] = &["admin_token"];
    let c = shared.config.load();
    let mut set = RowSet::new(&["key", "value", "changeable"]);
    for (section, value) in [
        ("proxy", serde_json::to_value(&c.proxy)),
        ("migration", serde_json::to_value(&c.migration)),
    ] {
        let Ok(Value::Object(o)) = value else {
            continue;
        };
        for (k, v) in o.iter().filter(|(k, _)| !SECRET.contains(&k.as_str())) {
            let changeable = section == "migration" || !RESTART.contains(&k.as_str());
            set.rows.push(vec![
                Some(format!("{section}.{k}")),
                cell(v),
                Some(if changeable { "yes" } else { "no" }.into()),
            ]);
        }
    }
    set
}

pub fn version() -> RowSet {
    let mut set = RowSet::new(&["version"]);
    set.push(vec![concat!("pgtenant ", env!("CARGO_PKG_VERSION")).into()]);
    set
}

pub fn help() -> RowSet {
    let mut set = RowSet::new(&["command", "does"]);
    for (c, d) in [
        ("SHOW TENANTS | TENANT t", "routes, gates and sessions"),
        (
            "SHOW POOLS | SERVERS | CLIENTS",
            "backend pools, their connections, client sessions",
        ),
        (
            "SHOW STATS",
            "per tenant: transactions and queries per second, average transaction time, errors",
        ),
        ("SHOW BACKENDS", "backends and their health"),
        (
            "SHOW MIGRATIONS | QUEUE | HISTORY [t]",
            "moves in flight, queued, finished",
        ),
        (
            "SHOW AUDIT [n] | CONFIG | VERSION",
            "audit log, settings, version",
        ),
        (
            "PAUSE [t] | RESUME [t]",
            "hold / release a tenant's new transactions (all tenants without t)",
        ),
        ("KILL t", "end a tenant's client sessions"),
        ("RELOAD", "re-read the config file"),
        (
            "MIGRATE START t TO b [VERIFY l] [CUTOVER auto] [AT time] [BACKUP]",
            "start (or queue) a move",
        ),
        (
            "MIGRATE STATUS|VERIFY|CUTOVER|ROLLBACK|FINALIZE|ABORT|PAUSE|RESUME|CANCEL t",
            "as pgtenant ctl migrate",
        ),
    ] {
        set.push(vec![c.into(), d.into()]);
    }
    set
}
