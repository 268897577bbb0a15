//! The little SQL the proxy reads: a lexer ([`lex`]), the tenant statements it answers itself ([`tenant`]),
//! and the session-state effects of a query ([`effects`]). Nothing here parses SQL in general; it reads the
//! first tokens of each statement.

mod effects;
mod lex;
mod tenant;
mod words;

pub use effects::{
    classify, classify_with, Effect, PIN_ADVISORY, PIN_CURSOR, PIN_LISTEN, PIN_TEMP,
};
pub use tenant::{
    mentions_pgtenant, recognise, recognise_with, Recognised, TenantCommand, GUARDED_SETTINGS,
};
pub use words::Words;

/// Whether the first word of `sql`, after white space and comments, is `word` (lower case) in any case.
pub fn starts_with_word(sql: &[u8], word: &[u8]) -> bool {
    lex::first_word(sql).eq_ignore_ascii_case(word)
}
