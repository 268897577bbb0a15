//! The admin request parser on arbitrary lines: a request or a refusal with a stable code, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgtenant::admin::protocol::{err, parse};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok((request, _token)) => {
            let _ = request.command();
        }
        Err(e) => {
            assert!(!e.code.is_empty());
            let _ = err(&e);
        }
    }
});
