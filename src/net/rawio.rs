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
        let len = unfilled.len();
        let mut done = 0;
        let outcome = stream.try_io(Interest::READABLE, || {
            done = recv_raw(fd, unfilled, NONE)?;
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

/// `recv` into the spare capacity of `buf` (1 KiB is made free in a full one) for a task that reads this socket in a
/// loop, as the relay does. A read that finds nothing registers the task's waker with tokio, which keeps it
/// until the socket's next read readiness, and sets that readiness before it takes the waker. On a
/// single-threaded runtime, where the I/O driver's turns (readiness set, waker taken) and the tasks' polls take
/// turns on one thread, a readiness still clear therefore means the registration stands: with `armed` (given
/// only there), while it names this task's waker, the answer is `Pending` after one atomic load, where
/// `poll_read_ready` takes the socket's waiter lock and the task's budget again (the relay polls the side it is
/// not waiting for on every wake-up). On several threads the driver can take the waker after the task has read
/// the readiness away and registered again, which leaves it registered with nothing; there every read
/// registers. Anything else resets `armed`: a read that found readiness (tokio took the waker), another task (a
/// pooled connection changes hands; its waker is another), a read outside this function (`Stream`'s
/// `poll_read`), a liveness peek that cleared the readiness. Bypassing the budget is bounded: only the first
/// read after a `Pending` does; a `Pending` that was tokio's budget telling the task to yield registered
/// nothing and arms nothing. Counted with `benches/instructions.sh`.
pub fn poll_recv_armed(
    stream: &TcpStream,
    mut armed: Option<&mut (usize, usize)>,
    cx: &mut Context<'_>,
    buf: &mut bytes::BytesMut,
) -> Poll<io::Result<usize>> {
    let me = (
        cx.waker().data() as usize,
        std::ptr::from_ref(cx.waker().vtable()) as usize,
    );
    // (A full buffer would read 0 bytes, which is the end of the stream; the relay keeps room of its own.)
    if buf.capacity() == buf.len() {
        buf.reserve(READ_ROOM);
    }
    if let Some(a) = armed.as_deref_mut() {
        if *a == me {
            let mut ran = false;
            let mut done = 0;
            let outcome = stream.try_io(Interest::READABLE, || {
                ran = true;
                recv_spare(stream, buf, &mut done)
            });
            if !ran {
                return Poll::Pending;
            }
            *a = (0, 0);
            if let Some(r) = take_read(outcome, done, buf) {
                return Poll::Ready(r);
            }
        }
        *a = (0, 0);
    }
    loop {
        if stream.poll_read_ready(cx)?.is_pending() {
            if let Some(a) = armed {
                arm_if_registered(a, me);
            }
            return Poll::Pending;
        }
        let mut done = 0;
        let outcome = stream.try_io(Interest::READABLE, || recv_spare(stream, buf, &mut done));
        if let Some(r) = take_read(outcome, done, buf) {
            return Poll::Ready(r);
        }
    }
}

/// Whether an idle socket has nothing to read: its read readiness is clear (one atomic load; nothing is
/// registered, so a waker some task left stays), or it is set but a peek finds nothing, which clears it
/// (readiness is a hint: the reactor can take the event of a reply's last bytes after the read that emptied
/// the socket). Data or an end to read, or an error: `false`. The second: whether the peek ran, which a
/// caller holding an `armed` (see [`poll_recv_armed`]) must take as the end of it: the readiness the peek
/// cleared may have come with an event that took the registered waker.
pub fn nothing_to_read(stream: &TcpStream) -> (bool, bool) {
    let fd = stream.as_raw_fd();
    let mut ran = false;
    let peeked = stream.try_io(Interest::READABLE, || {
        ran = true;
        let mut byte = [std::mem::MaybeUninit::new(0u8)];
        recv_raw(
            fd,
            &mut byte,
            libc::c_long::from(libc::MSG_PEEK | libc::MSG_DONTWAIT),
        )
    });
    (
        matches!(peeked, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
        ran,
    )
}

/// After `poll_read_ready` said `Pending`: arms unless that was tokio's budget telling the task to yield, which
/// comes before any registration (tokio wakes the task at once) and is no registration to count on. The budget
/// then reads empty; after a registration it is as before. Out of line, to keep the thread-local read out of
/// the read's own code.
#[inline(never)]
fn arm_if_registered(armed: &mut (usize, usize), me: (usize, usize)) {
    if tokio::task::coop::has_budget_remaining() {
        *armed = me;
    }
}

/// Free space `poll_recv_armed` makes in a full buffer before a read (the relay keeps room of its own).
const READ_ROOM: usize = 1024;

/// One `recv` into `buf`'s spare capacity; `done` gets the bytes read.
fn recv_spare(stream: &TcpStream, buf: &mut bytes::BytesMut, done: &mut usize) -> io::Result<()> {
    let spare = buf.spare_capacity_mut();
    let len = spare.len();
    *done = recv_raw(stream.as_raw_fd(), spare, NONE)?;
    short(*done, len)
}

/// One `recv` system call into `space` with `flags`: how many bytes the kernel wrote at its start.
fn recv_raw(
    fd: std::os::fd::RawFd,
    space: &mut [std::mem::MaybeUninit<u8>],
    flags: libc::c_long,
) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `space.len()` bytes into `space`, borrowed for the call; no address
    // out. Every argument is passed as the `long` the kernel's calling convention takes.
    let n = unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            libc::c_long::from(fd),
            space.as_mut_ptr().cast::<libc::c_void>(),
            space.len(),
            flags,
            std::ptr::null_mut::<libc::sockaddr>(),
            std::ptr::null_mut::<libc::socklen_t>(),
        )
    };
    result(n)
}

/// What a `recv_spare` inside `try_io` gave: the bytes now part of `buf`, an error, or `None` to wait again.
fn take_read(
    outcome: io::Result<()>,
    done: usize,
    buf: &mut bytes::BytesMut,
) -> Option<io::Result<usize>> {
    let r = settle(outcome, done)?;
    if let Ok(n) = r {
        // SAFETY: the kernel initialised the `n` bytes after the buffer's length.
        unsafe { buf.set_len(buf.len() + n) };
    }
    Some(r)
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

    /// What a reading task of its own got, which must not take long: a timeout around the read in the same
    /// task would poll it when it fires, and so hide a lost wake-up.
    async fn woken(reader: tokio::task::JoinHandle<Vec<u8>>) -> Vec<u8> {
        tokio::time::timeout(std::time::Duration::from_secs(30), reader)
            .await
            .expect("the reader is woken by what arrives")
            .unwrap()
    }

    /// `poll_recv_armed` in a loop, as the relay reads: every byte arrives, whatever the timing, and the
    /// probe between wake-ups loses none.
    async fn read_armed(stream: &TcpStream, armed: &mut (usize, usize), want: usize) -> Vec<u8> {
        let mut got = bytes::BytesMut::new();
        while got.len() < want {
            let n = poll_fn(|cx| poll_recv_armed(stream, Some(&mut *armed), cx, &mut got))
                .await
                .unwrap();
            assert!(n > 0, "an end before {want} bytes");
        }
        got.to_vec()
    }

    #[tokio::test]
    async fn an_armed_read_is_woken_by_what_arrives_later() {
        let (a, b) = pair().await;
        let mut armed = (0, 0);
        let reader = tokio::spawn(async move {
            let got = read_armed(&b, &mut armed, 3 * 1000).await;
            // One more read finds nothing and leaves this task registered, as a session that gives its
            // connection back between two transactions does.
            let mut more = bytes::BytesMut::new();
            poll_fn(|cx| {
                Poll::Ready(poll_recv_armed(&b, Some(&mut armed), cx, &mut more).is_pending())
            })
            .await;
            assert_ne!(armed, (0, 0));
            (got, armed, b)
        });
        for chunk in 0..3u8 {
            // Each chunk after the reader has gone back to sleep on its registration.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            poll_fn(|cx| poll_send(&a, cx, &[chunk; 1000]))
                .await
                .unwrap();
        }
        let (got, armed, b) = tokio::time::timeout(std::time::Duration::from_secs(30), reader)
            .await
            .expect("no wake-up lost")
            .unwrap();
        assert_eq!(got.len(), 3000);
        assert!(got[..1000].iter().all(|&x| x == 0) && got[2000..].iter().all(|&x| x == 2));
        // The socket changes hands (a pooled connection does): the new task's waker is another, so its first
        // read registers again instead of trusting the old task's registration.
        let mut armed2 = armed;
        let reader = tokio::spawn(async move { read_armed(&b, &mut armed2, 5).await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        poll_fn(|cx| poll_send(&a, cx, b"later")).await.unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(30), reader)
            .await
            .expect("the new owner is woken")
            .unwrap();
        assert_eq!(got, b"later");
    }

    /// A task out of tokio's budget is told to yield before any registration: a read then arms nothing, or
    /// its next read would trust a registration that was never made and sleep for good (seen as a relay that
    /// stopped in the middle of a large COPY).
    #[tokio::test]
    async fn a_read_told_to_yield_arms_nothing() {
        let (a, b) = pair().await;
        let mut armed = (0, 0);
        let mut buf = bytes::BytesMut::new();
        poll_fn(|cx| {
            while let Poll::Ready(spent) = tokio::task::coop::poll_proceed(cx) {
                spent.made_progress();
            }
            assert!(poll_recv_armed(&b, Some(&mut armed), cx, &mut buf).is_pending());
            Poll::Ready(())
        })
        .await;
        assert_eq!(armed, (0, 0), "nothing registered, nothing armed");
        let reader = tokio::spawn(async move { read_armed(&b, &mut armed, 1).await });
        poll_fn(|cx| poll_send(&a, cx, b"x")).await.unwrap();
        assert_eq!(woken(reader).await, b"x");
    }

    /// The pool's liveness check of an idle connection whose readiness is stale (set by an event that took
    /// the registered waker, with nothing left to read): its peek clears the readiness, so the connection's
    /// `Armed` must go too, or the next read of the session that takes it back trusts a registration that is
    /// gone (found by review: a hang).
    #[tokio::test]
    async fn a_liveness_peek_that_clears_readiness_disarms() {
        let (a, b) = pair().await;
        // One task does it all, as the session that gives its connection back and takes it again.
        let reader = tokio::spawn(async move {
            let mut s = crate::net::Stream::plain(b);
            let mut buf = bytes::BytesMut::new();
            poll_fn(|cx| Poll::Ready(s.poll_read_bytes(cx, &mut buf, true).is_pending())).await;
            poll_fn(|cx| poll_send(&a, cx, b"x")).await.unwrap();
            // The reactor takes the event (and the waker), then the byte goes behind tokio's back.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let crate::net::Stream::Tcp(tcp, _) = &s else {
                unreachable!()
            };
            let mut byte = [0u8; 1];
            // SAFETY: one byte into `byte`.
            let n = unsafe { libc::recv(tcp.as_raw_fd(), byte.as_mut_ptr().cast(), 1, 0) };
            assert_eq!(n, 1);
            assert!(s.nothing_to_read(), "nothing left to read");
            poll_fn(|cx| poll_send(&a, cx, b"y")).await.unwrap();
            while buf.is_empty() {
                let n = poll_fn(|cx| s.poll_read_bytes(cx, &mut buf, true))
                    .await
                    .unwrap();
                assert!(n > 0);
            }
            buf.to_vec()
        });
        assert_eq!(woken(reader).await, b"y");
    }

    /// A read through `Stream`'s `poll_read` between two of the relay's (a backend round trip of the proxy's
    /// own) takes the wake-up the relay's registration was waiting for: it disarms, and the relay's next read
    /// registers again.
    #[tokio::test]
    async fn a_read_outside_the_relay_disarms_it() {
        use tokio::io::AsyncReadExt;
        let (a, b) = pair().await;
        let mut s = crate::net::Stream::plain(b);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut buf = bytes::BytesMut::new();
        assert!(s.poll_read_bytes(&mut cx, &mut buf, true).is_pending());
        let crate::net::Stream::Tcp(_, armed) = &s else {
            unreachable!()
        };
        assert_ne!(armed.0, (0, 0), "a read that found nothing arms");
        poll_fn(|cx| poll_send(&a, cx, b"own")).await.unwrap();
        let mut own = [0u8; 3];
        s.read_exact(&mut own).await.unwrap();
        let crate::net::Stream::Tcp(_, armed) = &s else {
            unreachable!()
        };
        assert_eq!(armed.0, (0, 0), "disarmed by the other read");
        let reader = tokio::spawn(async move {
            let crate::net::Stream::Tcp(tcp, armed) = &mut s else {
                unreachable!()
            };
            read_armed(tcp, &mut armed.0, 4).await
        });
        poll_fn(|cx| poll_send(&a, cx, b"next")).await.unwrap();
        assert_eq!(woken(reader).await, b"next");
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
