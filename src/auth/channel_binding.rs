//! `tls-server-end-point` channel binding (RFC 5929), as SCRAM-SHA-256-PLUS uses it: a hash of the server's
//! certificate, with the hash function of the certificate's signature algorithm (SHA-256 for MD5 and SHA-1).
//! A client that binds to it knows no machine in the middle terminated its TLS, even with a password sent.

use sha2::{Digest, Sha256, Sha384, Sha512};

/// OIDs (DER content bytes) of signature algorithms whose hash is SHA-384 or SHA-512.
const SHA384_OIDS: &[&[u8]] = &[
    &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c], // sha384WithRSAEncryption
    &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],       // ecdsa-with-SHA384
];
const SHA512_OIDS: &[&[u8]] = &[
    &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d], // sha512WithRSAEncryption
    &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],       // ecdsa-with-SHA512
];
/// Ed25519/Ed448 have no hash of their own; RFC 5929 defines no binding for them (libpq refuses too).
const NO_HASH_OIDS: &[&[u8]] = &[&[0x2b, 0x65, 0x70], &[0x2b, 0x65, 0x71]];

/// One DER element at the start of `b`: (tag, content, rest).
fn element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)?;
    let (len, head) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*b.get(2 + i)?);
        }
        (len, 2 + n)
    };
    let content = b.get(head..head.checked_add(len)?)?;
    Some((tag, content, &b[head + len..]))
}

/// The OID of the certificate's (outer) signature algorithm.
fn signature_oid(cert: &[u8]) -> Option<&[u8]> {
    let (_, certificate, _) = element(cert)?;
    let (_, _tbs, rest) = element(certificate)?;
    let (_, algorithm, _) = element(rest)?;
    let (tag, oid, _) = element(algorithm)?;
    (tag == 0x06).then_some(oid)
}

/// The channel-binding data for a certificate (DER); `None` when it cannot be bound to.
pub fn tls_server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    let oid = signature_oid(cert)?;
    if NO_HASH_OIDS.contains(&oid) {
        return None;
    }
    Some(if SHA384_OIDS.contains(&oid) {
        Sha384::digest(cert).to_vec()
    } else if SHA512_OIDS.contains(&oid) {
        Sha512::digest(cert).to_vec()
    } else {
        Sha256::digest(cert).to_vec()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_follows_the_signature_algorithm() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let der = cert.cert.der().to_vec();
        // rcgen signs with ECDSA P-256 / SHA-256 by default.
        assert_eq!(
            signature_oid(&der),
            Some(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02][..])
        );
        assert_eq!(
            tls_server_end_point(&der),
            Some(Sha256::digest(&der).to_vec())
        );
        assert_eq!(tls_server_end_point(b"\x30\x03\x02\x01\x00"), None);
        assert_eq!(tls_server_end_point(b""), None);
    }
}
