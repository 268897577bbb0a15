//! The SCRAM server exchange on arbitrary client messages: refusals, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgtenant::auth::scram::{ScramExchange, ScramVerifier};

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0xff).unwrap_or(data.len());
    let (first, last) = data.split_at(split);
    let verifier = ScramVerifier::impossible();
    if let Ok((exchange, _)) = ScramExchange::start(verifier, first) {
        assert!(exchange.finish(last.get(1..).unwrap_or_default()).is_err());
    }
});
