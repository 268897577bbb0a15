//! Validated argument values of admin requests. Each type checks itself when it is deserialized, so a request
//! that parses holds only values the commands can use as they are; identifiers are still quoted wherever they
//! reach SQL.

use serde::{Deserialize, Deserializer, Serialize};

/// Most audit lines one request may ask for.
pub const MAX_AUDIT_TAIL: usize = 10_000;
/// Longest `pause` wait a request may ask for.
pub const MAX_PAUSE_TIMEOUT_MS: u64 = 3_600_000;
/// Longest statement text `migrate ddl` accepts.
pub const MAX_DDL_BYTES: usize = 64 * 1024;

/// A database, schema, role or column name: any text PostgreSQL accepts as an identifier (1 to 63 bytes, no
/// NUL).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ident(String);

impl TryFrom<String> for Ident {
    type Error = String;
    fn try_from(s: String) -> Result<Ident, String> {
        if s.is_empty() || s.len() > 63 || s.contains('\0') {
            return Err("must be 1 to 63 bytes without NUL".into());
        }
        Ok(Ident(s))
    }
}

/// A tenant's value in a tenant column: 1 to 256 bytes, no NUL (a literal wherever it reaches SQL).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TenantKey(String);

impl TryFrom<String> for TenantKey {
    type Error = String;
    fn try_from(s: String) -> Result<TenantKey, String> {
        if s.is_empty() || s.len() > 256 || s.contains('\0') {
            return Err("must be 1 to 256 bytes without NUL".into());
        }
        Ok(TenantKey(s))
    }
}

/// The statement text of `migrate ddl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sql(String);

impl TryFrom<String> for Sql {
    type Error = String;
    fn try_from(s: String) -> Result<Sql, String> {
        if s.trim().is_empty() || s.len() > MAX_DDL_BYTES || s.contains('\0') {
            return Err("must be a non-empty statement of at most 64 KiB".into());
        }
        Ok(Sql(s))
    }
}

/// A file or directory path on the proxy's machine (backups): absolute, at most 4 096 bytes, no NUL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FilePath(String);

impl TryFrom<String> for FilePath {
    type Error = String;
    fn try_from(s: String) -> Result<FilePath, String> {
        if !s.starts_with('/') || s.len() > 4096 || s.contains('\0') {
            return Err("must be an absolute path of at most 4096 bytes".into());
        }
        Ok(FilePath(s))
    }
}

/// How long `pause` waits for open transactions, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct PauseTimeout(u64);

impl TryFrom<u64> for PauseTimeout {
    type Error = String;
    fn try_from(ms: u64) -> Result<PauseTimeout, String> {
        if ms > MAX_PAUSE_TIMEOUT_MS {
            return Err(format!("must be at most {MAX_PAUSE_TIMEOUT_MS}"));
        }
        Ok(PauseTimeout(ms))
    }
}

impl PauseTimeout {
    pub fn duration(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.0)
    }
}

/// How many audit lines to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct AuditTail(usize);

impl Default for AuditTail {
    fn default() -> AuditTail {
        AuditTail(20)
    }
}

impl TryFrom<u64> for AuditTail {
    type Error = String;
    fn try_from(n: u64) -> Result<AuditTail, String> {
        match usize::try_from(n) {
            Ok(n) if n <= MAX_AUDIT_TAIL => Ok(AuditTail(n)),
            _ => Err(format!("must be at most {MAX_AUDIT_TAIL}")),
        }
    }
}

impl std::fmt::Display for AuditTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl AuditTail {
    pub fn get(self) -> usize {
        self.0
    }
}

macro_rules! text_value {
    ($($t:ident),*) => {$(
        impl std::ops::Deref for $t {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.0
            }
        }
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<$t, String> {
                $t::try_from(s.to_owned())
            }
        }
    )*};
}
text_value!(Ident, TenantKey, Sql, FilePath);

macro_rules! number_value {
    ($($t:ident),*) => {$(
        impl From<$t> for u64 {
            fn from(v: $t) -> u64 {
                v.0 as u64
            }
        }
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<$t, String> {
                let n: u64 = s.parse().map_err(|_| "must be a whole number".to_string())?;
                $t::try_from(n)
            }
        }
    )*};
}
number_value!(PauseTimeout, AuditTail);

/// For optional arguments: absent and `null` both mean the default.
pub fn or_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// For serializing: leave out what is the default.
pub fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_check_themselves() {
        assert!("".parse::<Ident>().is_err());
        assert!("a\0b".parse::<Ident>().is_err());
        assert!("x".repeat(64).parse::<Ident>().is_err());
        assert_eq!(&*"Weird \"S\"".parse::<Ident>().unwrap(), "Weird \"S\"");
        assert!("k".repeat(257).parse::<TenantKey>().is_err());
        assert!("  ".parse::<Sql>().is_err());
        assert!("relative/x".parse::<FilePath>().is_err());
        assert_eq!(&*"/tmp/b".parse::<FilePath>().unwrap(), "/tmp/b");
        assert!("3600001".parse::<PauseTimeout>().is_err());
        assert!("-1".parse::<PauseTimeout>().is_err());
        assert_eq!(u64::from("10000".parse::<AuditTail>().unwrap()), 10_000);
        assert!("10001".parse::<AuditTail>().is_err());
    }
}
