//! The cluster's UDP socket: one thread receives datagrams (`recvmmsg`, up to 32 a system
//! call), runs the engine's timers and sends batches whose threads stayed busy; any thread
//! sends (a UDP send does not wait for the peer). `status` asks a running node
//! for its view (`stage cluster status`).

use super::auth::Envelope;
use super::engine::{self, Engine, Transport};
use super::ClusterConfig;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A UDP socket as the engine's transport.
pub struct Udp(pub UdpSocket);

impl Transport for Udp {
    fn send(&self, to: SocketAddr, datagram: &[u8]) {
        if let Err(e) = self.0.send_to(datagram, to) {
            log::debug!("cluster: send to {to}: {e}");
        }
    }
}

/// A running cluster node: its engine and the thread serving its socket.
pub struct Node {
    pub engine: Arc<Engine>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn bind(port: u16, v6: bool) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(
        if v6 { Domain::IPV6 } else { Domain::IPV4 },
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    // Room for a burst of fragments (1 MiB messages) while the thread catches up.
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    let any: SocketAddr = if v6 {
        format!("[::]:{port}")
    } else {
        format!("0.0.0.0:{port}")
    }
    .parse()
    .expect("address");
    s.bind(&any.into())?;
    Ok(s.into())
}

impl Node {
    /// Binds `cfg.port` and starts the node's thread; `Err` names the port.
    pub fn start(cfg: ClusterConfig) -> anyhow::Result<Node> {
        let sock = bind(cfg.port, cfg.advertise.is_ipv6())
            .map_err(|e| anyhow::anyhow!("#cluster: cannot listen on UDP port {}: {e}", cfg.port))?;
        let rx = sock.try_clone()?;
        let engine = Engine::new(cfg, Arc::new(Udp(sock)));
        let stop = Arc::new(AtomicBool::new(false));
        let (e, st) = (engine.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("stage-cluster".into())
            .spawn(move || serve(&e, &rx, &st))?;
        log::info!(
            "cluster: node {} listening on UDP {} ({})",
            engine.name(),
            engine.cfg.port,
            if engine.cfg.key.is_some() {
                "authenticated"
            } else {
                "INSECURE: no #cluster-key"
            }
        );
        if engine.cfg.key.is_none() {
            log::warn!("cluster: \"#cluster-insecure\": datagrams are not authenticated; anyone who reaches UDP port {} can join and inject messages", engine.cfg.port);
        }
        Ok(Node {
            engine,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread without leaving: to the others this node just went silent, as after
    /// `kill -9` (benchmarks and tests of failure detection).
    pub fn halt(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Leaves the cluster and stops the thread.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.engine.leave();
            self.stop.store(true, Ordering::Relaxed);
            let _ = t.join();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Datagrams taken from the socket per system call at most.
const RECV_BATCH: usize = 32;
/// Room per datagram: the largest a UDP datagram can be.
const RECV_SIZE: usize = 65536;

/// `recvmmsg(2)` buffers: up to `RECV_BATCH` datagrams per system call.
struct Receiver {
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl Receiver {
    fn new() -> Receiver {
        // SAFETY: all-zero bytes are a valid value of these plain C structs.
        let zero_addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let zero_hdr: libc::mmsghdr = unsafe { std::mem::zeroed() };
        Receiver {
            bufs: vec![0; RECV_BATCH * RECV_SIZE],
            addrs: vec![zero_addr; RECV_BATCH],
            iovs: (0..RECV_BATCH)
                .map(|_| libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                })
                .collect(),
            hdrs: vec![zero_hdr; RECV_BATCH],
        }
    }

    /// Waits (up to the socket's read timeout) for one datagram, then takes every one that
    /// is already there, up to `RECV_BATCH`; returns how many.
    fn recv(&mut self, sock: &UdpSocket) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        for i in 0..RECV_BATCH {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i * RECV_SIZE..].as_mut_ptr().cast(),
                iov_len: RECV_SIZE,
            };
            let h = &mut self.hdrs[i];
            h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = std::ptr::null_mut();
            h.msg_hdr.msg_controllen = 0;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: every header points into buffers owned by `self` that outlive the call,
        // with their true lengths.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                RECV_BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Datagram `i` of the last `recv` and its sender (`None`: not an IP address).
    fn get(&self, i: usize) -> Option<(SocketAddr, &[u8])> {
        let len = (self.hdrs[i].msg_len as usize).min(RECV_SIZE);
        let data = &self.bufs[i * RECV_SIZE..i * RECV_SIZE + len];
        let a = &self.addrs[i];
        let from = match a.ss_family as libc::c_int {
            libc::AF_INET => {
                // SAFETY: the kernel wrote a sockaddr_in here (its family says so).
                let v4: &libc::sockaddr_in = unsafe { &*(a as *const libc::sockaddr_storage).cast() };
                SocketAddr::from((
                    u32::from_be(v4.sin_addr.s_addr).to_be_bytes(),
                    u16::from_be(v4.sin_port),
                ))
            }
            libc::AF_INET6 => {
                // SAFETY: the kernel wrote a sockaddr_in6 here (its family says so).
                let v6: &libc::sockaddr_in6 = unsafe { &*(a as *const libc::sockaddr_storage).cast() };
                SocketAddr::V6(std::net::SocketAddrV6::new(
                    v6.sin6_addr.s6_addr.into(),
                    u16::from_be(v6.sin6_port),
                    v6.sin6_flowinfo,
                    v6.sin6_scope_id,
                ))
            }
            _ => return None,
        };
        Some((from, data))
    }
}

fn serve(engine: &Engine, sock: &UdpSocket, stop: &AtomicBool) {
    let mut rx = Receiver::new();
    let mut next = Instant::now();
    let mut swept = next;
    // Answers this thread sends (a request that found no instance, a fail-over hop) go out
    // in batches too, after each round of datagrams.
    super::engine::defer_sends();
    // One timeout for good (no system call per datagram): timers run at most this late.
    let _ = sock.set_read_timeout(Some(Duration::from_millis(5)));
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next {
            next = engine.tick(now);
        }
        if now.duration_since(swept) >= Duration::from_millis(1) {
            swept = now;
            engine.flush_late(now);
        }
        match rx.recv(sock) {
            Ok(n) => {
                for i in 0..n {
                    if let Some((from, d)) = rx.get(i) {
                        engine.receive(from, d);
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => log::debug!("cluster: receive: {e}"),
        }
        super::engine::flush_deferred();
    }
}

/// Asks the node at `addr` for its status (with the cluster's key); the JSON it answers.
pub fn status(
    addr: SocketAddr,
    key: Option<&[u8]>,
    accept: &[Vec<u8>],
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    // Bound to the address the node is asked at, so the reply's tag names it.
    let sock = UdpSocket::bind(SocketAddr::new(
        if addr.ip().is_loopback() {
            addr.ip()
        } else if addr.is_ipv4() {
            [0, 0, 0, 0].into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        },
        0,
    ))?;
    sock.connect(addr)?;
    let me = sock.local_addr()?;
    let env = Envelope::new(key, engine::random_u64()).accepting(accept);
    sock.send(&engine::status_request(&env, addr))?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            anyhow::bail!(
                "no answer from the node at UDP {addr} within {} ms (not running, or another #cluster-key)",
                timeout.as_millis()
            );
        }
        sock.set_read_timeout(Some(left))?;
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if let Some(body) = engine::status_reply(&env, me, &buf[..n]) {
                return Ok(serde_json::from_slice(body)?);
            }
        }
    }
}
