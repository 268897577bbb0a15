//! `pgtenant ctl`: the admin socket from the command line. Human-readable output by default, the raw result
//! with `--json`; exit status 1 (message on stderr) when the proxy refuses a request, 2 when it cannot be reached.

use std::path::{Path, PathBuf};
use std::time::Duration;

mod render;

use clap::{Args, Subcommand};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::admin::reply::Response;
use crate::admin::request::{
    Abort, Audit, BackupArgs, BackupsArgs, Ddl, Finalize, Grants, HistoryArgs, MaybeTenant, NoArgs,
    Pause, PauseAll, Request, RestoreArgs, SetRoute, TenantArg, Verify,
};
use crate::migration::ops::reply::Status;
use crate::migration::ops::StartRequest;
use crate::tenant::TenantId;

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// Admin socket path (default: $PGTENANT_ADMIN_SOCKET, else admin_socket of --config or ./pgtenant.toml, else
    /// pgtenant-state/run/admin.sock).
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
    /// Every client session: user, tenant, backend, route epoch, transaction state.
    Clients,
    /// The proxy instances sharing the control plane, with the route epoch each has applied.
    Instances,
    /// Hold a tenant's new transactions; answers when its open transactions have finished.
    Pause(Pause),
    /// Release a paused tenant's queue in order.
    Resume(TenantArg),
    /// Hold every tenant's new transactions (PgBouncer's global PAUSE); answers when none is open.
    PauseAll(PauseAll),
    /// Open every tenant's gate (ends a global pause and tenants' own).
    ResumeAll,
    /// Counters and figures.
    Stats,
    /// Re-read the config file and apply what can change live.
    Reload,
    /// The audit log.
    Audit(Audit),
    /// Webhook deliveries.
    Webhooks {
        #[command(subcommand)]
        action: WebhooksAction,
    },
    /// Live tenant migrations.
    Migrate {
        #[command(subcommand)]
        action: MigrateAction,
    },
}

#[derive(Subcommand, Debug)]
pub enum WebhooksAction {
    /// The last deliveries: receiver, event, outcome, attempts (kept in memory, the newest 1 000).
    Log(Audit),
}

#[derive(Subcommand, Debug)]
pub enum TenantAction {
    /// One tenant's route, gate and sessions.
    Get(TenantArg),
    /// Add or change a tenant's route (live).
    Set(SetRoute),
    /// Remove a tenant's route.
    Remove(TenantArg),
    /// End the tenant's client sessions now (each gets 57P01 saying why).
    Kill(TenantArg),
    /// Print the SQL that creates the tenant's role and grants it exactly its data (schema, database, or rows
    /// of shared tables with row-level security); --apply runs it with the backend's admin credentials.
    Grants(Grants),
    /// Write a consistent snapshot of the tenant (its schema, or its rows of shared tables) to a file with a
    /// manifest and checksums.
    Backup(BackupArgs),
    /// List the tenant's backups, newest first.
    Backups(BackupsArgs),
    /// Restore a backup (checksums checked first) to a backend, under the same or a new tenant name; never
    /// overwrites.
    Restore(RestoreArgs),
}

#[derive(Subcommand, Debug)]
pub enum MigrateAction {
    /// Start moving a tenant to another backend (preflight, capture, bulk copy, dual write).
    Start(StartRequest),
    /// State, progress, lag, last pause.
    Status {
        #[command(flatten)]
        who: MaybeTenant,
        /// Redraw a progress bar until the migration settles.
        #[arg(long)]
        watch: bool,
    },
    /// How big and how long a move would be (same preflight as start; nothing installed).
    Estimate(StartRequest),
    /// Moves queued with `start --at`, in the order they would start.
    Queue,
    /// Drop a queued move.
    Cancel(TenantArg),
    /// Finished moves (completed, rolled back, aborted, failed) with their figures, and a summary.
    History(HistoryArgs),
    /// Switch the tenant to the target now.
    Cutover(TenantArg),
    /// Stop a migration before cutover and remove its capture.
    Abort(Abort),
    /// Hold copy/tee work (not the tenant's traffic).
    Pause(TenantArg),
    /// Continue copy/tee work, or retry a failed migration.
    Resume(TenantArg),
    /// Compare source and target now.
    Verify(Verify),
    /// Re-copy the ranges the last verification found different.
    Repair(TenantArg),
    /// Apply a schema change on both sides of a running move, in order, with the tenant held briefly (the
    /// tenant's own DDL is refused while its migration runs).
    Ddl(Ddl),
    /// Move a migrated tenant back to its source.
    Rollback(TenantArg),
    /// End a migration: remove capture on both sides.
    Finalize(Finalize),
    /// Source copies waiting for their scheduled drop (`finalize --drop-source-after`).
    Drops,
    /// Keep a finalized move's source copy: cancel its scheduled drop.
    CancelDrop(TenantArg),
}

impl CtlCommand {
    /// The admin request this command sends.
    pub fn request(&self) -> Request {
        match self {
            CtlCommand::Tenants => Request::Tenants(NoArgs {}),
            CtlCommand::Tenant { action } => match action {
                TenantAction::Get(a) => Request::TenantGet(a.clone()),
                TenantAction::Set(a) => Request::TenantSet(a.clone()),
                TenantAction::Remove(a) => Request::TenantRemove(a.clone()),
                TenantAction::Kill(a) => Request::TenantKill(a.clone()),
                TenantAction::Grants(a) => Request::TenantGrants(a.clone()),
                TenantAction::Backup(a) => Request::TenantBackup(a.clone()),
                TenantAction::Backups(a) => Request::TenantBackups(a.clone()),
                TenantAction::Restore(a) => Request::TenantRestore(a.clone()),
            },
            CtlCommand::Backends => Request::Backends(NoArgs {}),
            CtlCommand::Clients => Request::Clients(NoArgs {}),
            CtlCommand::Instances => Request::Instances(NoArgs {}),
            CtlCommand::Pause(a) => Request::Pause(a.clone()),
            CtlCommand::Resume(a) => Request::Resume(a.clone()),
            CtlCommand::PauseAll(a) => Request::PauseAll(a.clone()),
            CtlCommand::ResumeAll => Request::ResumeAll(NoArgs {}),
            CtlCommand::Stats => Request::Stats(NoArgs {}),
            CtlCommand::Reload => Request::Reload(NoArgs {}),
            CtlCommand::Audit(a) => Request::Audit(a.clone()),
            CtlCommand::Webhooks {
                action: WebhooksAction::Log(a),
            } => Request::WebhooksLog(a.clone()),
            CtlCommand::Migrate { action } => action.request(),
        }
    }
}

impl MigrateAction {
    fn request(&self) -> Request {
        match self {
            MigrateAction::Start(a) => Request::MigrateStart(a.clone()),
            MigrateAction::Status { who, .. } => Request::MigrateStatus(who.clone()),
            MigrateAction::History(a) => Request::MigrateHistory(a.clone()),
            MigrateAction::Queue => Request::MigrateQueue(NoArgs {}),
            MigrateAction::Cancel(a) => Request::MigrateCancel(a.clone()),
            MigrateAction::Estimate(a) => Request::MigrateEstimate(a.clone()),
            MigrateAction::Cutover(a) => Request::MigrateCutover(a.clone()),
            MigrateAction::Abort(a) => Request::MigrateAbort(a.clone()),
            MigrateAction::Pause(a) => Request::MigratePause(a.clone()),
            MigrateAction::Resume(a) => Request::MigrateResume(a.clone()),
            MigrateAction::Verify(a) => Request::MigrateVerify(a.clone()),
            MigrateAction::Repair(a) => Request::MigrateRepair(a.clone()),
            MigrateAction::Ddl(a) => Request::MigrateDdl(a.clone()),
            MigrateAction::Rollback(a) => Request::MigrateRollback(a.clone()),
            MigrateAction::Finalize(a) => Request::MigrateFinalize(a.clone()),
            MigrateAction::Drops => Request::MigrateDrops(NoArgs {}),
            MigrateAction::CancelDrop(a) => Request::MigrateCancelDrop(a.clone()),
        }
    }
}

/// Redraws the progress line until the migration reaches a settled state; returns the exit code.
async fn watch(socket: &Path, tenant: &TenantId) -> i32 {
    use std::io::Write;
    let request = Request::MigrateStatus(MaybeTenant {
        tenant: Some(tenant.clone()),
    });
    loop {
        let status: Status = match send(socket, &request).await {
            Ok(Response {
                ok: true,
                result: Some(r),
                ..
            }) => match serde_json::from_value(r) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("\npgtenant ctl: bad answer from pgtenant: {e}");
                    return 2;
                }
            },
            Ok(r) => return refused(&r, false),
            Err(e) => {
                eprintln!("\npgtenant ctl: {e}");
                return 2;
            }
        };
        print!("\r{}", render::progress_line(&status));
        let _ = std::io::stdout().flush();
        if ["migrated", "completed", "rolled_back", "failed"].contains(&status.state.as_str()) {
            println!();
            return 0;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Prints a refusal; returns exit code 1.
fn refused(r: &Response, json: bool) -> i32 {
    if json {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
    }
    match &r.error {
        Some(e) => eprintln!("pgtenant ctl: {}: {}", e.code, e.message),
        None => eprintln!("pgtenant ctl: error: the request was refused"),
    }
    1
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

/// Sends one request and returns the response.
pub async fn send(socket: &Path, request: &Request) -> Result<Response, String> {
    let run = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| format!("cannot reach pgtenant at {}: {e}", socket.display()))?;
        check_peer(&stream, socket)?;
        let (read, mut write) = stream.into_split();
        let mut line = request.to_json().to_string();
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
        serde_json::from_str::<Response>(&answer)
            .map_err(|e| format!("bad answer from pgtenant: {e}"))
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
                who: MaybeTenant { tenant: Some(t) },
                watch: true,
            },
    } = &args.command
    {
        return watch(&socket, t).await;
    }
    let response = match send(&socket, &args.command.request()).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgtenant ctl: {e}");
            return 2;
        }
    };
    let (true, Some(result)) = (response.ok, &response.result) else {
        return refused(&response, args.json);
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(result).unwrap_or_default()
        );
    } else {
        print!("{}", render::human(&args.command, result));
    }
    0
}
