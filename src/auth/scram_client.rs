//! The client side of SCRAM-SHA-256, for logging in to backends. The salted password is cached per backend:
//! PBKDF2 (4096 rounds by default) is the expensive step, and a backend's salt and iteration count for our user
//! do not change between connections, so a burst of new backend connections (pool growth, sessions moving after a
//! cutover) pays it once instead of once per connection.

use std::sync::Mutex;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::scram::{constant_time_eq, ScramError};

type HmacSha256 = Hmac<Sha256>;

/// The GS2 header "n,," in base64: no channel binding, no authzid.
const GS2_BIWS: &str = "biws";
/// Iteration counts above this are refused (a hostile server could make us spin).
const MAX_ITERATIONS: u32 = 1 << 20;

/// A salted password and the (salt, iteration count) it was made with.
struct Salted {
    salt: Vec<u8>,
    iterations: u32,
    key: [u8; 32],
}

/// The salted password for one (salt, iteration count), reused across connections of one backend.
#[derive(Default)]
pub struct SaltedPasswordCache {
    entry: Mutex<Option<Salted>>,
}

impl SaltedPasswordCache {
    fn get(&self, password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
        let mut entry = self.entry.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = entry.as_ref() {
            if e.salt == salt && e.iterations == iterations {
                return e.key;
            }
        }
        let key = hi(password, salt, iterations);
        *entry = Some(Salted {
            salt: salt.to_vec(),
            iterations,
            key,
        });
        key
    }
}

fn mac(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length.
    <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = mac(key);
    m.update(data);
    m.finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA-256 with one output block (RFC 5802's Hi).
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let keyed = mac(password);
    let mut m = keyed.clone();
    m.update(salt);
    m.update(&1u32.to_be_bytes());
    let mut u: [u8; 32] = m.finalize().into_bytes().into();
    let mut out = u;
    for _ in 1..iterations {
        let mut m = keyed.clone();
        m.update(&u);
        u = m.finalize().into_bytes().into();
        for (o, x) in out.iter_mut().zip(u.iter()) {
            *o ^= x;
        }
    }
    out
}

/// One SCRAM-SHA-256 login as a client.
pub struct ScramClient {
    password: Vec<u8>,
    client_first_bare: String,
    nonce: String,
    expected_server_signature: Option<[u8; 32]>,
}

impl ScramClient {
    pub fn new(password: &str) -> ScramClient {
        // PostgreSQL applies SASLprep, and uses the raw bytes when the password is not valid for it.
        let password = match stringprep::saslprep(password) {
            Ok(p) => p.into_owned().into_bytes(),
            Err(_) => password.as_bytes().to_vec(),
        };
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        let nonce = B64.encode(raw);
        ScramClient {
            password,
            client_first_bare: format!("n=,r={nonce}"),
            nonce,
            expected_server_signature: None,
        }
    }

    /// client-first-message.
    pub fn initial(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// Answers server-first-message with client-final-message.
    pub fn respond(
        &mut self,
        server_first: &[u8],
        cache: &SaltedPasswordCache,
    ) -> Result<Vec<u8>, ScramError> {
        let text =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attr in text.split(',') {
            match attr.split_once('=') {
                Some(("r", v)) => nonce = Some(v),
                Some(("s", v)) => salt = B64.decode(v).ok(),
                Some(("i", v)) => iterations = v.parse::<u32>().ok(),
                _ => {}
            }
        }
        let nonce = nonce
            .filter(|n| n.starts_with(&self.nonce) && n.len() > self.nonce.len())
            .ok_or(ScramError::Nonce)?;
        let salt = salt.ok_or(ScramError::Malformed("bad salt"))?;
        let iterations = iterations
            .filter(|i| (1..=MAX_ITERATIONS).contains(i))
            .ok_or(ScramError::Malformed("bad iteration count"))?;
        let salted = cache.get(&self.password, &salt, iterations);
        let without_proof = format!("c={GS2_BIWS},r={nonce}");
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature.iter())
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = hmac(&salted, b"Server Key");
        self.expected_server_signature = Some(hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks server-final-message: the server proves it knew the verifier.
    pub fn verify(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let text =
            std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let given = text
            .strip_prefix("v=")
            .and_then(|v| B64.decode(v.split(',').next().unwrap_or(v)).ok())
            .ok_or(ScramError::Proof)?;
        match &self.expected_server_signature {
            Some(expected) if constant_time_eq(&given, expected) => Ok(()),
            _ => Err(ScramError::Proof),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::scram::{ScramExchange, ScramVerifier};

    fn login(
        verifier: &ScramVerifier,
        password: &str,
        cache: &SaltedPasswordCache,
    ) -> Result<(), ScramError> {
        let mut client = ScramClient::new(password);
        let (exchange, server_first) = ScramExchange::start(
            verifier.clone(),
            &client.initial(),
            crate::auth::scram::Binding::Plain {
                plus_offered: false,
            },
        )?;
        let client_final = client.respond(server_first.as_bytes(), cache)?;
        let server_final = exchange.finish(&client_final)?;
        client.verify(server_final.as_bytes())
    }

    #[test]
    fn logs_in_against_the_server_side_and_reuses_the_salted_password() {
        let verifier = ScramVerifier::from_password("s3cret").unwrap();
        let cache = SaltedPasswordCache::default();
        login(&verifier, "s3cret", &cache).unwrap();
        assert!(cache.entry.lock().unwrap().is_some());
        login(&verifier, "s3cret", &cache).unwrap();
        assert_eq!(
            login(&verifier, "wrong", &SaltedPasswordCache::default()),
            Err(ScramError::Proof)
        );
    }

    #[test]
    fn refuses_hostile_server_messages() {
        let cache = SaltedPasswordCache::default();
        let mut c = ScramClient::new("x");
        assert_eq!(
            c.respond(b"r=other,s=AAAA,i=4096", &cache),
            Err(ScramError::Nonce)
        );
        let first = format!("r={}abc,s=AAAA,i=4000000000", c.nonce);
        assert!(c.respond(first.as_bytes(), &cache).is_err());
        assert!(c.verify(b"v=AAAA").is_err());
    }
}

#[cfg(test)]
mod timing {
    #[test]
    #[ignore = "a measurement, not a test: cargo test --release -- --ignored hi_cost --nocapture"]
    fn hi_cost() {
        let t = std::time::Instant::now();
        for _ in 0..20 {
            std::hint::black_box(super::hi(b"password", b"saltsaltsaltsalt", 4096));
        }
        eprintln!(
            "PBKDF2-HMAC-SHA-256, 4096 rounds: {:?} each",
            t.elapsed() / 20
        );
    }
}
