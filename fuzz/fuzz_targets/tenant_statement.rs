//! The `SET pgtenant.tenant` recogniser on arbitrary query text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgtenant::protocol::sql::{mentions_pgtenant, recognise, Recognised};

fuzz_target!(|data: &[u8]| {
    let r = recognise(data);
    if !mentions_pgtenant(data) {
        assert_eq!(r, Recognised::Pass);
    }
});
