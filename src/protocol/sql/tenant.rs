//! Recognises the statements the proxy answers itself: `SET [SESSION] pgtenant.tenant {=|TO} value`,
//! `SET pgtenant.tenant TO DEFAULT`, `RESET pgtenant.tenant` and `SHOW pgtenant.tenant`, and the settings a
//! session may not change (`session_replication_role`, `pgtenant.*`).
//!
//! Most queries never mention `pgtenant`, and a byte scan rules them out. The rest are lexed just enough to split
//! statements and read the first few tokens of each, so that a tenant statement hidden in a multi-statement
//! query is refused instead of reaching a backend, where it would silently set a meaningless placeholder variable.

use super::lex::{contains_at_first_letter, is_name, split_statements, Statement, Tok};
use super::words::Words;

/// What a `pgtenant.tenant` statement asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantCommand {
    /// Move the session to this tenant (the name is not validated here).
    Set(String),
    /// Back to the tenant the connection started with (or none).
    Reset,
    Show,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recognised {
    /// Not a tenant statement: forward it.
    Pass,
    /// Exactly one tenant statement and nothing else.
    Command(TenantCommand),
    /// A tenant statement the proxy cannot honour; the text says why.
    Refuse(String),
    /// A statement that would change a setting the proxy keeps for itself (`session_replication_role`, which
    /// would switch change capture off, and `pgtenant.*`): refused with `42501`.
    Forbidden(String),
}

/// Settings no client may change through the proxy (lower case; `pgtenant.*` is checked apart).
pub const GUARDED_SETTINGS: &[&str] = &["session_replication_role"];

const NAME: &[u8] = b"pgtenant";

/// True when `sql` contains `pgtenant` in any letter case. This is the whole cost for ordinary queries.
pub fn mentions_pgtenant(sql: &[u8]) -> bool {
    // Fewer words have a `p` than an `a` or an `s`: comparing at each one is cheaper here than lower-casing
    // the text (19 against 28 ns for a pgbench UPDATE, benches/hot_path.rs).
    contains_at_first_letter(sql, NAME)
}

pub fn recognise(sql: &[u8]) -> Recognised {
    recognise_with(sql, Words::of(sql))
}

/// [`recognise`] with the statement's words already searched.
pub fn recognise_with(sql: &[u8], words: Words) -> Recognised {
    if !words.has(Words::PGTENANT) && !words.has(Words::REPLICATION_ROLE) {
        return Recognised::Pass;
    }
    let statements = split_statements(sql);
    let mut found = None;
    let mut nonempty = 0;
    for stmt in &statements {
        if stmt.tokens.is_empty() {
            continue;
        }
        nonempty += 1;
        if let Some(name) = guarded_setting(stmt) {
            return Recognised::Forbidden(format!(
                "pgtenant: setting \"{name}\" cannot be changed through the proxy"
            ));
        }
        if let Some(r) = tenant_statement(sql, stmt) {
            if found.is_some() {
                return Recognised::Refuse("only one pgtenant.tenant statement per query".into());
            }
            found = Some(r);
        }
    }
    match found {
        None => Recognised::Pass,
        Some(Err(msg)) => Recognised::Refuse(msg),
        Some(Ok(_)) if nonempty > 1 => Recognised::Refuse(
            "SET/RESET/SHOW pgtenant.tenant must be sent as a query of its own, not with other statements".into(),
        ),
        Some(Ok(cmd)) => Recognised::Command(cmd),
    }
}

/// The guarded setting a statement would change: `SET` of it (also `SESSION`/`LOCAL`), or a `set_config`
/// call naming it. (`RESET` only puts back the server's default, which is harmless.)
fn guarded_setting(stmt: &Statement) -> Option<String> {
    let t = &stmt.tokens;
    let guarded = |name: &str| {
        let n = name.to_ascii_lowercase();
        let own = n
            .strip_prefix("pgtenant.")
            .is_some_and(|rest| rest != "tenant");
        (own || GUARDED_SETTINGS.contains(&n.as_str())).then_some(n)
    };
    if t.iter()
        .any(|(tok, _)| matches!(tok, Tok::Word(w) if w == "set_config"))
    {
        return t.iter().find_map(|(tok, _)| match tok {
            Tok::Str(s) => guarded(s),
            _ => None,
        });
    }
    let at = match (t.first(), t.get(1)) {
        (Some((Tok::Word(v), _)), Some((Tok::Word(w), _)))
            if v == "set" && (w == "session" || w == "local") =>
        {
            2
        }
        (Some((Tok::Word(v), _)), _) if v == "set" => 1,
        _ => return None,
    };
    let name = match (t.get(at), t.get(at + 1), t.get(at + 2)) {
        (
            Some((Tok::Word(a) | Tok::Quoted(a), _)),
            Some((Tok::Punct(b'.'), _)),
            Some((Tok::Word(b) | Tok::Quoted(b), _)),
        ) => {
            format!("{a}.{b}")
        }
        (Some((Tok::Word(a) | Tok::Quoted(a), _)), _, _) => a.clone(),
        _ => return None,
    };
    guarded(&name)
}

/// `Some` when the statement is SET/RESET/SHOW of `pgtenant.tenant`.
fn tenant_statement(sql: &[u8], stmt: &Statement) -> Option<Result<TenantCommand, String>> {
    let t = &stmt.tokens;
    let verb = match t.first() {
        Some((Tok::Word(w), _)) => w.as_str(),
        _ => return None,
    };
    let mut at = 1;
    let mut local = false;
    if verb == "set" {
        match t.get(1) {
            Some((Tok::Word(w), _)) if w == "session" => at = 2,
            Some((Tok::Word(w), _)) if w == "local" => {
                local = true;
                at = 2
            }
            _ => {}
        }
    }
    let names_tenant = is_name(t.get(at), "pgtenant")
        && t.get(at + 1)
            .is_some_and(|(tok, _)| *tok == Tok::Punct(b'.'))
        && is_name(t.get(at + 2), "tenant");
    if !names_tenant {
        return None;
    }
    let after = at + 3;
    Some(match verb {
        "set" if local => Err(
            "SET LOCAL pgtenant.tenant is not supported: the tenant is a session setting".into(),
        ),
        "set" => set_value(sql, stmt, after),
        "reset" if t.len() == after => Ok(TenantCommand::Reset),
        "show" if t.len() == after => Ok(TenantCommand::Show),
        "reset" | "show" => Err(format!(
            "syntax error in {} pgtenant.tenant",
            verb.to_uppercase()
        )),
        _ => return None,
    })
}

fn set_value(sql: &[u8], stmt: &Statement, at: usize) -> Result<TenantCommand, String> {
    let t = &stmt.tokens;
    let syntax = || "syntax error: expected SET pgtenant.tenant = 'name' (or TO name)".to_string();
    match t.get(at) {
        Some((Tok::Punct(b'='), _)) => {}
        Some((Tok::Word(w), _)) if w == "to" => {}
        _ => return Err(syntax()),
    }
    let first = t.get(at + 1).ok_or_else(syntax)?;
    let rest = &t[at + 1..];
    match (&first.0, rest.len()) {
        (Tok::Str(s), 1) | (Tok::Quoted(s), 1) => Ok(TenantCommand::Set(s.clone())),
        (Tok::Word(w), 1) if w == "default" => Ok(TenantCommand::Reset),
        (Tok::Word(_), _) | (Tok::Punct(b'-'), _) => {
            // An unquoted name; tenant names may hold '-', which SQL lexes as punctuation, so read the raw text.
            let raw = &sql[first.1..stmt.end];
            let raw = String::from_utf8_lossy(raw).trim().to_ascii_lowercase();
            if raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                Ok(TenantCommand::Set(raw))
            } else {
                Err(syntax())
            }
        }
        _ => Err(syntax()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(sql: &str) -> Recognised {
        recognise(sql.as_bytes())
    }

    #[test]
    fn word_search_ignores_case_in_short_and_long_texts() {
        // 55 bytes of text, then longer ones (the old lower-casing buffers' limits, 128 and 512 bytes, and one
        // byte over each), and a long one. `words` tests the new search's edges (every length up to 80).
        for pad in [0, 73, 74, 457, 458, 2048] {
            let text = format!(
                "{}select Set_Config('a', 'b', false), PG_ADVISORY_lock(1)",
                " ".repeat(pad)
            );
            let words = Words::of(text.as_bytes());
            assert!(
                words.has(Words::SET_CONFIG) && words.has(Words::ADVISORY),
                "padding {pad}"
            );
            assert!(
                !words.has(Words::PGTENANT) && !words.has(Words::REPLICATION_ROLE),
                "padding {pad}"
            );
            let all = format!("{text}; SET SESSION_REPLICATION_ROLE = x; show PGTenant.x");
            let every = Words::of(all.as_bytes());
            assert!(
                [
                    Words::PGTENANT,
                    Words::REPLICATION_ROLE,
                    Words::ADVISORY,
                    Words::SET_CONFIG
                ]
                .into_iter()
                .all(|w| every.has(w)),
                "padding {pad}"
            );
            let tail = format!("{}SHOW pgTenant.tenant", "x".repeat(pad));
            assert!(mentions_pgtenant(tail.as_bytes()), "padding {pad}");
            assert!(
                !mentions_pgtenant(&tail.as_bytes()[..tail.len() - 8]),
                "padding {pad}"
            );
        }
    }

    #[test]
    fn settings_the_proxy_keeps_are_refused() {
        let forbidden = |sql: &str| matches!(cmd(sql), Recognised::Forbidden(_));
        for sql in [
            "SET session_replication_role = replica",
            "set SESSION Session_Replication_Role to 'replica'",
            "SET LOCAL session_replication_role = replica",
            "select 1; SET \"session_replication_role\" = replica",
            "SELECT set_config('session_replication_role', 'replica', false)",
            "SELECT set_config('SESSION_REPLICATION_ROLE', 'replica', true)",
            "SET pgtenant.other = 1",
            "SET pgtenant.bypass_ddl_guard = on",
            "SELECT set_config('pgtenant.apply_key', 'x', false)",
        ] {
            assert!(forbidden(sql), "{sql}");
        }
        for sql in [
            "SHOW session_replication_role",
            "RESET session_replication_role",
            "SELECT 'set session_replication_role = replica'",
            "SELECT current_setting('session_replication_role')",
            "SET work_mem = '8MB'",
        ] {
            assert!(!forbidden(sql), "{sql}");
        }
    }

    #[test]
    fn ordinary_queries_pass() {
        assert_eq!(cmd("select 1"), Recognised::Pass);
        assert_eq!(cmd("select 'pgtenant.tenant'"), Recognised::Pass);
        assert_eq!(
            cmd("select current_setting('pgtenant.tenant')"),
            Recognised::Pass
        );
        assert_eq!(
            cmd("-- SET pgtenant.tenant = 'x'\nselect 1"),
            Recognised::Pass
        );
        assert_eq!(
            cmd("select $$; SET pgtenant.tenant = 'x'$$"),
            Recognised::Pass
        );
    }

    #[test]
    fn tenant_statements_are_recognised() {
        let set = |s: &str| Recognised::Command(TenantCommand::Set(s.into()));
        assert_eq!(cmd("SET pgtenant.tenant = 'acme'"), set("acme"));
        assert_eq!(cmd("set pgtenant.tenant to acme;"), set("acme"));
        assert_eq!(cmd("SET SESSION pgtenant.tenant TO \"Acme\""), set("Acme"));
        assert_eq!(cmd("SET pgtenant.tenant TO Acme"), set("acme"));
        assert_eq!(cmd("SET pgtenant.tenant = my-tenant-2"), set("my-tenant-2"));
        assert_eq!(cmd("/* hi */ SET PGTENANT.TENANT = 'o''x'"), set("o'x"));
        assert_eq!(
            cmd("RESET pgtenant.tenant"),
            Recognised::Command(TenantCommand::Reset)
        );
        assert_eq!(
            cmd("SET pgtenant.tenant TO DEFAULT"),
            Recognised::Command(TenantCommand::Reset)
        );
        assert_eq!(
            cmd(" show pgtenant.tenant ; "),
            Recognised::Command(TenantCommand::Show)
        );
    }

    #[test]
    fn hidden_or_odd_statements_are_refused() {
        assert!(matches!(
            cmd("select 1; SET pgtenant.tenant = 'x'"),
            Recognised::Refuse(_)
        ));
        assert!(matches!(
            cmd("SET LOCAL pgtenant.tenant = 'x'"),
            Recognised::Refuse(_)
        ));
        assert!(matches!(
            cmd("SET pgtenant.tenant 'x'"),
            Recognised::Refuse(_)
        ));
        assert!(matches!(
            cmd("SET pgtenant.tenant = x y"),
            Recognised::Refuse(_)
        ));
        assert!(matches!(
            cmd("RESET pgtenant.tenant now"),
            Recognised::Refuse(_)
        ));
    }

    #[test]
    fn arbitrary_text_never_panics() {
        let pieces = [
            "SET", " ", "pgtenant", ".", "tenant", "'", "\"", "$$", "$a$", "--", "/*", "*/", ";",
            "=", "E'\\", "-", "\u{e9}",
        ];
        let mut seed = 99u64;
        for _ in 0..5000 {
            let mut s = String::new();
            for _ in 0..(seed % 12) {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                s.push_str(pieces[(seed >> 40) as usize % pieces.len()]);
            }
            let _ = recognise(s.as_bytes());
        }
    }
}
