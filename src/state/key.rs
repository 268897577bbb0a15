//! The proxy's secret key (`proxy.key_file`): it signs the audit chain (an HMAC, so whoever can edit the state
//! directory cannot rewrite history and fix up the checksums) and derives the fake SCRAM salts of unknown
//! users. It lives outside `state_dir`, mode 0600, and is created on first start.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use super::{hex, StateError};

#[derive(Clone)]
pub struct ProxyKey([u8; 32]);

impl std::fmt::Debug for ProxyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProxyKey(..)")
    }
}

impl ProxyKey {
    /// Reads the key file, or creates it (mode 0600, created exclusively so two starting proxies cannot write
    /// different keys) when it does not exist.
    pub fn load_or_create(path: &Path) -> Result<ProxyKey, StateError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                if let Ok(meta) = std::fs::metadata(path) {
                    if meta.permissions().mode() & 0o077 != 0 {
                        tracing::warn!(path = %path.display(), "key file is readable by other users; chmod 600 it");
                    }
                }
                ProxyKey::parse(text.trim()).ok_or_else(|| StateError::Corrupt {
                    path: path.to_owned(),
                    reason: "the key file must hold 64 hexadecimal digits".into(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ProxyKey::create(path),
            Err(e) => Err(StateError::io(path, e)),
        }
    }

    fn create(path: &Path) -> Result<ProxyKey, StateError> {
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StateError::io(dir, e))?;
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
        let mut file = match file {
            Ok(f) => f,
            // Another proxy created it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return ProxyKey::load_or_create(path)
            }
            Err(e) => return Err(StateError::io(path, e)),
        };
        writeln!(file, "{}", hex(&bytes))
            .and_then(|_| file.sync_all())
            .map_err(|e| StateError::io(path, e))?;
        tracing::info!(path = %path.display(), "created the proxy key");
        Ok(ProxyKey(bytes))
    }

    fn parse(text: &str) -> Option<ProxyKey> {
        if text.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(ProxyKey(out))
    }

    /// HMAC-SHA-256 of `parts` under this key, for the purpose named by `domain` (keys for different uses
    /// never produce the same value).
    pub fn mac(&self, domain: &str, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(domain.as_bytes());
        mac.update(&[0]);
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }

    #[cfg(test)]
    pub fn for_tests(byte: u8) -> ProxyKey {
        ProxyKey([byte; 32])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_created_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let k1 = ProxyKey::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let k2 = ProxyKey::load_or_create(&path).unwrap();
        assert_eq!(k1.mac("x", &[b"a"]), k2.mac("x", &[b"a"]));
        assert_ne!(k1.mac("x", &[b"a"]), k1.mac("y", &[b"a"]));
        std::fs::write(&path, "nonsense").unwrap();
        assert!(ProxyKey::load_or_create(&path).is_err());
    }
}
