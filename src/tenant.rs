//! Tenant names and working out which tenant a connection belongs to (DESIGN section 2).

use std::fmt;
use std::sync::Arc;

use thiserror::Error;

use serde::{Deserialize, Serialize};

/// Where a connection's tenant may come from (`proxy.tenant_sources`, DESIGN section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TenantSource {
    UserSuffix,
    Options,
    Database,
    Set,
}

/// A validated tenant name: `[A-Za-z0-9_-]{1,63}`. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Arc<str>);

/// `"acme"`: messages that quote a tenant with `{:?}` show its name, not a Rust type.
impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TenantError {
    #[error("invalid tenant name {0:?}: use 1 to 63 of A-Z a-z 0-9 _ -")]
    InvalidName(String),
    #[error(
        "conflicting tenants: {first_source} says {first:?} but {second_source} says {second:?}"
    )]
    Conflict {
        first_source: &'static str,
        first: String,
        second_source: &'static str,
        second: String,
    },
}

/// True for names of tenants and backends: 1 to 63 ASCII letters, digits, `_` or `-`.
pub fn valid_identifier(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl TenantId {
    pub fn parse(s: &str) -> Result<TenantId, TenantError> {
        if valid_identifier(s) {
            Ok(TenantId(Arc::from(s)))
        } else {
            Err(TenantError::InvalidName(s.chars().take(80).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Read access as text (SQL literals, metric labels, log fields); a `TenantId` is only made by [`TenantId::parse`].
impl std::ops::Deref for TenantId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for TenantId {
    type Err = TenantError;
    fn from_str(s: &str) -> Result<TenantId, TenantError> {
        TenantId::parse(s)
    }
}

impl Serialize for TenantId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TenantId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<TenantId, D::Error> {
        let s = String::deserialize(d)?;
        TenantId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Splits `app.acme` into user `app` and tenant `acme` at the last separator, unless the whole name is itself a
/// configured user (so user names may contain the separator).
pub fn split_user(raw: &str, sep: char, is_user: impl Fn(&str) -> bool) -> (&str, Option<&str>) {
    if is_user(raw) {
        return (raw, None);
    }
    match raw.rsplit_once(sep) {
        Some((user, tenant)) if !user.is_empty() && !tenant.is_empty() => (user, Some(tenant)),
        _ => (raw, None),
    }
}

/// What the startup packet says about the tenant, one field per startup source.
#[derive(Debug, Default, Clone)]
pub struct StartupHints<'a> {
    pub user_suffix: Option<&'a str>,
    /// Every `pgtenant.tenant` setting found in `options`.
    pub options: Vec<String>,
    pub database: Option<&'a str>,
}

fn source_name(s: TenantSource) -> &'static str {
    match s {
        TenantSource::UserSuffix => "the user name suffix",
        TenantSource::Options => "the options parameter",
        TenantSource::Database => "the database name",
        TenantSource::Set => "SET pgtenant.tenant",
    }
}

/// Applies the configured sources in order. Every source that names a tenant must agree; the database name only
/// counts when it is the name of a configured tenant (`is_tenant`). `Ok(None)`: no source named one.
pub fn resolve(
    sources: &[TenantSource],
    hints: &StartupHints<'_>,
    is_tenant: impl Fn(&str) -> bool,
) -> Result<Option<TenantId>, TenantError> {
    let mut chosen: Option<(&'static str, String)> = None;
    for &source in sources {
        let values: Vec<&str> = match source {
            TenantSource::UserSuffix => hints.user_suffix.into_iter().collect(),
            TenantSource::Options => hints.options.iter().map(|s| s.as_str()).collect(),
            TenantSource::Database => hints
                .database
                .filter(|d| is_tenant(d))
                .into_iter()
                .collect(),
            TenantSource::Set => Vec::new(),
        };
        for v in values {
            match &chosen {
                None => chosen = Some((source_name(source), v.to_owned())),
                Some((first_source, first)) if first != v => {
                    return Err(TenantError::Conflict {
                        first_source,
                        first: first.clone(),
                        second_source: source_name(source),
                        second: v.to_owned(),
                    })
                }
                Some(_) => {}
            }
        }
    }
    chosen.map(|(_, name)| TenantId::parse(&name)).transpose()
}

/// Whether a user's `tenants` list lets it reach `tenant`.
pub fn may_reach(allowed: &[String], tenant: &TenantId) -> bool {
    allowed.iter().any(|a| a == "*" || a == tenant.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [TenantSource; 4] = [
        TenantSource::UserSuffix,
        TenantSource::Options,
        TenantSource::Database,
        TenantSource::Set,
    ];

    #[test]
    fn names() {
        assert!(TenantId::parse("acme-2_x").is_ok());
        assert!(TenantId::parse("").is_err());
        assert!(TenantId::parse("a.b").is_err());
        assert!(TenantId::parse(&"a".repeat(64)).is_err());
    }

    #[test]
    fn user_suffix() {
        let users = |u: &str| u == "first.last";
        assert_eq!(split_user("app.acme", '.', users), ("app", Some("acme")));
        assert_eq!(split_user("first.last", '.', users), ("first.last", None));
        assert_eq!(split_user("a.b.acme", '.', users), ("a.b", Some("acme")));
        assert_eq!(split_user("app", '.', users), ("app", None));
        assert_eq!(split_user(".acme", '.', users), (".acme", None));
    }

    #[test]
    fn sources_must_agree() {
        let is_tenant = |d: &str| d == "acme" || d == "globex";
        let hints = StartupHints {
            user_suffix: Some("acme"),
            options: vec!["acme".into()],
            database: Some("app"),
        };
        assert_eq!(
            resolve(&ALL, &hints, is_tenant).unwrap().unwrap().as_str(),
            "acme"
        );
        let conflict = StartupHints {
            database: Some("globex"),
            ..hints.clone()
        };
        assert!(matches!(
            resolve(&ALL, &conflict, is_tenant),
            Err(TenantError::Conflict { .. })
        ));
        // A source left out of the configuration is ignored.
        let only_db = [TenantSource::Database];
        assert_eq!(
            resolve(&only_db, &conflict, is_tenant)
                .unwrap()
                .unwrap()
                .as_str(),
            "globex"
        );
        let none = StartupHints::default();
        assert_eq!(resolve(&ALL, &none, is_tenant).unwrap(), None);
        let bad = StartupHints {
            user_suffix: Some("a b"),
            ..Default::default()
        };
        assert!(matches!(
            resolve(&ALL, &bad, is_tenant),
            Err(TenantError::InvalidName(_))
        ));
    }
}
