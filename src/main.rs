//! The `pgtenant` command: `serve` runs the proxy.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use pgtenant::admin::cmd::execute;
use pgtenant::admin::Request;
use pgtenant::config::Config;
use pgtenant::ctl::CtlArgs;
use pgtenant::server::Proxy;

#[derive(Parser)]
#[command(
    name = "pgtenant",
    version,
    about = "PostgreSQL proxy that routes tenants and moves them live"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        /// Config file (TOML).
        #[arg(long, short, env = "PGTENANT_CONFIG", default_value = "pgtenant.toml")]
        config: PathBuf,
    },
    /// Talk to a running proxy over its admin socket.
    Ctl(Box<CtlArgs>),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "pgtenant=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let config_file = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    error!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let Some(runtime) = runtime(config_file.proxy.workers) else {
                return ExitCode::FAILURE;
            };
            runtime.block_on(serve(config_file, config))
        }
        Command::Ctl(args) => match runtime(1) {
            Some(rt) => ExitCode::from(rt.block_on(pgtenant::ctl::run(*args)) as u8),
            None => ExitCode::FAILURE,
        },
    }
}

/// The runtime: one thread (no cross-thread wake-ups at all) for `workers = 1`, else a multi-threaded one
/// with `workers` threads (0: chosen from the core count, see [`auto_workers`]).
fn runtime(workers: usize) -> Option<tokio::runtime::Runtime> {
    let workers = match workers {
        0 => auto_workers(),
        n => n,
    };
    let mut builder = match workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    match builder.enable_all().build() {
        Ok(r) => Some(r),
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            None
        }
    }
}

/// One thread on machines of up to two cores, else one per core. On two cores shared with PostgreSQL and the
/// clients, a second runtime thread buys no parallelism the backends do not need more, and costs cross-thread
/// wake-ups: one thread measured 1-4% more TPS (BENCHMARKS.md, "workers").
fn auto_workers() -> usize {
    match std::thread::available_parallelism().map(|n| n.get()) {
        Ok(n) if n > 2 => n,
        _ => 1,
    }
}

/// Raises the soft file-descriptor limit to the hard one, and warns when the clients and backend connections
/// the config allows cannot all have one.
fn check_fd_limit(config: &Config) {
    let limit = match pgtenant::net::fds::raise_limit() {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot read the file-descriptor limit");
            return;
        }
    };
    let backends: usize = config
        .backends
        .values()
        .map(|b| match b.max_connections {
            0 => b.pool_size + b.reserve_pool_size,
            n => n,
        })
        .sum();
    // Listeners, the state directory, logs and the runtime's own descriptors.
    let needed =
        (config.proxy.max_client_conn + config.proxy.max_login_conn + backends + 64) as u64;
    if needed > limit {
        warn!(
            limit,
            needed,
            "the file-descriptor limit (ulimit -n) is below max_client_conn + max_login_conn + backend connections (one pool each); clients beyond it are refused with 53300"
        );
    } else {
        info!(limit, "file-descriptor limit");
    }
}

async fn serve(config: Config, path: PathBuf) -> ExitCode {
    let grace = config.proxy.shutdown_timeout();
    check_fd_limit(&config);
    let proxy = match Proxy::start_with_path(config, Some(path)).await {
        Ok(p) => p,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // Parsing the config (100 000 tenants: ~150 MB of short-lived allocations) is done.
    pgtenant::heap::trim();
    pgtenant::heap::settle_after_start();
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        error!("cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    loop {
        tokio::select! {
            _ = term.recv() => {
                info!(grace_ms = grace.as_millis() as u64, "SIGTERM: no new connections; waiting for sessions");
                proxy.shutdown(grace).await;
                return ExitCode::SUCCESS;
            }
            _ = int.recv() => {
                info!("SIGINT: closing sessions now");
                proxy.terminate().await;
                return ExitCode::SUCCESS;
            }
            _ = hup.recv() => match execute(&proxy.shared, Request::Reload(Default::default()), "signal:SIGHUP").await {
                Ok(r) => info!(result = %r, "SIGHUP: config reloaded"),
                Err(e) => error!(code = e.code.as_str(), "SIGHUP: reload refused: {}", e.message),
            },
        }
    }
}
