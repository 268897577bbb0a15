//! `pgtenant ctl`: the admin socket from the command line. Human-readable output by default, the raw result
//! with `--json`; exit status 1 (message on stderr) when the proxy refuses a request, 2 when it cannot be reached.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// Admin socket path (default: $PGTENANT_ADMIN_SOCKET, else admin_socket of --config, else /tmp/pgtenant.sock).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Config file to take the socket path from.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Print the raw JSON result.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// List routes, gates and sessions per tenant.
    Tenants,
    /// Show, change or remove one tenant's route.
    Tenant {
        #[command(subcommand)]
        action: TenantAction,
    },
    /// Backends with pool figures and health.
    Backends,
    /// Hold a tenant's new transactions; answers when its open transactions have finished.
    Pause {
        tenant: String,
        #[arg(long)]
        timeout_ms: Option<u64>,
    },
    /// Release a paused tenant's queue in order.
    Resume { tenant: String },
    /// Counters and figures.
    Stats,
    /// Re-read the config file and apply what can change live.
    Reload,
    /// The audit log.
    Audit {
        #[arg(long, default_value_t = 20)]
        tail: u64,
    },
    /// Live tenant migrations.
    Migrate {
        #[command(subcommand)]
        action: MigrateAction,
    },
}

#[derive(Subcommand, Debug)]
pub enum MigrateAction {
    /// Start moving a tenant to another backend (preflight, capture, bulk copy, dual write).
    Start {
        tenant: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        database: Option<String>,
        #[arg(long)]
        schema: Option<String>,
        /// Verification that must pass before cutover: count, hash or full (a list takes the strongest).
        #[arg(long)]
        verify: Option<String>,
        /// auto: cut over once verified and caught up; manual (default): wait for `migrate cutover`.
        #[arg(long)]
        cutover: Option<String>,
        /// Accept (and replace) rows the target already holds.
        #[arg(long)]
        allow_existing: bool,
        /// Shared tables: the column naming each row's tenant (migrates the tenant's rows of the tables that
        /// have it, in the route's schema or public).
        #[arg(long)]
        tenant_column: Option<String>,
        /// The tenant's value in that column (default: the tenant's name).
        #[arg(long)]
        tenant_key: Option<String>,
    },
    /// State, progress, lag, last pause.
    Status {
        tenant: Option<String>,
        /// Redraw a progress bar until the migration settles.
        #[arg(long)]
        watch: bool,
    },
    /// Switch the tenant to the target now.
    Cutover { tenant: String },
    /// Stop a migration before cutover and remove its capture.
    Abort {
        tenant: String,
        #[arg(long)]
        drop_target: bool,
    },
    /// Hold copy/tee work (not the tenant's traffic).
    Pause { tenant: String },
    /// Continue copy/tee work, or retry a failed migration.
    Resume { tenant: String },
    /// Compare source and target now.
    Verify {
        tenant: String,
        #[arg(long)]
        level: Option<String>,
    },
    /// Re-copy the ranges the last verification found different.
    Repair { tenant: String },
    /// Apply a schema change on both sides of a running move, in order, with the tenant held briefly (the
    /// tenant's own DDL is refused while its migration runs).
    Ddl {
        tenant: String,
        /// The statement(s), run with the tenant's schema as search_path.
        #[arg(long)]
        sql: String,
    },
    /// Move a migrated tenant back to its source.
    Rollback { tenant: String },
    /// End a migration: remove capture on both sides.
    Finalize {
        tenant: String,
        #[arg(long)]
        drop_source: bool,
    },
}

fn migrate_request(a: &MigrateAction) -> Value {
    match a {
        MigrateAction::Start {
            tenant,
            to,
            database,
            schema,
            verify,
            cutover,
            allow_existing,
            tenant_column,
            tenant_key,
        } => json!({"cmd": "migrate.start", "tenant": tenant, "to": to, "database": database,
            "schema": schema, "verify": verify, "cutover": cutover, "allow_existing": allow_existing,
            "tenant_column": tenant_column, "tenant_key": tenant_key}),
        MigrateAction::Status { tenant, .. } => json!({"cmd": "migrate.status", "tenant": tenant}),
        MigrateAction::Cutover { tenant } => json!({"cmd": "migrate.cutover", "tenant": tenant}),
        MigrateAction::Abort {
            tenant,
            drop_target,
        } => json!({"cmd": "migrate.abort", "tenant": tenant, "drop_target": drop_target}),
        MigrateAction::Pause { tenant } => json!({"cmd": "migrate.pause", "tenant": tenant}),
        MigrateAction::Resume { tenant } => json!({"cmd": "migrate.resume", "tenant": tenant}),
        MigrateAction::Verify { tenant, level } => {
            json!({"cmd": "migrate.verify", "tenant": tenant, "level": level})
        }
        MigrateAction::Repair { tenant } => json!({"cmd": "migrate.repair", "tenant": tenant}),
        MigrateAction::Ddl { tenant, sql } => {
            json!({"cmd": "migrate.ddl", "tenant": tenant, "sql": sql})
        }
        MigrateAction::Rollback { tenant } => json!({"cmd": "migrate.rollback", "tenant": tenant}),
        MigrateAction::Finalize {
            tenant,
            drop_source,
        } => json!({"cmd": "migrate.finalize", "tenant": tenant, "drop_source": drop_source}),
    }
}

/// A one-line progress bar for `migrate status --watch`.
pub fn progress_line(r: &Value) -> String {
    let pct = r["progress_percent"]
        .as_f64()
        .unwrap_or(0.0)
        .clamp(0.0, 100.0);
    let filled = (pct / 100.0 * 30.0).round() as usize;
    format!(
        "{:<8} [{}{}] {:>5.1}%  {:<14} rows {}/{}  lag {}  pause {} ms",
        s(&r["tenant"]),
        "#".repeat(filled),
        ".".repeat(30 - filled),
        pct,
        s(&r["state"]),
        s(&r["rows_copied"]),
        s(&r["rows_total"]),
        s(&r["lag_events"]),
        r["last_pause_ms"]
            .as_f64()
            .map_or("-".to_string(), |p| format!("{p:.1}")),
    )
}

/// Redraws the progress line until the migration reaches a settled state; returns the exit code.
async fn watch(socket: &Path, tenant: &str) -> i32 {
    use std::io::Write;
    loop {
        let r = match send(socket, &json!({"cmd": "migrate.status", "tenant": tenant})).await {
            Ok(r) if r["ok"] == json!(true) => r["result"].clone(),
            Ok(r) => {
                eprintln!(
                    "\npgtenant ctl: {}: {}",
                    s(&r["error"]["code"]),
                    s(&r["error"]["message"])
                );
                return 1;
            }
            Err(e) => {
                eprintln!("\npgtenant ctl: {e}");
                return 2;
            }
        };
        print!("\r{}", progress_line(&r));
        let _ = std::io::stdout().flush();
        let state = r["state"].as_str().unwrap_or("");
        if ["migrated", "completed", "rolled_back", "failed"].contains(&state) {
            println!();
            return 0;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[derive(Subcommand, Debug)]
pub enum TenantAction {
    Get {
        tenant: String,
    },
    Set {
        tenant: String,
        /// The backend (a `[backends.NAME]` of the config) the tenant's connections go to.
        #[arg(long)]
        backend: String,
        /// Database on the backend (default: the backend's, else the one the client asks for).
        #[arg(long)]
        database: Option<String>,
        /// Schema of the tenant's own (its search_path); none for a database of its own.
        #[arg(long)]
        schema: Option<String>,
        /// `role` (log in as the tenant's own role) or `shared` (the backend's serving role); default: the
        /// backend's `isolation`.
        #[arg(long)]
        isolation: Option<String>,
        /// Login role for isolation = role (default: the backend's tenant_role template).
        #[arg(long)]
        role: Option<String>,
        /// The tenant's rows live in shared tables told apart by this column.
        #[arg(long)]
        tenant_column: Option<String>,
        /// The tenant's value in that column (default: the tenant's name).
        #[arg(long)]
        tenant_key: Option<String>,
    },
    Remove {
        tenant: String,
    },
    /// Print the SQL that creates the tenant's role and grants it exactly its data (schema, database, or rows
    /// of shared tables with row-level security); --apply runs it with the backend's admin credentials.
    Grants {
        tenant: String,
        #[arg(long)]
        apply: bool,
    },
}

fn request(cmd: &CtlCommand) -> Value {
    match cmd {
        CtlCommand::Tenants => json!({"cmd": "tenants"}),
        CtlCommand::Tenant { action } => match action {
            TenantAction::Get { tenant } => json!({"cmd": "tenant.get", "tenant": tenant}),
            TenantAction::Set {
                tenant,
                backend,
                database,
                schema,
                isolation,
                role,
                tenant_column,
                tenant_key,
            } => json!({
                "cmd": "tenant.set", "tenant": tenant, "backend": backend, "database": database,
                "schema": schema, "isolation": isolation, "role": role, "tenant_column": tenant_column,
                "tenant_key": tenant_key,
            }),
            TenantAction::Grants { tenant, apply } => {
                json!({"cmd": "tenant.grants", "tenant": tenant, "apply": apply})
            }
            TenantAction::Remove { tenant } => json!({"cmd": "tenant.remove", "tenant": tenant}),
        },
        CtlCommand::Backends => json!({"cmd": "backends"}),
        CtlCommand::Pause { tenant, timeout_ms } => {
            json!({"cmd": "pause", "tenant": tenant, "timeout_ms": timeout_ms})
        }
        CtlCommand::Resume { tenant } => json!({"cmd": "resume", "tenant": tenant}),
        CtlCommand::Stats => json!({"cmd": "stats"}),
        CtlCommand::Reload => json!({"cmd": "reload"}),
        CtlCommand::Audit { tail } => json!({"cmd": "audit", "tail": tail}),
        CtlCommand::Migrate { action } => migrate_request(action),
    }
}

/// Where the admin socket is, by the documented order of precedence.
pub fn socket_path(args: &CtlArgs) -> PathBuf {
    if let Some(s) = &args.socket {
        return s.clone();
    }
    if let Some(s) = std::env::var_os("PGTENANT_ADMIN_SOCKET") {
        return s.into();
    }
    let config = args.config.clone().or_else(|| {
        let default = PathBuf::from("pgtenant.toml");
        default.exists().then_some(default)
    });
    if let Some(path) = config.and_then(|p| socket_from_config(&p)) {
        return path;
    }
    PathBuf::from("pgtenant-state/run/admin.sock")
}

/// The admin socket a config file names, read without resolving the file's secrets (an operator running
/// `ctl` may not be able to read the proxy's password files or see its environment).
fn socket_from_config(path: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(path).ok()?;
    let table: toml::Table = toml::from_str(&text).ok()?;
    let proxy = table.get("proxy").and_then(|p| p.as_table());
    let get = |key: &str| proxy.and_then(|p| p.get(key)).and_then(|v| v.as_str());
    Some(crate::config::admin_socket_for(
        Path::new(get("admin_socket").unwrap_or("")),
        Path::new(get("state_dir").unwrap_or("./pgtenant-state")),
    ))
}

/// Refuses to talk to a socket served by another user: someone who created the socket path first (in a shared
/// directory such as /tmp) would otherwise receive our commands and could answer them with anything.
fn check_peer(stream: &UnixStream, socket: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let theirs = stream
        .peer_cred()
        .map_err(|e| format!("cannot check who serves {}: {e}", socket.display()))?
        .uid();
    // The owner of /proc/self is this process's effective user.
    let ours = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .map_err(|e| format!("cannot tell this process's user: {e}"))?;
    if theirs != ours && theirs != 0 {
        return Err(format!(
            "refusing to talk to {}: it is served by uid {theirs}, not by this user (uid {ours}) or root",
            socket.display()
        ));
    }
    Ok(())
}

/// Sends one request and returns the response object.
pub async fn send(socket: &Path, request: &Value) -> Result<Value, String> {
    let run = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| format!("cannot reach pgtenant at {}: {e}", socket.display()))?;
        check_peer(&stream, socket)?;
        let (read, mut write) = stream.into_split();
        let mut line = request.to_string();
        line.push('\n');
        write
            .write_all(line.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = String::new();
        BufReader::new(read)
            .read_line(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_str::<Value>(&answer).map_err(|e| format!("bad answer from pgtenant: {e}"))
    };
    tokio::time::timeout(Duration::from_secs(3600), run)
        .await
        .map_err(|_| "no answer from pgtenant".to_string())?
}

/// Runs the command; returns the process exit code.
pub async fn run(args: CtlArgs) -> i32 {
    let socket = socket_path(&args);
    if let CtlCommand::Migrate {
        action:
            MigrateAction::Status {
                tenant: Some(t),
                watch: true,
            },
    } = &args.command
    {
        return watch(&socket, t).await;
    }
    let response = match send(&socket, &request(&args.command)).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgtenant ctl: {e}");
            return 2;
        }
    };
    if response["ok"] != json!(true) {
        let code = response["error"]["code"].as_str().unwrap_or("error");
        let message = response["error"]["message"].as_str().unwrap_or("");
        if args.json {
            println!("{response}");
        }
        eprintln!("pgtenant ctl: {code}: {message}");
        return 1;
    }
    let result = &response["result"];
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(result).unwrap_or_default()
        );
    } else {
        print!("{}", human(&args.command, result));
    }
    0
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
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

fn human(cmd: &CtlCommand, r: &Value) -> String {
    match cmd {
        CtlCommand::Tenants => {
            let rows = r["tenants"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    vec![
                        s(&t["tenant"]),
                        s(&t["backend"]),
                        s(&t["database"]),
                        s(&t["schema"]),
                        if t["gate"]["paused"] == json!(true) {
                            "paused".into()
                        } else {
                            "open".into()
                        },
                        s(&t["sessions"]),
                        s(&t["sessions_on_old_route"]),
                    ]
                })
                .collect();
            format!(
                "epoch {}\n{}",
                s(&r["epoch"]),
                table(
                    &[
                        "TENANT",
                        "BACKEND",
                        "DATABASE",
                        "SCHEMA",
                        "GATE",
                        "SESSIONS",
                        "ON_OLD_ROUTE"
                    ],
                    rows
                )
            )
        }
        CtlCommand::Backends => {
            let rows = r["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    let pools: Vec<String> = b["pools"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| {
                            format!(
                                "{}:{}/{}",
                                s(&p["database"]),
                                s(&p["active"]),
                                s(&p["open"])
                            )
                        })
                        .collect();
                    vec![
                        s(&b["backend"]),
                        format!("{}:{}", s(&b["host"]), s(&b["port"])),
                        s(&b["pool_size"]),
                        if b["healthy"] == json!(true) {
                            "ok".into()
                        } else {
                            s(&b["last_error"])
                        },
                        pools.join(" "),
                    ]
                })
                .collect();
            table(
                &[
                    "BACKEND",
                    "ADDRESS",
                    "POOL_SIZE",
                    "HEALTH",
                    "POOLS (db:active/open)",
                ],
                rows,
            )
        }
        CtlCommand::Audit { .. } => {
            let rows = r["entries"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    vec![
                        s(&e["seq"]),
                        s(&e["time"]),
                        s(&e["actor"]),
                        s(&e["command"]),
                        s(&e["tenant"]),
                        s(&e["result"]),
                    ]
                })
                .collect();
            let verified = if r["verified"] == json!(true) {
                "checksums verified".to_string()
            } else {
                format!("CHECKSUM CHAIN BROKEN at line {}", s(&r["broken_at_line"]))
            };
            format!(
                "{}{verified}\n",
                table(
                    &["SEQ", "TIME", "ACTOR", "COMMAND", "TENANT", "RESULT"],
                    rows
                )
            )
        }
        CtlCommand::Migrate {
            action: MigrateAction::Status { tenant: None, .. },
        } => {
            let rows = r["migrations"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    vec![
                        s(&m["tenant"]),
                        s(&m["state"]),
                        format!("{}%", s(&m["progress_percent"])),
                        format!("{}/{}", s(&m["rows_copied"]), s(&m["rows_total"])),
                        s(&m["lag_events"]),
                        s(&m["last_pause_ms"]),
                        s(&m["cutover_attempts"]),
                        s(&m["verification"]["passed"]),
                        format!(
                            "{} -> {}",
                            s(&m["source"]["backend"]),
                            s(&m["target"]["backend"])
                        ),
                    ]
                })
                .collect();
            table(
                &[
                    "TENANT", "STATE", "PROGRESS", "ROWS", "LAG", "PAUSE_MS", "ATTEMPTS",
                    "VERIFIED", "ROUTE",
                ],
                rows,
            )
        }
        _ => key_values(r, ""),
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
                    other => format!("{key}: {}\n", s(other)),
                }
            })
            .collect(),
        other => format!("{}\n", s(other)),
    }
}
