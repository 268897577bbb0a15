//! The server side of SCRAM-SHA-256 (RFC 5802/7677) as PostgreSQL speaks it, without I/O, with
//! SCRAM-SHA-256-PLUS (`tls-server-end-point` channel binding) over TLS.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

/// Longest SASL message we accept from a client.
pub const MAX_SASL_MESSAGE: usize = 2048;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("invalid SCRAM secret")]
    Secret,
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("SCRAM nonce mismatch")]
    Nonce,
    #[error("password authentication failed")]
    Proof,
}

/// A stored verifier: what `pg_authid.rolpassword` holds for a SCRAM password.
#[derive(Clone)]
pub struct ScramVerifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramVerifier(..)")
    }
}

impl ScramVerifier {
    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(secret: &str) -> Result<ScramVerifier, ScramError> {
        let rest = secret
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(ScramError::Secret)?;
        let (params, keys) = rest.split_once('$').ok_or(ScramError::Secret)?;
        let (iter, salt) = params.split_once(':').ok_or(ScramError::Secret)?;
        let (stored, server) = keys.split_once(':').ok_or(ScramError::Secret)?;
        let key = |s: &str| -> Result<[u8; 32], ScramError> {
            B64.decode(s)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or(ScramError::Secret)
        };
        let iterations: u32 = iter.parse().map_err(|_| ScramError::Secret)?;
        if iterations == 0 {
            return Err(ScramError::Secret);
        }
        Ok(ScramVerifier {
            iterations,
            salt: B64.decode(salt).map_err(|_| ScramError::Secret)?,
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }

    /// Derives a verifier from a plain password with a fresh random salt.
    pub fn from_password(password: &str) -> Result<ScramVerifier, ScramError> {
        ScramVerifier::parse(&postgres_protocol::password::scram_sha_256(
            password.as_bytes(),
        ))
    }

    /// A verifier no proof can match, used for unknown users so that they take the same path as wrong
    /// passwords. Its salt is `salt` (derive it from the user name with a secret key: a known user keeps its
    /// salt from one attempt to the next, so an unknown one must too, or the salt tells them apart).
    pub fn impossible(salt: &[u8]) -> ScramVerifier {
        let mut rng = rand::thread_rng();
        let mut v = ScramVerifier {
            iterations: 4096,
            salt: salt.to_vec(),
            stored_key: [0; 32],
            server_key: [0; 32],
        };
        rng.fill_bytes(&mut v.stored_key);
        rng.fill_bytes(&mut v.server_key);
        v
    }
}

/// The channel binding of an exchange, as the client chose its mechanism.
#[derive(Debug, Clone, Copy)]
pub enum Binding<'a> {
    /// SCRAM-SHA-256-PLUS: the `tls-server-end-point` data of our certificate.
    Plus(&'a [u8]),
    /// SCRAM-SHA-256; `plus_offered` says whether we offered the PLUS variant (then a client saying it could
    /// bind but thinks we cannot, flag `y`, was downgraded by someone in the middle).
    Plain { plus_offered: bool },
}

/// The exchange after the client-first message.
#[derive(Debug)]
pub struct ScramExchange {
    verifier: ScramVerifier,
    /// What `c=` must hold, decoded: the GS2 header plus, with channel binding, the binding data.
    binding_input: Vec<u8>,
    nonce: String,
    client_first_bare: String,
    server_first: String,
}

fn text(msg: &[u8]) -> Result<&str, ScramError> {
    if msg.len() > MAX_SASL_MESSAGE {
        return Err(ScramError::Malformed("message too long"));
    }
    std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))
}

impl ScramExchange {
    /// Handles client-first-message; returns the exchange and the server-first-message to send.
    pub fn start(
        verifier: ScramVerifier,
        client_first: &[u8],
        binding: Binding<'_>,
    ) -> Result<(ScramExchange, String), ScramError> {
        let msg = text(client_first)?;
        let (flag, rest) = msg
            .split_once(',')
            .ok_or(ScramError::Malformed("no GS2 header"))?;
        let channel: &[u8] = match (flag, binding) {
            ("p=tls-server-end-point", Binding::Plus(data)) => data,
            ("n", Binding::Plain { .. }) => &[],
            (
                "y",
                Binding::Plain {
                    plus_offered: false,
                },
            ) => &[],
            _ if flag == "n" || flag == "y" || flag.starts_with("p=") => {
                return Err(ScramError::ChannelBinding)
            }
            _ => return Err(ScramError::Malformed("bad GS2 flag")),
        };
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(ScramError::Malformed("no GS2 header"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Malformed("authzid not supported"));
        }
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
            .ok_or(ScramError::Malformed("missing nonce"))?;
        if bare.starts_with("m=") {
            return Err(ScramError::Malformed("extensions not supported"));
        }
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        let mut binding_input = format!("{flag},,").into_bytes();
        binding_input.extend_from_slice(channel);
        let exchange = ScramExchange {
            verifier,
            binding_input,
            nonce,
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
        };
        Ok((exchange, server_first))
    }

    /// Handles client-final-message; on success returns the server-final-message to send.
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        let msg = text(client_final)?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut attrs = without_proof.split(',');
        let binding = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(ScramError::Malformed("no c="))?;
        let given = B64.decode(binding).unwrap_or_default();
        if !constant_time_eq(&given, &self.binding_input) {
            return Err(ScramError::ChannelBinding);
        }
        if attrs.next().and_then(|a| a.strip_prefix("r=")) != Some(self.nonce.as_str()) {
            return Err(ScramError::Nonce);
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or(ScramError::Malformed("bad proof"))?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ client_signature[i];
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&stored, &self.verifier.stored_key) {
            return Err(ScramError::Proof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(data);
    mac.finalize().into_bytes().into()
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    const PLAIN: Binding<'static> = Binding::Plain {
        plus_offered: false,
    };

    fn run(verifier: ScramVerifier, password: &str) -> Result<(), ScramError> {
        run_with(verifier, password, ChannelBinding::unrequested(), PLAIN)
    }

    fn run_with(
        verifier: ScramVerifier,
        password: &str,
        client_binding: ChannelBinding,
        binding: Binding<'_>,
    ) -> Result<(), ScramError> {
        let mut client = ScramSha256::new(password.as_bytes(), client_binding);
        let (exchange, server_first) = ScramExchange::start(verifier, client.message(), binding)?;
        client
            .update(server_first.as_bytes())
            .map_err(|_| ScramError::Proof)?;
        let server_final = exchange.finish(client.message())?;
        client
            .finish(server_final.as_bytes())
            .map_err(|_| ScramError::Proof)
    }

    #[test]
    fn real_client_authenticates() {
        let v = ScramVerifier::from_password("secret").unwrap();
        run(v.clone(), "secret").unwrap();
        assert_eq!(run(v, "wrong"), Err(ScramError::Proof));
        assert_eq!(
            run(ScramVerifier::impossible(&[1; 16]), "secret"),
            Err(ScramError::Proof)
        );
    }

    #[test]
    fn channel_binding_is_checked_and_downgrades_are_refused() {
        let v = ScramVerifier::from_password("secret").unwrap();
        let data = [7u8; 32];
        // A client binding to our certificate's hash gets in.
        let plus = ChannelBinding::tls_server_end_point(data.to_vec());
        run_with(v.clone(), "secret", plus, Binding::Plus(&data)).unwrap();
        // Bound to another certificate (someone in the middle): refused.
        let other = ChannelBinding::tls_server_end_point(vec![8u8; 32]);
        assert_eq!(
            run_with(v.clone(), "secret", other, Binding::Plus(&data)),
            Err(ScramError::ChannelBinding)
        );
        // "I could bind, but you cannot" while we offered PLUS: a downgrade.
        let downgraded = ScramExchange::start(
            v.clone(),
            b"y,,n=,r=abc",
            Binding::Plain { plus_offered: true },
        );
        assert!(matches!(downgraded, Err(ScramError::ChannelBinding)));
        assert!(ScramExchange::start(v.clone(), b"y,,n=,r=abc", PLAIN).is_ok());
        // Choosing PLUS without binding data, or binding while choosing the plain mechanism: refused.
        assert!(ScramExchange::start(v.clone(), b"n,,n=,r=abc", Binding::Plus(&data)).is_err());
        assert!(ScramExchange::start(v, b"p=tls-server-end-point,,n=,r=abc", PLAIN).is_err());
    }

    #[test]
    fn malformed_messages_are_refused() {
        let v = ScramVerifier::from_password("x").unwrap();
        assert!(
            ScramExchange::start(v.clone(), b"p=tls-server-end-point,,n=,r=abc", PLAIN).is_err()
        );
        assert!(ScramExchange::start(v.clone(), b"n,,n=", PLAIN).is_err());
        assert!(ScramExchange::start(v.clone(), b"", PLAIN).is_err());
        let (ex, _) = ScramExchange::start(v, b"n,,n=,r=abc", PLAIN).unwrap();
        assert!(ex.finish(b"c=biws,r=abc,p=AAAA").is_err());
        assert!(ScramVerifier::parse("md5abc").is_err());
    }
}
