//! The admin request parser on arbitrary lines: a request or a refusal with a stable code, never a panic; a
//! request that parses encodes back to one that parses the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgtenant::admin::reply::Response;
use pgtenant::admin::request::parse;

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok((request, _token)) => {
            let line = request.to_json().to_string();
            let (again, _) = parse(line.as_bytes()).expect("an encoded request parses");
            assert_eq!(again, request);
        }
        Err(e) => {
            assert!(!e.code.as_str().is_empty());
            let _ = Response::refusal(e);
        }
    }
});
