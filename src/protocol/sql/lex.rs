//! Just enough SQL lexing for the proxy: statements split at top-level semicolons (quotes, dollar quotes and
//! comments respected), the first tokens of each, and a case-insensitive word search (the words every statement
//! is searched for are in `words`).

/// Whether `sql` contains `needle` (lower case) in any letter case, comparing at each occurrence of its first
/// letter.
pub(super) fn contains_at_first_letter(sql: &[u8], needle: &[u8]) -> bool {
    let first = needle.first().copied().unwrap_or_default();
    memchr::memchr2_iter(first, first.to_ascii_uppercase(), sql).any(|i| {
        sql.get(i..i + needle.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(needle))
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Tok {
    /// Unquoted word, lower-cased.
    Word(String),
    /// Double-quoted identifier, as written.
    Quoted(String),
    /// String literal, unescaped.
    Str(String),
    Punct(u8),
}

#[derive(Debug, Default)]
pub(super) struct Statement {
    pub(super) tokens: Vec<(Tok, usize)>,
    pub(super) end: usize,
}

/// Splits on top-level semicolons. Tokens carry their start offset so a value can be read from the raw text.
pub(super) fn split_statements(sql: &[u8]) -> Vec<Statement> {
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

pub(super) struct Lexer<'a> {
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

pub(super) fn is_word_byte(c: u8) -> bool {
    WORD_BYTES[usize::from(c)]
}

/// Which bytes continue an unquoted word: ASCII letters and digits, `_`, and every byte of a multi-byte UTF-8
/// character. A table, since the first word of every statement is read byte by byte (counted with
/// `benches/instructions.sh`: with three range tests a byte, `first_word` took 120 instructions of a `pgbench -S`
/// transaction; with the table, 58).
static WORD_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        table[c] = b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80;
        c += 1;
    }
    table
};

pub(super) fn is_name(tok: Option<&(Tok, usize)>, name: &str) -> bool {
    match tok {
        Some((Tok::Word(w), _)) | Some((Tok::Quoted(w), _)) => w == name,
        _ => false,
    }
}

/// Whether the text may hold more than one statement: a cheap, conservative test that spares the common single
/// statement with a trailing `;` (as pgbench and many drivers send it) the full tokenisation. Only a text with
/// exactly one `;` is looked at: if that `;` sits inside a literal or comment there is one statement, and if it
/// ends a statement, what follows is read from a clean position (blanks and comments only: one statement).
///
/// `semicolons`: the first and the last `;` of the text (see `Words::semicolons`).
pub(super) fn more_than_one_statement(sql: &[u8], semicolons: Option<(usize, usize)>) -> bool {
    let Some((semi, last)) = semicolons else {
        return false;
    };
    if last != semi {
        return true;
    }
    // (`get`: the positions come from the caller; ones of another text must not panic.)
    let mut rest = Lexer {
        s: sql.get(semi + 1..).unwrap_or_default(),
        i: 0,
    };
    rest.skip_space_and_comments();
    rest.i < rest.s.len()
}

pub(super) fn word(t: Option<&(Tok, usize)>) -> Option<&str> {
    match t {
        Some((Tok::Word(w), _)) => Some(w.as_str()),
        _ => None,
    }
}

/// A setting name: words and quoted identifiers joined by dots (`myapp.tenant_id`).
pub(super) fn setting_name(t: &[(Tok, usize)]) -> Option<(String, usize)> {
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

/// The first word of `sql` after blanks and comments (empty when it starts with something else).
pub(super) fn first_word(sql: &[u8]) -> &[u8] {
    // Most statements start with their word: the lexer's look for blanks and comments is skipped then.
    let start = if sql.first().is_some_and(u8::is_ascii_alphabetic) {
        0
    } else {
        let mut lx = Lexer { s: sql, i: 0 };
        lx.skip_space_and_comments();
        lx.i
    };
    let rest = &sql[start..];
    let len = rest
        .iter()
        .position(|&c| !is_word_byte(c))
        .unwrap_or(rest.len());
    &rest[..len]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_word_ends_at_the_first_byte_no_word_has() {
        assert_eq!(first_word(b"SELECT 1"), b"SELECT");
        assert_eq!(first_word(b"  /* c */ set_config(1)"), b"set_config");
        assert_eq!(first_word("sélect;".as_bytes()), "sélect".as_bytes());
        assert_eq!(first_word(b"do$$ begin end $$"), b"do");
        assert_eq!(first_word(b"x9_Z-1"), b"x9_Z");
        assert_eq!(first_word(b""), b"");
        for c in 0..=255u8 {
            let by_rule = c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
            assert_eq!(is_word_byte(c), by_rule, "{c}");
        }
    }
}
