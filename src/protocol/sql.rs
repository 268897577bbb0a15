//! Recognises the statements the proxy answers itself: `SET [SESSION] pgtenant.tenant {=|TO} value`,
//! `SET pgtenant.tenant TO DEFAULT`, `RESET pgtenant.tenant` and `SHOW pgtenant.tenant`.
//!
//! Most queries never mention `pgtenant`, and a byte scan rules them out. The rest are lexed just enough to split
//! statements (quotes, dollar quotes and comments respected) and read the first few tokens of each, so that a
//! tenant statement hidden in a multi-statement query is refused instead of reaching a backend, where it would
//! silently set a meaningless placeholder variable.

use std::sync::LazyLock;

use memchr::memmem::Finder;

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

// Substring searchers built once: building one costs more than searching a statement with it.
static ADVISORY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"advisory"));
static SET_CONFIG: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"set_config"));
static PGTENANT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(NAME));
static REPLICATION_ROLE: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"replication_role"));

/// Statements up to this long are lower-cased on the stack for the case-insensitive word searches.
const SHORT_TEXT: usize = 512;

/// Whether `sql` contains each of `needles` (given in lower case) in any letter case. A short text is
/// lower-cased once into a stack buffer and searched with a vectorised substring search. Comparing at every
/// occurrence of a needle's first letter instead costs a compare per word of an ordinary statement: pgbench's
/// table names alone put a `p`, an `a` and an `s` in most of its words.
fn contains_words<const N: usize>(sql: &[u8], needles: [&Finder<'static>; N]) -> [bool; N] {
    if sql.len() <= SHORT_TEXT {
        let mut buf = [0u8; SHORT_TEXT];
        let lower = &mut buf[..sql.len()];
        lower.copy_from_slice(sql);
        lower.make_ascii_lowercase();
        return needles.map(|n| n.find(lower).is_some());
    }
    needles.map(|n| contains_at_first_letter(sql, n.needle()))
}

/// Whether `sql` contains `needle` (lower case) in any letter case, comparing at each occurrence of its first
/// letter.
fn contains_at_first_letter(sql: &[u8], needle: &[u8]) -> bool {
    let first = needle.first().copied().unwrap_or_default();
    memchr::memchr2_iter(first, first.to_ascii_uppercase(), sql).any(|i| {
        sql.get(i..i + needle.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(needle))
    })
}

pub fn recognise(sql: &[u8]) -> Recognised {
    let [pgtenant, replication] = contains_words(sql, [&PGTENANT, &REPLICATION_ROLE]);
    if !pgtenant && !replication {
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

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    /// Unquoted word, lower-cased.
    Word(String),
    /// Double-quoted identifier, as written.
    Quoted(String),
    /// String literal, unescaped.
    Str(String),
    Punct(u8),
}

#[derive(Debug, Default)]
struct Statement {
    tokens: Vec<(Tok, usize)>,
    end: usize,
}

/// Splits on top-level semicolons. Tokens carry their start offset so a value can be read from the raw text.
fn split_statements(sql: &[u8]) -> Vec<Statement> {
    let mut out = vec![Statement::default()];
    let mut lx = Lexer { s: sql, i: 0 };
    while let Some((tok, start)) = lx.next() {
        let cur = out.last_mut().expect("never empty");
        if tok == Tok::Punct(b';') {
            cur.end = start;
            out.push(Statement::default());
        } else {
            cur.tokens.push((tok, start));
        }
    }
    if let Some(last) = out.last_mut() {
        last.end = sql.len();
    }
    out
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lexer<'_> {
    fn peek(&self, k: usize) -> Option<u8> {
        self.s.get(self.i + k).copied()
    }

    fn next(&mut self) -> Option<(Tok, usize)> {
        self.skip_space_and_comments();
        let start = self.i;
        let c = self.peek(0)?;
        let tok = match c {
            b'\'' => Tok::Str(self.quoted(b'\'', false)),
            b'e' | b'E' if self.peek(1) == Some(b'\'') => {
                self.i += 1;
                Tok::Str(self.quoted(b'\'', true))
            }
            b'"' => Tok::Quoted(self.quoted(b'"', false)),
            b'$' if self.dollar_tag().is_some() => {
                self.dollar_quoted();
                Tok::Str(String::new())
            }
            c if is_word_byte(c) => {
                while self.peek(0).is_some_and(|b| is_word_byte(b) || b == b'$') {
                    self.i += 1;
                }
                Tok::Word(String::from_utf8_lossy(&self.s[start..self.i]).to_ascii_lowercase())
            }
            c => {
                self.i += 1;
                Tok::Punct(c)
            }
        };
        Some((tok, start))
    }

    fn skip_space_and_comments(&mut self) {
        loop {
            match (self.peek(0), self.peek(1)) {
                (Some(c), _) if c.is_ascii_whitespace() => self.i += 1,
                (Some(b'-'), Some(b'-')) => {
                    while self.peek(0).is_some_and(|c| c != b'\n') {
                        self.i += 1;
                    }
                }
                (Some(b'/'), Some(b'*')) => {
                    self.i += 2;
                    let mut depth = 1usize;
                    while depth > 0 {
                        match (self.peek(0), self.peek(1)) {
                            (None, _) => return,
                            (Some(b'*'), Some(b'/')) => {
                                depth -= 1;
                                self.i += 2;
                            }
                            (Some(b'/'), Some(b'*')) => {
                                depth += 1;
                                self.i += 2;
                            }
                            _ => self.i += 1,
                        }
                    }
                }
                _ => return,
            }
        }
    }

    /// Reads a quoted run starting at the opening quote; a doubled quote is one quote, and with `backslash`
    /// a backslash escapes the next byte. An unterminated run ends at the end of the text.
    fn quoted(&mut self, q: u8, backslash: bool) -> String {
        self.i += 1;
        let mut out = Vec::new();
        while let Some(c) = self.peek(0) {
            self.i += 1;
            if backslash && c == b'\\' {
                if let Some(n) = self.peek(0) {
                    out.push(n);
                    self.i += 1;
                }
            } else if c == q {
                if self.peek(0) == Some(q) {
                    out.push(q);
                    self.i += 1;
                } else {
                    break;
                }
            } else {
                out.push(c);
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The length of a `$tag$` opener at the cursor, if there is one (`$1` is a parameter, not a tag).
    fn dollar_tag(&self) -> Option<usize> {
        let rest = &self.s[self.i + 1..];
        if rest.first().is_some_and(|c| c.is_ascii_digit()) {
            return None;
        }
        let n = rest.iter().take_while(|&&b| is_word_byte(b)).count();
        (rest.get(n) == Some(&b'$')).then_some(n + 2)
    }

    fn dollar_quoted(&mut self) {
        let Some(n) = self.dollar_tag() else { return };
        let tag = &self.s[self.i..self.i + n];
        self.i += n;
        match memchr::memmem::find(&self.s[self.i..], tag) {
            Some(at) => self.i += at + n,
            None => self.i = self.s.len(),
        }
    }
}

fn is_word_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

fn is_name(tok: Option<&(Tok, usize)>, name: &str) -> bool {
    match tok {
        Some((Tok::Word(w), _)) | Some((Tok::Quoted(w), _)) => w == name,
        _ => false,
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
        // 55 bytes of text: the short path, exactly SHORT_TEXT bytes (still short), one byte over, and long.
        for pad in [0, SHORT_TEXT - 55, SHORT_TEXT - 54, 4 * SHORT_TEXT] {
            let text = format!(
                "{}select Set_Config('a', 'b', false), PG_ADVISORY_lock(1)",
                " ".repeat(pad)
            );
            assert_eq!(
                contains_words(text.as_bytes(), [&SET_CONFIG, &ADVISORY]),
                [true, true],
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
    // set_config(..., false) changes a setting for the session in a way the proxy does not follow; "advisory"
    // is rare, and only then is the text looked at closer.
    let [advisory, set_config] = contains_words(sql, [&ADVISORY, &SET_CONFIG]);
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
    let mut lx = Lexer { s: sql, i: 0 };
    lx.skip_space_and_comments();
    let start = lx.i;
    while lx.peek(0).is_some_and(is_word_byte) {
        lx.i += 1;
    }
    let first = &sql[start..lx.i];
    let candidate = STATE_WORDS
        .iter()
        .any(|w| first.eq_ignore_ascii_case(w.as_bytes()))
        || first.eq_ignore_ascii_case(b"close")
        || more_than_one_statement(sql);
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

/// Whether the text may hold more than one statement: a cheap, conservative test that spares the common single
/// statement with a trailing `;` (as pgbench and many drivers send it) the full tokenisation. Only a text with
/// exactly one `;` is looked at: if that `;` sits inside a literal or comment there is one statement, and if it
/// ends a statement, what follows is read from a clean position (blanks and comments only: one statement).
fn more_than_one_statement(sql: &[u8]) -> bool {
    let Some(semi) = memchr::memchr(b';', sql) else {
        return false;
    };
    if memchr::memchr(b';', &sql[semi + 1..]).is_some() {
        return true;
    }
    let mut rest = Lexer {
        s: &sql[semi + 1..],
        i: 0,
    };
    rest.skip_space_and_comments();
    rest.i < rest.s.len()
}

fn word(t: Option<&(Tok, usize)>) -> Option<&str> {
    match t {
        Some((Tok::Word(w), _)) => Some(w.as_str()),
        _ => None,
    }
}

/// A setting name: words and quoted identifiers joined by dots (`myapp.tenant_id`).
fn setting_name(t: &[(Tok, usize)]) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut i = 0;
    loop {
        match t.get(i) {
            Some((Tok::Word(w), _)) | Some((Tok::Quoted(w), _)) => name.push_str(w),
            _ => return None,
        }
        i += 1;
        if t.get(i).is_some_and(|(tok, _)| *tok == Tok::Punct(b'.')) {
            name.push('.');
            i += 1;
        } else {
            return Some((name, i));
        }
    }
}

fn classify_one(sql: &[u8], stmt: &Statement) -> Effect {
    let t = &stmt.tokens;
    // Replayed text must be the client's bytes exactly; text that is not UTF-8 is not tracked.
    let Ok(raw) = std::str::from_utf8(&sql[t[0].1..stmt.end]) else {
        return Effect::Untracked;
    };
    let text = || raw.trim().to_string();
    let w = |i: usize| word(t.get(i));
    match (w(0), w(1), w(2)) {
        (Some("set"), Some("local"), _) => Effect::LocalSet,
        (Some("set"), Some("transaction" | "constraints"), _) => Effect::None,
        (Some("set"), Some("session"), Some("characteristics")) => Effect::Untracked,
        (Some("set"), Some("session"), Some("authorization")) => Effect::Set {
            key: "session_authorization".into(),
            text: text(),
        },
        (Some("set"), Some("time"), Some("zone")) => Effect::Set {
            key: "timezone".into(),
            text: text(),
        },
        (Some("set"), Some("names"), _) => Effect::Set {
            key: "client_encoding".into(),
            text: text(),
        },
        (Some("set"), Some("schema"), _) => Effect::Set {
            key: "search_path".into(),
            text: text(),
        },
        (Some("set"), _, _) => {
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
                Effect::Set { key, text: text() }
            }
        }
        (Some("reset"), Some("all"), _) => Effect::ResetAll,
        (Some("reset"), Some("session"), Some("authorization")) => Effect::Reset {
            key: "session_authorization".into(),
        },
        (Some("reset"), Some("time"), Some("zone")) => Effect::Reset {
            key: "timezone".into(),
        },
        (Some("reset"), _, _) => match setting_name(&t[1..]) {
            Some((key, _)) => Effect::Reset {
                key: key.to_ascii_lowercase(),
            },
            None => Effect::Untracked,
        },
        (Some("prepare"), Some("transaction"), _) => Effect::None,
        (Some("prepare"), _, _) => match setting_name(&t[1..2.min(t.len())]) {
            Some((name, _)) => Effect::Prepare { name, text: text() },
            None => Effect::Untracked,
        },
        (Some("deallocate"), Some("all"), _)
        | (Some("deallocate"), Some("prepare"), Some("all")) => Effect::DeallocateAll,
        (Some("deallocate"), _, _) => {
            let at = if w(1) == Some("prepare") { 2 } else { 1 };
            match setting_name(&t[at.min(t.len())..]) {
                Some((name, _)) => Effect::Deallocate { name },
                None => Effect::Untracked,
            }
        }
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
        assert!(!super::more_than_one_statement(
            b"SELECT 1; -- done\n /* c */ "
        ));
        assert!(super::more_than_one_statement(b"SELECT ';' AS x"));
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
