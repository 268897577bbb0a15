//! The floor of a relay's CPU per transaction: two bare TCP relays with no protocol logic at all, measured by
//! `benches/cpu_split.sh floor-tokio|floor-epoll` beside pgtenant and PgBouncer. `tokio` runs each connection as
//! a task on a current-thread runtime, as pgtenant does, with `copy_bidirectional`; `epoll` is one thread on a
//! level-triggered epoll loop, one `recv` and one `send` per ready socket, as a libevent proxy does. What
//! separates the two is the cost of running connections as tasks; what separates pgtenant from `tokio` is
//! pgtenant's own work. A measuring tool: it trusts its peers (a slow reader stalls the epoll loop).
//!
//!   cargo run --release --example relay_floor -- tokio|epoll LISTEN_ADDR BACKEND_ADDR

use std::collections::HashMap;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, listen, backend] = args.as_slice() else {
        return Err(io::Error::other(
            "usage: relay_floor tokio|epoll LISTEN BACKEND",
        ));
    };
    match mode.as_str() {
        "tokio" => tokio_relay(listen, backend),
        "epoll" => epoll_relay(listen, backend),
        _ => Err(io::Error::other("mode: tokio or epoll")),
    }
}

fn tokio_relay(listen: &str, backend: &str) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        loop {
            let (mut client, _) = listener.accept().await?;
            let backend = backend.to_owned();
            tokio::spawn(async move {
                let mut server = tokio::net::TcpStream::connect(&backend).await?;
                client.set_nodelay(true)?;
                server.set_nodelay(true)?;
                tokio::io::copy_bidirectional(&mut client, &mut server).await?;
                Ok::<_, io::Error>(())
            });
        }
    })
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

fn epoll_relay(listen: &str, backend: &str) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    // SAFETY: plain system calls on descriptors this function owns.
    let ep = check(unsafe { libc::epoll_create1(0) })?;
    let watch = |fd: RawFd| {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: fd as u64,
        };
        // SAFETY: `ev` outlives the call.
        check(unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) })
    };
    watch(listener.as_raw_fd())?;
    let mut peer: HashMap<RawFd, RawFd> = HashMap::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: the kernel fills at most `events.len()` entries.
        let n = check(unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 256, -1) })?;
        for ev in &events[..n as usize] {
            let fd = ev.u64 as RawFd;
            if fd == listener.as_raw_fd() {
                while let Ok((client, _)) = listener.accept() {
                    let server = TcpStream::connect(backend)?;
                    for s in [&client, &server] {
                        s.set_nodelay(true)?;
                        s.set_nonblocking(true)?;
                    }
                    let (c, s) = (client.into_raw_fd(), server.into_raw_fd());
                    peer.extend([(c, s), (s, c)]);
                    watch(c)?;
                    watch(s)?;
                }
                continue;
            }
            if let Some(&to) = peer.get(&fd) {
                if !forward(fd, to, &mut buf) {
                    peer.remove(&fd);
                    peer.remove(&to);
                    // SAFETY: both descriptors were ours and are forgotten above.
                    unsafe {
                        libc::close(fd);
                        libc::close(to);
                    }
                }
            }
        }
    }
}

/// One `recv` from `from`, sent whole to `to`; false when the connection ended.
fn forward(from: RawFd, to: RawFd, buf: &mut [u8]) -> bool {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let got = unsafe { libc::recv(from, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if got < 0 {
        return io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock;
    }
    let got = got as usize;
    let mut sent = 0;
    while sent < got {
        let rest = &buf[sent..got];
        // SAFETY: the kernel reads `rest.len()` bytes from `rest`.
        let n = unsafe { libc::send(to, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
        if n > 0 {
            sent += n as usize;
        } else if io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock {
            return false;
        }
    }
    got > 0
}
