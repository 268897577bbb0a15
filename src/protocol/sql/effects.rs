//! What a simple query does to the session state the proxy carries between backend connections: settings,
//! prepared statements, and state that pins a session to its connection (LISTEN, temporary tables, advisory
//! locks, cursors WITH HOLD).

use super::lex::{
    first_word, more_than_one_statement, setting_name, split_statements, word, Statement, Tok,
};
use super::words::Words;

/// What a simple query does to session state that the proxy can carry to another backend connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    None,
    /// A session-level SET: the setting's key and the statement to replay.
    Set {
        key: String,
        text: String,
    },
    Reset {
        key: String,
    },
    ResetAll,
    /// SQL-level PREPARE: the statement name and the statement to replay.
    Prepare {
        name: String,
        text: String,
    },
    Deallocate {
        name: String,
    },
    DeallocateAll,
    DiscardAll,
    DiscardTemp,
    /// State that cannot be carried over (LISTEN, a temporary table, an advisory lock, a WITH HOLD cursor).
    Pin(&'static str),
    /// That kind of state is gone.
    Unpin(&'static str),
    /// Several statements among which one changes session state: not tracked, so the session is pinned.
    Untracked,
    /// `SET LOCAL`: nothing to replay, but name resolution may differ until the transaction ends.
    LocalSet,
    /// `DO` or `CALL`: code whose session effects (settings, temporary objects) the proxy cannot see. Nothing
    /// pins, but the backend connection is fully reset before its next user.
    Opaque,
}

pub const PIN_LISTEN: &str = "LISTEN";

pub const PIN_TEMP: &str = "temporary table";

pub const PIN_ADVISORY: &str = "advisory lock";

pub const PIN_CURSOR: &str = "cursor WITH HOLD";

/// First words that can start a state-changing statement; anything else is `Effect::None` without lexing.
const STATE_WORDS: [&str; 11] = [
    "do",
    "call",
    "set",
    "reset",
    "prepare",
    "deallocate",
    "discard",
    "listen",
    "unlisten",
    "create",
    "declare",
];

/// Classifies a simple query. Cheap for ordinary queries: one look at the first word (and a substring check
/// for advisory locks).
pub fn classify(sql: &[u8]) -> Effect {
    classify_with(sql, Words::of(sql))
}

/// [`classify`] with the statement's words already searched.
pub fn classify_with(sql: &[u8], words: Words) -> Effect {
    // set_config(..., false) changes a setting for the session in a way the proxy does not follow; "advisory"
    // is rare, and only then is the text looked at closer.
    let (advisory, set_config) = (words.has(Words::ADVISORY), words.has(Words::SET_CONFIG));
    if advisory {
        let lower = sql.to_ascii_lowercase();
        let has = |needle: &[u8]| memchr::memmem::find(&lower, needle).is_some();
        if has(b"advisory_unlock_all") {
            return Effect::Unpin(PIN_ADVISORY);
        }
        if has(b"advisory_lock") {
            return Effect::Pin(PIN_ADVISORY);
        }
    }
    let first = first_word(sql);
    let candidate = STATE_WORDS
        .iter()
        .any(|w| first.eq_ignore_ascii_case(w.as_bytes()))
        || first.eq_ignore_ascii_case(b"close")
        || more_than_one_statement(sql, words.semicolons());
    if set_config {
        return Effect::Untracked;
    }
    if !candidate {
        return Effect::None;
    }
    let statements: Vec<Statement> = split_statements(sql)
        .into_iter()
        .filter(|s| !s.tokens.is_empty())
        .collect();
    match statements.as_slice() {
        [one] => classify_one(sql, one),
        many => {
            let effects: Vec<Effect> = many
                .iter()
                .map(|s| classify_one(sql, s))
                .filter(|e| *e != Effect::None)
                .collect();
            if effects.is_empty() {
                Effect::None
            } else if effects.iter().all(|e| *e == Effect::Opaque) {
                Effect::Opaque
            } else {
                Effect::Untracked
            }
        }
    }
}

fn classify_one(sql: &[u8], stmt: &Statement) -> Effect {
    let t = &stmt.tokens;
    // Replayed text must be the client's bytes exactly; text that is not UTF-8 is not tracked.
    let Ok(raw) = std::str::from_utf8(&sql[t[0].1..stmt.end]) else {
        return Effect::Untracked;
    };
    match word(t.first()) {
        Some("set") => set_effect(t, raw.trim()),
        Some("reset") => reset_effect(t),
        Some("prepare" | "deallocate") => statement_effect(t, raw.trim()),
        _ => pin_effect(t),
    }
}

/// `SET ...`: a tracked setting (with the statement to replay), a local one, or one we cannot follow.
fn set_effect(t: &[(Tok, usize)], text: &str) -> Effect {
    let w = |i: usize| word(t.get(i));
    let set = |key: &str| Effect::Set {
        key: key.into(),
        text: text.to_string(),
    };
    match (w(1), w(2)) {
        (Some("local"), _) => Effect::LocalSet,
        (Some("transaction" | "constraints"), _) => Effect::None,
        (Some("session"), Some("characteristics")) => Effect::Untracked,
        (Some("session"), Some("authorization")) => set("session_authorization"),
        (Some("time"), Some("zone")) => set("timezone"),
        (Some("names"), _) => set("client_encoding"),
        (Some("schema"), _) => set("search_path"),
        _ => {
            let at = if w(1) == Some("session") { 2 } else { 1 };
            let Some((key, used)) = setting_name(&t[at..]) else {
                return Effect::Untracked;
            };
            // Setting names are case-insensitive even when quoted.
            let key = key.to_ascii_lowercase();
            let value_at = at + used + 1;
            if w(value_at) == Some("default") && t.len() == value_at + 1 {
                Effect::Reset { key }
            } else {
                set(&key)
            }
        }
    }
}

/// `RESET ...`.
fn reset_effect(t: &[(Tok, usize)]) -> Effect {
    let w = |i: usize| word(t.get(i));
    let reset = |key: &str| Effect::Reset { key: key.into() };
    match (w(1), w(2)) {
        (Some("all"), _) => Effect::ResetAll,
        (Some("session"), Some("authorization")) => reset("session_authorization"),
        (Some("time"), Some("zone")) => reset("timezone"),
        _ => match setting_name(&t[1..]) {
            Some((key, _)) => reset(&key.to_ascii_lowercase()),
            None => Effect::Untracked,
        },
    }
}

/// `PREPARE name ...` and `DEALLOCATE [PREPARE] name|ALL` (not `PREPARE TRANSACTION`).
fn statement_effect(t: &[(Tok, usize)], text: &str) -> Effect {
    let w = |i: usize| word(t.get(i));
    match (w(0), w(1), w(2)) {
        (Some("prepare"), Some("transaction"), _) => Effect::None,
        (Some("prepare"), _, _) => match setting_name(&t[1..2.min(t.len())]) {
            Some((name, _)) => Effect::Prepare {
                name,
                text: text.to_string(),
            },
            None => Effect::Untracked,
        },
        (_, Some("all"), _) | (_, Some("prepare"), Some("all")) => Effect::DeallocateAll,
        _ => {
            let at = if w(1) == Some("prepare") { 2 } else { 1 };
            match setting_name(&t[at.min(t.len())..]) {
                Some((name, _)) => Effect::Deallocate { name },
                None => Effect::Untracked,
            }
        }
    }
}

/// Statements that pin a session to its connection or release it, DISCARD, and DO/CALL.
fn pin_effect(t: &[(Tok, usize)]) -> Effect {
    let w = |i: usize| word(t.get(i));
    match (w(0), w(1), w(2)) {
        (Some("discard"), Some("all"), _) => Effect::DiscardAll,
        (Some("discard"), Some("temp" | "temporary"), _) => Effect::DiscardTemp,
        (Some("listen"), _, _) => Effect::Pin(PIN_LISTEN),
        (Some("unlisten"), _, _) if t.get(1).is_some_and(|(tok, _)| *tok == Tok::Punct(b'*')) => {
            Effect::Unpin(PIN_LISTEN)
        }
        (Some("create"), Some("temp" | "temporary"), _) => Effect::Pin(PIN_TEMP),
        (Some("create"), Some("global" | "local"), Some("temp" | "temporary")) => {
            Effect::Pin(PIN_TEMP)
        }
        (Some("declare"), _, _) => {
            let holds = t
                .windows(2)
                .any(|p| word(p.first()) == Some("with") && word(p.get(1)) == Some("hold"));
            if holds {
                Effect::Pin(PIN_CURSOR)
            } else {
                Effect::None
            }
        }
        (Some("close"), Some("all"), _) => Effect::Unpin(PIN_CURSOR),
        (Some("do" | "call"), _, _) => Effect::Opaque,
        _ => Effect::None,
    }
}

#[cfg(test)]
mod effect_tests {
    use super::{classify, Effect};

    fn set(key: &str, text: &str) -> Effect {
        Effect::Set {
            key: key.into(),
            text: text.into(),
        }
    }

    #[test]
    fn classifies_session_state() {
        assert_eq!(classify(b"SELECT 1"), Effect::None);
        // A trailing `;` (and blanks or comments after it) is still one statement; anything more is looked at.
        let more = |t: &[u8]| super::more_than_one_statement(t, super::Words::of(t).semicolons());
        assert!(!more(b"SELECT 1; -- done\n /* c */ "));
        assert!(more(b"SELECT ';' AS x"));
        assert!(more(b"SELECT 1; SELECT 2"));
        assert!(!more(b"SELECT 1"));
        // A `;` inside a literal followed by what looks like a comment must not hide a second statement.
        assert_ne!(
            classify(b"SELECT ';--'; SET search_path TO other"),
            Effect::None
        );
        assert_ne!(classify(b"SELECT $$;/*$$; LISTEN ch; -- */"), Effect::None);
        assert_eq!(classify(b"SELECT 1;  "), Effect::None);
        assert_eq!(
            classify(b"SELECT 1; LISTEN ch"),
            classify(b"LISTEN ch; SELECT 1")
        );
        assert_ne!(classify(b"SELECT 1; LISTEN ch"), Effect::None);
        assert_eq!(
            classify(b"SET work_mem = '8MB';"),
            set("work_mem", "SET work_mem = '8MB'")
        );
        assert_eq!(
            classify(b"set session myapp.x to 1"),
            set("myapp.x", "set session myapp.x to 1")
        );
        assert_eq!(
            classify(b"SET TIME ZONE 'UTC'"),
            set("timezone", "SET TIME ZONE 'UTC'")
        );
        assert_eq!(classify(b"SET LOCAL work_mem = '1MB'"), Effect::LocalSet);
        assert_eq!(
            classify(b"SET work_mem TO DEFAULT"),
            Effect::Reset {
                key: "work_mem".into()
            }
        );
        assert_eq!(
            classify(b"RESET work_mem"),
            Effect::Reset {
                key: "work_mem".into()
            }
        );
        assert_eq!(classify(b"RESET ALL"), Effect::ResetAll);
        assert_eq!(
            classify(b"PREPARE q(int) AS SELECT $1"),
            Effect::Prepare {
                name: "q".into(),
                text: "PREPARE q(int) AS SELECT $1".into()
            }
        );
        assert_eq!(
            classify(b"DEALLOCATE q"),
            Effect::Deallocate { name: "q".into() }
        );
        assert_eq!(classify(b"DEALLOCATE ALL"), Effect::DeallocateAll);
        assert_eq!(classify(b"DISCARD ALL"), Effect::DiscardAll);
        assert_eq!(classify(b"LISTEN jobs"), Effect::Pin("LISTEN"));
        assert_eq!(classify(b"UNLISTEN *"), Effect::Unpin("LISTEN"));
        assert_eq!(
            classify(b"CREATE TEMP TABLE t (x int)"),
            Effect::Pin("temporary table")
        );
        assert_eq!(
            classify(b"DECLARE c CURSOR WITH HOLD FOR SELECT 1"),
            Effect::Pin("cursor WITH HOLD")
        );
        assert_eq!(classify(b"DECLARE c CURSOR FOR SELECT 1"), Effect::None);
        assert_eq!(
            classify(b"select pg_advisory_lock(1)"),
            Effect::Pin("advisory lock")
        );
        assert_eq!(
            classify(b"select pg_advisory_unlock_all()"),
            Effect::Unpin("advisory lock")
        );
        assert_eq!(classify(b"select pg_advisory_xact_lock(1)"), Effect::None);
        assert_eq!(classify(b"SET a = 1; SELECT 1"), Effect::Untracked);
        assert_eq!(
            classify(b"SELECT 1; SET search_path = x"),
            Effect::Untracked
        );
        assert_eq!(
            classify(b"SELECT set_config('work_mem', '1MB', false)"),
            Effect::Untracked
        );
        assert_eq!(
            classify(b"SET \"Work_Mem\" = '1MB'"),
            set("work_mem", "SET \"Work_Mem\" = '1MB'")
        );
        assert_eq!(
            classify(b"SELECT pg_Advisory_Lock(1)"),
            Effect::Pin("advisory lock")
        );
        assert_eq!(classify(b"CREATE TABLE t (x int)"), Effect::None);
    }
}
