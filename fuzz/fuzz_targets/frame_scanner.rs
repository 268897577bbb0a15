//! The relay's frame scanner over arbitrary byte streams cut at arbitrary points: it never panics, always makes
//! progress, and never claims more bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgtenant::protocol::frame::{Direction, Scan, Scanner};

fuzz_target!(|data: &[u8]| {
    let Some((&control, stream)) = data.split_first() else { return };
    let dir = if control & 1 == 0 { Direction::FromClient } else { Direction::FromBackend };
    let chunk = 1 + (control as usize >> 1);
    let mut scanner = Scanner::new(dir, 64);
    let mut buf: Vec<u8> = Vec::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let step = match scanner.next(&buf, |t| t == b'Z' || t == b'Q') {
                Ok(s) => s,
                Err(_) => return,
            };
            let n = match step {
                Scan::Whole(h) => h.total,
                Scan::Head { avail, .. } => avail,
                Scan::Rest(n) => n,
                Scan::NeedMore(_) => break,
            };
            assert!(n > 0 && n <= buf.len());
            buf.drain(..n);
        }
    }
});
