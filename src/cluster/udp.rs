//! The cluster's UDP socket: one thread receives datagrams and runs the engine's timers;
//! any thread sends (a UDP send does not wait for the peer). `status` asks a running node
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

fn serve(engine: &Engine, sock: &UdpSocket, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    let mut next = Instant::now();
    // One timeout for good (no system call per datagram): timers run at most this late.
    let _ = sock.set_read_timeout(Some(Duration::from_millis(5)));
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next {
            next = engine.tick(now);
        }
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => engine.receive(from, &buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => log::debug!("cluster: receive: {e}"),
        }
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
