//! Length-delimited framing of the v3 protocol after startup: a one-byte tag, a four-byte big-endian length that
//! counts itself, then the body.
//!
//! The relay never re-encodes a forwarded frame. [`Scanner`] walks a byte stream and tells the caller where each
//! frame starts, so that small frames the proxy must look at are seen whole, while large frames (a 100 MB
//! `CopyData` or `DataRow`) are streamed through in pieces without being buffered.

use super::tag::frontend as fe;
use thiserror::Error;

/// Frames the proxy must see whole are waited for up to this size; larger ones stream through uninspected.
pub const WHOLE_FRAME_MAX: usize = 1 << 20;

/// Tag byte plus length field.
pub const HEADER_LEN: usize = 5;

/// PostgreSQL's `PQ_LARGE_MESSAGE_LIMIT` (1 GB - 1): the largest frame either side may send.
pub const MAX_LARGE_LEN: usize = 0x3fff_ffff;

/// PostgreSQL's `PQ_SMALL_MESSAGE_LIMIT`: the bound for frontend messages that carry no payload worth the name.
pub const MAX_SMALL_LEN: usize = 10_000;

/// Which peer sent the bytes: a client (frontend) or a server (backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    FromClient,
    FromBackend,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid message length {len} for message type '{}'", char::from(*.tag))]
    BadLength { tag: u8, len: u32 },
    #[error("invalid frontend message type {0}")]
    UnknownClientTag(u8),
}

/// The largest total frame size (tag included) allowed for `tag` from `dir`, or an error for a tag a client may
/// not send after startup. Mirrors the limits PostgreSQL's `SocketBackend` applies to clients.
pub fn max_frame_len(tag: u8, dir: Direction) -> Result<usize, FrameError> {
    match dir {
        Direction::FromBackend => Ok(MAX_LARGE_LEN + 1),
        Direction::FromClient => match tag {
            fe::QUERY | fe::FUNCTION_CALL | fe::PARSE | fe::BIND | fe::COPY_DATA | fe::PASSWORD => {
                Ok(MAX_LARGE_LEN + 1)
            }
            fe::CLOSE
            | fe::DESCRIBE
            | fe::EXECUTE
            | fe::FLUSH
            | fe::SYNC
            | fe::TERMINATE
            | fe::COPY_DONE
            | fe::COPY_FAIL => Ok(MAX_SMALL_LEN + 1),
            other => Err(FrameError::UnknownClientTag(other)),
        },
    }
}

/// A frame header: its tag and its total size on the wire (tag and length field included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    pub total: usize,
}

/// Reads and validates the header at the start of `buf`, or `None` when fewer than five bytes are there.
pub fn parse_header(buf: &[u8], dir: Direction) -> Result<Option<Header>, FrameError> {
    let Some(head) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let tag = head[0];
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    let max = max_frame_len(tag, dir)?;
    let total = 1 + len as usize;
    if len < 4 || total > max {
        return Err(FrameError::BadLength { tag, len });
    }
    Ok(Some(Header { tag, total }))
}

/// One step of [`Scanner::next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// A whole frame of `total` bytes starts at the beginning of the buffer.
    Whole(Header),
    /// A frame starts here but only `avail` of its bytes are buffered; it is too large (or of no interest) to
    /// wait for, so the caller forwards those bytes now and the rest arrive as [`Scan::Rest`].
    Head { header: Header, avail: usize },
    /// The next `n` bytes continue a frame already announced by [`Scan::Head`].
    Rest(usize),
    /// Nothing can be decided until at least this many bytes (counted from the buffer start) are buffered.
    NeedMore(usize),
}

/// Walks a byte stream frame by frame. It keeps only the count of bytes still owed by a streamed frame.
#[derive(Debug)]
pub struct Scanner {
    dir: Direction,
    /// Bytes of a streamed frame not yet seen.
    owed: usize,
    /// Frames up to this size are waited for and returned whole; larger ones stream through.
    whole_max: usize,
}

impl Scanner {
    pub fn new(dir: Direction, whole_max: usize) -> Self {
        Scanner {
            dir,
            owed: 0,
            whole_max,
        }
    }

    /// Forgets a [`Scan::Head`] just returned, so the next call reads that frame's header again (the caller has
    /// left the frame's bytes where they were).
    pub fn rewind(&mut self) {
        self.owed = 0;
    }

    /// True between a [`Scan::Head`] and the last [`Scan::Rest`] of that frame.
    pub fn mid_frame(&self) -> bool {
        self.owed > 0
    }

    /// Looks at the start of `buf`; `wait_whole(tag)` says whether a frame of that tag must be seen whole
    /// (when it is no larger than `whole_max`). The caller consumes the bytes the step names before calling again.
    pub fn next(
        &mut self,
        buf: &[u8],
        wait_whole: impl Fn(u8) -> bool,
    ) -> Result<Scan, FrameError> {
        if self.owed > 0 {
            if buf.is_empty() {
                return Ok(Scan::NeedMore(1));
            }
            let n = self.owed.min(buf.len());
            self.owed -= n;
            return Ok(Scan::Rest(n));
        }
        let Some(header) = parse_header(buf, self.dir)? else {
            return Ok(Scan::NeedMore(HEADER_LEN));
        };
        if buf.len() >= header.total {
            return Ok(Scan::Whole(header));
        }
        if header.total <= self.whole_max && wait_whole(header.tag) {
            return Ok(Scan::NeedMore(header.total));
        }
        self.owed = header.total - buf.len();
        Ok(Scan::Head {
            header,
            avail: buf.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::test_frame as frame;

    #[test]
    fn whole_frames_in_one_buffer() {
        let mut buf = frame(b'Q', b"select 1\0");
        buf.extend(frame(b'S', b""));
        let mut s = Scanner::new(Direction::FromClient, 1024);
        let first = s.next(&buf, |_| true).unwrap();
        assert_eq!(
            first,
            Scan::Whole(Header {
                tag: b'Q',
                total: 14
            })
        );
        let second = s.next(&buf[14..], |_| true).unwrap();
        assert_eq!(
            second,
            Scan::Whole(Header {
                tag: b'S',
                total: 5
            })
        );
        assert_eq!(s.next(&buf[19..], |_| true).unwrap(), Scan::NeedMore(5));
    }

    #[test]
    fn large_frames_stream_through() {
        let body = vec![7u8; 100];
        let buf = frame(b'd', &body);
        let mut s = Scanner::new(Direction::FromClient, 16);
        let step = s.next(&buf[..30], |_| true).unwrap();
        assert_eq!(
            step,
            Scan::Head {
                header: Header {
                    tag: b'd',
                    total: 105
                },
                avail: 30
            }
        );
        assert!(s.mid_frame());
        assert_eq!(s.next(&buf[30..60], |_| true).unwrap(), Scan::Rest(30));
        assert_eq!(s.next(&buf[60..], |_| true).unwrap(), Scan::Rest(45));
        assert!(!s.mid_frame());
    }

    #[test]
    fn small_wanted_frames_wait() {
        let buf = frame(b'Z', b"I");
        let mut s = Scanner::new(Direction::FromBackend, 1024);
        assert_eq!(s.next(&buf[..5], |t| t == b'Z').unwrap(), Scan::NeedMore(6));
        let mut s = Scanner::new(Direction::FromBackend, 1024);
        assert!(matches!(
            s.next(&buf[..5], |_| false).unwrap(),
            Scan::Head { .. }
        ));
    }

    #[test]
    fn bad_lengths_and_tags_are_refused() {
        let mut s = Scanner::new(Direction::FromClient, 1024);
        assert_eq!(
            s.next(&[b'Q', 0, 0, 0, 3], |_| true),
            Err(FrameError::BadLength { tag: b'Q', len: 3 })
        );
        assert_eq!(
            s.next(&[b'S', 0, 1, 0, 0], |_| true),
            Err(FrameError::BadLength {
                tag: b'S',
                len: 65536
            })
        );
        assert_eq!(
            s.next(&[b'!', 0, 0, 0, 4], |_| true),
            Err(FrameError::UnknownClientTag(b'!'))
        );
        let mut s = Scanner::new(Direction::FromBackend, 1024);
        assert!(s.next(&[b'D', 0x40, 0, 0, 0], |_| true).is_err());
    }

    /// A cheap stand-in for the fuzz target: arbitrary streams never panic and the steps always make progress.
    #[test]
    fn arbitrary_streams_never_panic() {
        let mut seed = 0x1234_5678_u64;
        for _ in 0..2000 {
            let mut data = vec![0u8; (seed % 64) as usize];
            for b in data.iter_mut() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *b = (seed >> 33) as u8;
            }
            let mut s = Scanner::new(Direction::FromBackend, 32);
            let mut rest = &data[..];
            while let Ok(step) = s.next(rest, |t| t == b'Z') {
                let n = match step {
                    Scan::Whole(h) => h.total,
                    Scan::Head { avail, .. } => avail,
                    Scan::Rest(n) => n,
                    Scan::NeedMore(_) => break,
                };
                assert!(n > 0 && n <= rest.len());
                rest = &rest[n..];
            }
        }
    }
}
