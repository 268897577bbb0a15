//! The pre-protocol packet parser and the `options` splitter on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgtenant::protocol::startup::{join_options, packet_len, parse, split_options, take_setting, StartupPacket};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(len)) = packet_len(data) {
        assert!((8..=10_000).contains(&len));
    }
    if let Ok(StartupPacket::Startup(m)) = parse(data) {
        if let Some(options) = m.get("options") {
            let mut args = split_options(options);
            let _ = take_setting(&mut args, "pgtenant.tenant");
            // Joining and splitting again gives the same arguments.
            assert_eq!(split_options(&join_options(&args)), args);
        }
    }
});
