//! Which pgtenant-named prepared statements one backend connection holds (transaction pool mode), with a least
//! recently used bound like PgBouncer's `max_prepared_statements`.
//!
//! Statements are named after a digest of what defines them (text, parameter types, name-resolution settings),
//! so clients that prepare the same statement share one server statement, and two clients' statements with the
//! same client-side name can never collide.

use std::collections::HashMap;

/// A statement's identity: the first 16 bytes of its SHA-256 digest.
pub type StatementId = u128;

/// Length of a server-side statement name: `pgtenant_` and 32 hex digits.
pub const SERVER_NAME_LEN: usize = 9 + 32;

/// The name a statement has on every backend connection.
pub fn server_name(id: StatementId) -> [u8; SERVER_NAME_LEN] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; SERVER_NAME_LEN];
    out[..9].copy_from_slice(b"pgtenant_");
    for (i, b) in id.to_be_bytes().iter().enumerate() {
        out[9 + 2 * i] = HEX[usize::from(b >> 4)];
        out[10 + 2 * i] = HEX[usize::from(b & 15)];
    }
    out
}

#[derive(Default)]
pub struct ServerStatements {
    /// Statement id -> last use.
    used: HashMap<StatementId, u64>,
    tick: u64,
    /// A client prepared the unnamed statement here (the next session closes it before anything else).
    pub unnamed: bool,
}

impl ServerStatements {
    /// Whether the connection has `id`; a hit counts as a use.
    pub fn touch(&mut self, id: StatementId) -> bool {
        self.tick += 1;
        match self.used.get_mut(&id) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records `id` as prepared. When that makes more than `limit`, the least recently used statement is returned:
    /// the caller closes it on the server.
    pub fn insert(&mut self, id: StatementId, limit: usize) -> Option<StatementId> {
        self.tick += 1;
        let evict = if self.used.len() >= limit.max(1) && !self.used.contains_key(&id) {
            let oldest = self.used.iter().min_by_key(|(_, t)| **t).map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.used.remove(&k);
            }
            oldest
        } else {
            None
        };
        self.used.insert(id, self.tick);
        evict
    }

    /// Records `id` as present again (an eviction the server skipped after an error).
    pub fn restore(&mut self, id: StatementId) {
        self.used.insert(id, 0);
    }

    pub fn remove(&mut self, id: StatementId) {
        self.used.remove(&id);
    }

    /// The server dropped all its prepared statements (DISCARD ALL, DEALLOCATE ALL, a reset).
    pub fn clear(&mut self) {
        self.used.clear();
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_fixed_width_hex() {
        let n = server_name(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        assert_eq!(&n[..], b"pgtenant_0123456789abcdef0011223344556677");
    }

    #[test]
    fn least_recently_used_is_evicted() {
        let mut s = ServerStatements::default();
        assert_eq!(s.insert(1, 2), None);
        assert_eq!(s.insert(2, 2), None);
        assert!(s.touch(1));
        assert_eq!(s.insert(3, 2), Some(2));
        assert!(s.touch(1) && s.touch(3) && !s.touch(2));
        assert_eq!(
            s.insert(3, 2),
            None,
            "re-inserting a present id evicts nothing"
        );
        s.clear();
        assert!(s.is_empty());
    }
}
