//! Identifiers that cross module boundaries: backend names and routing-table versions (tenant names are
//! [`crate::tenant::TenantId`]).

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A routing table version. Every change increases it, so a session can tell its backend is of an older route.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Epoch(pub u64);

impl Epoch {
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A backend's name (a `[backends.NAME]` of the config): `[A-Za-z0-9_-]{1,63}`. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BackendId(Arc<str>);

/// `"dedicated"`: messages that quote a backend with `{:?}` show its name, not a Rust type.
impl std::fmt::Debug for BackendId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid backend name {0:?}: use 1 to 63 of A-Z a-z 0-9 _ -")]
pub struct InvalidBackendName(String);

impl BackendId {
    pub fn parse(s: &str) -> Result<BackendId, InvalidBackendName> {
        if crate::tenant::valid_identifier(s) {
            Ok(BackendId(Arc::from(s)))
        } else {
            Err(InvalidBackendName(s.chars().take(80).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for BackendId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for BackendId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for BackendId {
    type Err = InvalidBackendName;
    fn from_str(s: &str) -> Result<BackendId, InvalidBackendName> {
        BackendId::parse(s)
    }
}

impl Serialize for BackendId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for BackendId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<BackendId, D::Error> {
        let s = String::deserialize(d)?;
        BackendId::parse(&s).map_err(serde::de::Error::custom)
    }
}
