//! The console's statements, read into admin [`Request`]s where a command exists, so the console runs the
//! same command table as the admin socket, `ctl` and the HTTP API.
//!
//! `SHOW x` lists; `PAUSE [t]`, `RESUME [t]`, `RELOAD`, `KILL t`; `MIGRATE <action> [tenant] [KEY value | FLAG]...`
//! becomes the `migrate.<action>` request with those arguments (`MIGRATE START acme TO dedicated VERIFY hash`).

use serde_json::{Map, Value};

use crate::admin::code::AdminError;
use crate::admin::request::Request;

/// What a console statement asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Statement {
    /// A `SHOW` without a command of its own.
    Show(Listing),
    /// A command of the command table; `show` is the listing to answer with, if any.
    Run {
        request: Box<Request>,
        show: Option<Listing>,
        tag: String,
    },
    /// An empty statement.
    Empty,
}

/// The listings the console shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    Help,
    Version,
    Config,
    Tenants,
    Tenant,
    Pools,
    Clients,
    Servers,
    Stats,
    Backends,
    Migrations,
    Audit,
    Queue,
    History,
    /// A command's result as key/value rows.
    Result,
}

fn request(cmd: &str, args: Map<String, Value>) -> Result<Request, AdminError> {
    Request::from_args(cmd, Value::Object(args))
}

fn tenant_arg(words: &[&str], i: usize) -> Map<String, Value> {
    let mut m = Map::new();
    if let Some(t) = words.get(i) {
        m.insert("tenant".into(), Value::String((*t).to_owned()));
    }
    m
}

fn run(
    cmd: &str,
    args: Map<String, Value>,
    show: Option<Listing>,
    tag: &str,
) -> Result<Statement, AdminError> {
    Ok(Statement::Run {
        request: Box::new(request(cmd, args)?),
        show,
        tag: tag.to_owned(),
    })
}

/// Reads one statement (without its `;`).
pub fn parse(text: &str) -> Result<Statement, AdminError> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let Some(first) = words.first() else {
        return Ok(Statement::Empty);
    };
    let upper = |i: usize| {
        words
            .get(i)
            .map(|w| w.to_ascii_uppercase())
            .unwrap_or_default()
    };
    match first.to_ascii_uppercase().as_str() {
        "SHOW" => show(&words, &upper(1)),
        "PAUSE" if words.len() == 1 => run("pause.all", Map::new(), Some(Listing::Result), "PAUSE"),
        "PAUSE" => run(
            "pause",
            tenant_arg(&words, 1),
            Some(Listing::Result),
            "PAUSE",
        ),
        "RESUME" if words.len() == 1 => {
            run("resume.all", Map::new(), Some(Listing::Result), "RESUME")
        }
        "RESUME" => run(
            "resume",
            tenant_arg(&words, 1),
            Some(Listing::Result),
            "RESUME",
        ),
        "RELOAD" => run("reload", Map::new(), Some(Listing::Result), "RELOAD"),
        "KILL" => run(
            "tenant.kill",
            tenant_arg(&words, 1),
            Some(Listing::Result),
            "KILL",
        ),
        "MIGRATE" => migrate(&words),
        other => Err(AdminError::invalid(format!(
            "unknown console command {:?}; SHOW HELP lists them",
            other.chars().take(32).collect::<String>()
        ))),
    }
}

fn show(words: &[&str], what: &str) -> Result<Statement, AdminError> {
    let listing = match what {
        "HELP" => Listing::Help,
        "VERSION" => Listing::Version,
        "CONFIG" => Listing::Config,
        "POOLS" => Listing::Pools,
        "SERVERS" => Listing::Servers,
        "STATS" => Listing::Stats,
        "TENANTS" => return run("tenants", Map::new(), Some(Listing::Tenants), "SHOW"),
        "TENANT" => {
            return run(
                "tenant.get",
                tenant_arg(words, 2),
                Some(Listing::Tenant),
                "SHOW",
            )
        }
        "CLIENTS" => return run("clients", Map::new(), Some(Listing::Clients), "SHOW"),
        "BACKENDS" => return run("backends", Map::new(), Some(Listing::Backends), "SHOW"),
        "MIGRATIONS" => {
            return run(
                "migrate.status",
                Map::new(),
                Some(Listing::Migrations),
                "SHOW",
            )
        }
        "QUEUE" => return run("migrate.queue", Map::new(), Some(Listing::Queue), "SHOW"),
        "HISTORY" => {
            return run(
                "migrate.history",
                tenant_arg(words, 2),
                Some(Listing::History),
                "SHOW",
            )
        }
        "AUDIT" => {
            let mut m = Map::new();
            if let Some(n) = words.get(2) {
                let n: u64 = n
                    .parse()
                    .map_err(|_| AdminError::invalid("SHOW AUDIT takes a number of entries"))?;
                m.insert("tail".into(), Value::from(n));
            }
            return run("audit", m, Some(Listing::Audit), "SHOW");
        }
        other => {
            return Err(AdminError::invalid(format!(
                "unknown SHOW {:?}; SHOW HELP lists them",
                other.chars().take(32).collect::<String>()
            )))
        }
    };
    Ok(Statement::Show(listing))
}

/// `MIGRATE <action> [tenant] [KEY value | FLAG]...`: keys and flags are the request's argument names
/// (`TO`, `VERIFY`, `CUTOVER`, `AT`, `DATABASE`, `SCHEMA`, `LEVEL`; flags `BACKUP`, `DROP_SOURCE`, ...).
fn migrate(words: &[&str]) -> Result<Statement, AdminError> {
    let action = words
        .get(1)
        .map(|a| a.to_ascii_lowercase())
        .ok_or_else(|| {
            AdminError::invalid("MIGRATE needs an action: START, STATUS, CUTOVER, ...")
        })?;
    let action = action.replace('-', "_");
    let mut args = tenant_arg(words, 2);
    let mut i = 3;
    while i < words.len() {
        let key = words[i].to_ascii_lowercase().replace('-', "_");
        match words.get(i + 1) {
            Some(v) if !is_flag(&key) => {
                args.insert(key, value_of(v));
                i += 2;
            }
            _ => {
                args.insert(key, Value::Bool(true));
                i += 1;
            }
        }
    }
    let listing = match action.as_str() {
        "status" if !args.contains_key("tenant") => Listing::Migrations,
        "history" => Listing::History,
        "queue" => Listing::Queue,
        _ => Listing::Result,
    };
    run(&format!("migrate.{action}"), args, Some(listing), "MIGRATE")
}

const FLAGS: &[&str] = &["backup", "drop_source", "drop_target", "allow_existing"];

fn is_flag(key: &str) -> bool {
    FLAGS.contains(&key)
}

/// Numbers as numbers (`PRIORITY 5`), everything else as text.
fn value_of(v: &str) -> Value {
    match v.parse::<i64>() {
        Ok(n) => Value::from(n),
        Err(_) => Value::String(v.trim_matches('\'').to_owned()),
    }
}

/// Splits a query string into statements at `;` outside single quotes.
pub fn statements(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in text.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            ';' if !quoted => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_statements_become_requests_of_the_command_table() {
        assert_eq!(
            parse("show pools").unwrap(),
            Statement::Show(Listing::Pools)
        );
        let Statement::Run { request, tag, .. } = parse("PAUSE acme").unwrap() else {
            panic!()
        };
        assert_eq!((request.command(), tag.as_str()), ("pause", "PAUSE"));
        let Statement::Run { request, .. } = parse("PAUSE").unwrap() else {
            panic!()
        };
        assert_eq!(request.command(), "pause.all");
        let Statement::Run { request, .. } =
            parse("MIGRATE START acme TO dedicated VERIFY hash BACKUP PRIORITY 3").unwrap()
        else {
            panic!()
        };
        assert_eq!(
            request.to_json(),
            serde_json::json!({"cmd": "migrate.start", "tenant": "acme", "to": "dedicated", "verify": "hash", "backup": true, "priority": 3})
        );
        assert!(
            parse("MIGRATE START acme TO").is_err(),
            "a key without a value is a flag the command does not take"
        );
        assert!(parse("DROP TABLE x").is_err());
        assert!(parse("SHOW nonsense").is_err());
        assert_eq!(
            statements("SHOW POOLS; SHOW STATS;"),
            ["SHOW POOLS", " SHOW STATS"]
        );
    }
}
