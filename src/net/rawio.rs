//! Reads and writes on a plain TCP socket as bare system calls. glibc's `recv` and `send` are cancellation
//! points: in a process with more than one thread (the proxy has its runtime, blocking pool and persistence
//! threads) each call switches the thread's cancellation type on and off around the system call, two atomic
//! read-modify-writes. Profiled under `pgbench -S` that was 4-5% of the proxy's user time, with two reads and two
//! writes a transaction. The proxy never cancels threads, so it asks the kernel directly. Readiness and the
//! wake-ups stay tokio's: the calls run inside `TcpStream::try_io`, which clears the socket's readiness on
//! `EWOULDBLOCK` as tokio's own reads do, and after a short read or write, as tokio also does: a read that
//! left room in the buffer drained the socket, and the pool's liveness check of an idle connection (read
//! readiness still set means data or an end arrived) counts on that.

use std::io;
use std::os::fd::AsRawFd;
use std::task::{ready, Context, Poll};

use tokio::io::{Interest, ReadBuf};
use tokio::net::TcpStream;

/// `recv` into the unfilled part of `buf`, waiting for readiness as `TcpStream::poll_read` does.
pub fn poll_recv(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    let fd = stream.as_raw_fd();
    loop {
        ready!(stream.poll_read_ready(cx))?;
        // SAFETY: the kernel only writes into the unfilled part; `assume_init` below covers exactly the bytes
        // it reported written.
        let unfilled = unsafe { buf.unfilled_mut() };
        let (ptr, len) = (unfilled.as_mut_ptr().cast::<libc::c_void>(), unfilled.len());
        let mut done = 0;
        let outcome = stream.try_io(Interest::READABLE, || {
            // SAFETY: `ptr` and `len` describe memory `buf` owns for the duration of the call; no address out.
            let n = unsafe {
                // Every argument passed as the `long` the kernel's calling convention takes.
                libc::syscall(
                    libc::SYS_recvfrom,
                    libc::c_long::from(fd),
                    ptr,
                    len,
                    NONE,
                    std::ptr::null_mut::<libc::sockaddr>(),
                    std::ptr::null_mut::<libc::socklen_t>(),
                )
            };
            done = result(n)?;
            short(done, len)
        });
        match settle(outcome, done) {
            Some(Ok(n)) => {
                // SAFETY: the kernel initialised the first `n` bytes of the unfilled part.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            Some(Err(e)) => return Poll::Ready(Err(e)),
            None => continue,
        }
    }
}

/// `send` of `data` (without `SIGPIPE`, as the standard library sends), waiting for readiness as
/// `TcpStream::poll_write` does.
pub fn poll_send(stream: &TcpStream, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_write_ready(cx))?;
        if let Some(r) = send_if_ready(stream, data) {
            return Poll::Ready(r);
        }
    }
}

/// `send` of `data` only if the socket is known to be writable, without registering for a wake-up: `None` when
/// it is not (or the call was interrupted), and the caller's next poll waits for readiness as usual. The relay
/// writes a reply the moment it has one this way, instead of going round its poll loop once more to find the
/// socket writable.
pub fn try_send(stream: &TcpStream, data: &[u8]) -> io::Result<Option<usize>> {
    send_if_ready(stream, data).transpose()
}

/// One `send` inside `try_io` (which skips it when the socket is not known writable): the bytes sent, an error,
/// or `None` when readiness is to be waited for again.
fn send_if_ready(stream: &TcpStream, data: &[u8]) -> Option<io::Result<usize>> {
    let fd = stream.as_raw_fd();
    let mut done = 0;
    let outcome = stream.try_io(Interest::WRITABLE, || {
        // SAFETY: the kernel reads `data.len()` bytes from `data`, which outlives the call; no address given.
        let n = unsafe {
            libc::syscall(
                libc::SYS_sendto,
                libc::c_long::from(fd),
                data.as_ptr().cast::<libc::c_void>(),
                data.len(),
                libc::c_long::from(libc::MSG_NOSIGNAL),
                std::ptr::null::<libc::sockaddr>(),
                NONE,
            )
        };
        done = result(n)?;
        short(done, data.len())
    });
    settle(outcome, done)
}

/// A transfer of `n` bytes out of `len` that moved some but not all of them emptied the socket's buffer (read)
/// or filled it (write): reported to `try_io` as `EWOULDBLOCK` so that it clears the readiness, as tokio does.
fn short(n: usize, len: usize) -> io::Result<()> {
    if n > 0 && n < len {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    Ok(())
}

/// What `try_io` gave, as the bytes moved (`done`), an error, or `None` to wait for readiness again (a stale
/// readiness, now cleared, or `EINTR`).
fn settle(outcome: io::Result<()>, done: usize) -> Option<io::Result<usize>> {
    match outcome {
        Ok(()) => Some(Ok(done)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && done > 0 => Some(Ok(done)),
        Err(e) if retry(&e) => None,
        Err(e) => Some(Err(e)),
    }
}

/// No flags; no address length.
const NONE: libc::c_long = 0;

/// A system call's return as a byte count, or the error `errno` holds.
fn result(n: libc::c_long) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// `EWOULDBLOCK` (readiness was stale and is now cleared: wait again) and `EINTR` are tried again.
fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn bytes_sent_arrive_whole_and_a_closed_peer_reads_as_end() {
        let whole = tokio::time::timeout(std::time::Duration::from_secs(30), send_and_receive());
        whole.await.expect("no wake-up lost");
    }

    async fn send_and_receive() {
        let (a, b) = pair().await;
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let writer = async {
            let mut sent = 0;
            while sent < data.len() {
                sent += poll_fn(|cx| poll_send(&a, cx, &data[sent..]))
                    .await
                    .unwrap();
            }
            drop(a);
        };
        let reader = async {
            let mut got = Vec::new();
            let mut space = vec![0u8; 7_000];
            loop {
                let mut buf = ReadBuf::new(&mut space);
                poll_fn(|cx| poll_recv(&b, cx, &mut buf)).await.unwrap();
                if buf.filled().is_empty() {
                    return got;
                }
                got.extend_from_slice(buf.filled());
            }
        };
        let ((), got) = tokio::join!(writer, reader);
        assert!(
            got == data,
            "{} bytes of {} arrived, or in another order",
            got.len(),
            data.len()
        );
    }

    /// The pool's liveness check of an idle backend connection reads the socket's readiness: a read that
    /// drained the socket must leave it not ready, or every idle connection would look closed.
    #[tokio::test]
    async fn a_read_that_drains_the_socket_leaves_it_not_ready() {
        let (a, b) = pair().await;
        poll_fn(|cx| poll_send(&a, cx, b"ten bytes!"))
            .await
            .unwrap();
        let mut space = [0u8; 100];
        let mut buf = ReadBuf::new(&mut space);
        poll_fn(|cx| poll_recv(&b, cx, &mut buf)).await.unwrap();
        assert_eq!(buf.filled(), b"ten bytes!");
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(b.poll_read_ready(&mut cx).is_pending());
        drop(a);
        b.readable().await.unwrap();
        assert!(b.poll_read_ready(&mut cx).is_ready());
    }

    /// The relay's write at once: it sends while the socket is writable, sends nothing (and registers
    /// nothing) once the buffer is full, leaving the readiness cleared for the poll to wait on, and sends again
    /// once the peer has read.
    #[tokio::test]
    async fn try_send_sends_only_while_the_socket_is_writable() {
        let (a, mut b) = pair().await;
        a.writable().await.unwrap();
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0;
        for _ in 0..10_000 {
            match try_send(&a, &chunk).unwrap() {
                Some(n) => sent += n,
                None => break,
            }
        }
        assert!(sent > 0);
        assert_eq!(
            try_send(&a, &chunk).unwrap(),
            None,
            "a full buffer takes nothing"
        );
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(
            a.poll_write_ready(&mut cx).is_pending(),
            "readiness cleared"
        );
        let mut drained = vec![0u8; sent];
        tokio::io::AsyncReadExt::read_exact(&mut b, &mut drained)
            .await
            .unwrap();
        assert!(drained.iter().all(|&x| x == 7));
        a.writable().await.unwrap();
        assert!(try_send(&a, b"more").unwrap().is_some());
    }

    #[tokio::test]
    async fn a_send_to_a_reset_peer_fails() {
        let (a, b) = pair().await;
        // A zero linger makes the close a reset (blocking on drop does not matter to this test).
        #[allow(deprecated)]
        b.set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(b);
        let mut failed = None;
        for _ in 0..100 {
            match poll_fn(|cx| poll_send(&a, cx, b"x")).await {
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
                Err(e) => {
                    failed = Some(e.kind());
                    break;
                }
            }
        }
        let kind = failed.expect("a send to a reset peer fails");
        assert!(
            matches!(
                kind,
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "{kind:?}"
        );
    }
}
