//! Startup parameters a routed tenant may not send: those that would take its backend session out of its
//! route (another schema, another role) or switch off what the proxy relies on (change capture).

use crate::errors::ClientError;
use crate::protocol::PgError;
use crate::routing::Route;

/// Settings refused at startup for every routed tenant (names normalised: lower case, `-` as `_`).
const REFUSED: &[&str] = &["role", "session_authorization", "session_replication_role"];

/// The name a setting has inside PostgreSQL: case-insensitive, and `-` in `--name=value` means `_`.
fn normalise(name: &str) -> String {
    name.to_ascii_lowercase().replace('-', "_")
}

/// The switches of a backend's command line that take an argument (PostgreSQL's `getopt` string for
/// `process_postgres_switches`); every other letter is a flag.
const SWITCHES_WITH_ARGUMENT: &[char] = &[
    'B', 'C', 'c', 'D', 'd', 'f', 'h', 'k', 'N', 'p', 'r', 'S', 't', 'v', 'W', '-',
];

/// Every setting in split `options`, by normalised name, read as PostgreSQL's `getopt` reads them: `-c
/// name=value`, `-cname=value`, `--name=value`, and switches grouped behind flags (`-ec name=value`,
/// `-e-name=value`), which a check of the first two characters alone would miss. Every argument is also read
/// on its own, even one that is another switch's argument: a setting-shaped argument is refused either way.
fn option_settings(options: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    let mut i = 0;
    while i < options.len() {
        let arg = &options[i];
        i += 1;
        let Some(switches) = arg.strip_prefix('-') else {
            continue;
        };
        for (at, letter) in switches.char_indices() {
            if !SWITCHES_WITH_ARGUMENT.contains(&letter) {
                continue;
            }
            // The next argument is read as this switch's, and also on its own (erring towards refusing).
            let rest = &switches[at + letter.len_utf8()..];
            let value = match rest.is_empty() {
                true => options.get(i).map(String::as_str),
                false => Some(rest),
            };
            if matches!(letter, 'c' | '-') {
                if let Some((name, _)) = value.and_then(|s| s.split_once('=')) {
                    names.push(normalise(name));
                }
            }
            break;
        }
    }
    names
}

/// Why `refused` is refused for a tenant on `route`, if it is.
fn refused(name: &str, route: &Route) -> Option<&'static str> {
    if REFUSED.contains(&name) {
        return Some(
            "it would change who the backend session runs as or switch off change capture",
        );
    }
    if name.starts_with("pgtenant.") {
        return Some("pgtenant.* settings belong to the proxy");
    }
    if name == "search_path" && route.schema.is_some() {
        return Some("the tenant's schema route sets search_path");
    }
    None
}

/// Checks a session's startup parameters and options against the route it is about to use. The error is an
/// ERROR; a caller refusing a login makes it FATAL.
pub fn check_startup(
    params: &[(String, String)],
    options: &[String],
    route: &Route,
    tenant: &str,
) -> Result<(), PgError> {
    let names = params
        .iter()
        .map(|(k, _)| normalise(k))
        .chain(option_settings(options));
    for name in names {
        if let Some(why) = refused(&name, route) {
            return Err(ClientError::ForbiddenStartupParameter {
                name,
                tenant: tenant.to_owned(),
                why,
            }
            .into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(params: &[(&str, &str)], options: &[&str], schema: bool) -> Result<(), String> {
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let options: Vec<String> = options.iter().map(|s| s.to_string()).collect();
        let route = Route::new(
            crate::routing::BackendId::parse("b").unwrap(),
            None,
            schema.then(|| "tenant_acme".to_string()),
        );
        check_startup(&params, &options, &route, "acme").map_err(|e| e.message)
    }

    #[test]
    fn escapes_are_refused_and_ordinary_settings_pass() {
        assert!(check(
            &[("application_name", "x"), ("TimeZone", "UTC")],
            &["-c", "work_mem=8MB"],
            true
        )
        .is_ok());
        assert!(check(&[("search_path", "tenant_globex")], &[], true).is_err());
        assert!(
            check(&[("search_path", "x")], &[], false).is_ok(),
            "no schema route: nothing to escape"
        );
        for opts in [
            &["-c", "search_path=tenant_globex"][..],
            &["-csearch_path=x"],
            &["--search-path=x"],
            &["-c", "SEARCH_PATH=x"],
        ] {
            assert!(check(&[], opts, true).is_err(), "{opts:?}");
        }
        for name in [
            "role",
            "session_authorization",
            "Session_Replication_Role",
            "pgtenant.anything",
        ] {
            assert!(check(&[(name, "x")], &[], false).is_err(), "{name}");
            assert!(
                check(&[], &[&format!("--{name}=x")], false).is_err(),
                "{name}"
            );
        }
        assert!(check(&[], &["-c", "session-replication-role=replica"], false).is_err());
    }

    #[test]
    fn switches_grouped_behind_flags_are_read_as_postgresql_reads_them() {
        for opts in [
            &["-ecsession_replication_role=replica"][..],
            &["-e-pgtenant.x=y"],
            &["-ec", "role=t_globex"],
            &["-Ee", "--role=x"],
        ] {
            assert!(check(&[], opts, false).is_err(), "{opts:?}");
        }
        // Erring towards refusing: `-crole=x` is `-d`'s argument to PostgreSQL, and still refused.
        assert!(check(&[], &["-d", "-crole=x"], false).is_err());
        assert!(check(&[], &["-d5", "-crole=x"], false).is_err());
        assert!(check(&[], &["-e", "-c", "work_mem=8MB", "-F"], false).is_ok());
    }

    #[test]
    fn a_vertical_tab_separates_options_as_in_postgresql() {
        let options = crate::protocol::startup::split_options("-c\x0brole=t_globex");
        assert_eq!(options, ["-c", "role=t_globex"]);
        assert!(check(&[], &["-c", "role=t_globex"], false).is_err());
        let joined = crate::protocol::startup::join_options(&["a\x0bb"]);
        assert_eq!(crate::protocol::startup::split_options(&joined), ["a\x0bb"]);
    }
}
