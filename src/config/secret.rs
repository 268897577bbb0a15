//! Passwords from the config, a file or the environment, and tenant-role passwords derived from a key.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::ConfigError;

/// A password or key. Its `Debug` never shows the value, so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "Secret(empty)"
        } else {
            "Secret(..)"
        })
    }
}

/// One password given at most one way: inline, as a file, or as an environment variable.
pub struct Source<'a> {
    pub what: String,
    pub inline: Option<&'a str>,
    pub file: Option<&'a Path>,
    pub env_var: Option<&'a str>,
}

impl Source<'_> {
    /// The password, `None` when no source is given. A file holds the password on its first line; both a
    /// missing file and an unset variable are errors, so a typo cannot silently mean "no password".
    pub fn resolve(&self, env: &HashMap<String, String>) -> Result<Option<Secret>, ConfigError> {
        let inline = self.inline.filter(|s| !s.is_empty());
        let given = [
            inline.is_some(),
            self.file.is_some(),
            self.env_var.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(ConfigError::Invalid(format!(
                "{}: give the password inline, as a file or as an environment variable, not several",
                self.what
            )));
        }
        if let Some(p) = inline {
            return Ok(Some(Secret::new(p)));
        }
        if let Some(path) = self.file {
            return read_first_line(path)
                .map(Some)
                .map_err(|e| ConfigError::Invalid(format!("{}: {e}", self.what)));
        }
        if let Some(var) = self.env_var {
            return env
                .get(var)
                .map(|v| Some(Secret::new(v.clone())))
                .ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "{}: environment variable {var} is not set",
                        self.what
                    ))
                });
        }
        Ok(None)
    }
}

fn read_first_line(path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if line.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(Secret::new(line))
}

/// Reads a key file (any bytes, at least 16 of them once trimmed).
pub fn read_key(path: &Path, what: &str) -> Result<Secret, ConfigError> {
    let s = read_first_line(path).map_err(|e| ConfigError::Invalid(format!("{what}: {e}")))?;
    if s.expose().len() < 16 {
        return Err(ConfigError::Invalid(format!(
            "{what}: the key in {} is shorter than 16 characters",
            path.display()
        )));
    }
    Ok(s)
}

/// The password of tenant role `role` derived from `key`: the same on every proxy that has the key, different
/// for every role, and useless for finding the key or another role's password.
pub fn derived_password(key: &Secret, role: &str) -> Secret {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.expose().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(b"pgtenant tenant-role password\0");
    mac.update(role.as_bytes());
    let bytes = mac.finalize().into_bytes();
    use base64::Engine;
    Secret::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes[..24]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source<'a>(inline: Option<&'a str>, env_var: Option<&'a str>) -> Source<'a> {
        Source {
            what: "x".into(),
            inline,
            file: None,
            env_var,
        }
    }

    #[test]
    fn sources_resolve_and_conflicts_are_refused() {
        let env: HashMap<String, String> = [("PW".to_string(), "from-env".to_string())].into();
        assert_eq!(source(None, None).resolve(&env).unwrap(), None);
        assert_eq!(
            source(Some("p"), None).resolve(&env).unwrap(),
            Some(Secret::new("p"))
        );
        assert_eq!(
            source(None, Some("PW")).resolve(&env).unwrap(),
            Some(Secret::new("from-env"))
        );
        assert!(source(None, Some("NOPE")).resolve(&env).is_err());
        assert!(source(Some("p"), Some("PW")).resolve(&env).is_err());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "line-one\nline-two\n").unwrap();
        let s = Source {
            what: "x".into(),
            inline: None,
            file: Some(&f),
            env_var: None,
        };
        assert_eq!(s.resolve(&env).unwrap(), Some(Secret::new("line-one")));
    }

    #[test]
    fn derived_passwords_differ_per_role_and_key_and_never_show() {
        let k1 = Secret::new("0123456789abcdef-key-one");
        let k2 = Secret::new("0123456789abcdef-key-two");
        let a = derived_password(&k1, "t_acme");
        assert_eq!(a, derived_password(&k1, "t_acme"));
        assert_ne!(a, derived_password(&k1, "t_globex"));
        assert_ne!(a, derived_password(&k2, "t_acme"));
        assert_eq!(a.expose().len(), 32);
        assert_eq!(format!("{a:?}"), "Secret(..)");
    }
}
