//! Quoting for SQL text the proxy builds: names from outside (schemas, tables, roles) reach SQL only through
//! [`quote_ident`], values only through [`quote_literal`].

/// Quotes an SQL identifier (schema names reach SQL only through this).
pub fn quote_ident(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars().filter(|&c| c != '\0') {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// A SQL string literal (standard_conforming_strings is on in every supported server).
pub fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars().filter(|&c| c != '\0') {
        if c == '\'' {
            out.push('\'');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_values_are_quoted() {
        assert_eq!(quote_ident("tenant_\"x"), "\"tenant_\"\"x\"");
        assert_eq!(quote_ident("a\0b"), "\"ab\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\0b"), "'ab'");
    }
}
