//! Socket setup: listeners and UDP sockets through socket2 (SO_REUSEPORT for ports named in
//! `#services`, dual-stack `[::]`, multicast groups), address parsing and interface lookup.

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A literal address (`localhost` is accepted as 127.0.0.1); other names are not resolved
/// here because resolving blocks.
pub fn literal_addr(host: &str, port: u16) -> Option<SocketAddr> {
    let ip: IpAddr = match host {
        "localhost" => Ipv4Addr::LOCALHOST.into(),
        h => h.parse().ok()?,
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether `port` of `proto` is listed in `#services` (`"host:port"` entries); only the port
/// matters, since `0.0.0.0:8801` and `127.0.0.1:8801` share one port for SO_REUSEPORT.
/// Parses `ip:port`, `[ipv6]:port` or `localhost:port`; the error names the address.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    let (h, p) = s
        .trim_start_matches('[')
        .rsplit_once(':')
        .ok_or_else(|| format!("bad address '{s}' (expected host:port)"))?;
    let h = h.trim_end_matches(']');
    p.parse::<u16>()
        .ok()
        .and_then(|p| literal_addr(h, p))
        .ok_or_else(|| format!("bad address '{s}' (expected ip:port)"))
}

pub fn is_shared(services: &[String], port: u16) -> bool {
    port != 0
        && services
            .iter()
            .any(|s| s.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()) == Some(port))
}

fn new_socket(addr: &SocketAddr, ty: Type, proto: Protocol, reuse_port: bool) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(*addr), ty, Some(proto))?;
    if addr.is_ipv6() {
        // `[::]` accepts IPv4 too, whatever the system default says.
        s.set_only_v6(false)?;
    }
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

/// A non-blocking TCP listener on `addr`.
pub fn tcp_listener(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let s = new_socket(&addr, Type::STREAM, Protocol::TCP, reuse_port)?;
    s.bind(&SockAddr::from(addr))?;
    s.listen(1024)?;
    Ok(s.into())
}

/// A non-blocking UDP socket on `addr`; a multicast `addr` binds the port on every interface
/// and joins the group.
pub fn udp_socket(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::UdpSocket> {
    let multicast = addr.ip().is_multicast();
    let bind = match (multicast, addr.ip()) {
        (true, IpAddr::V4(_)) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port()),
        (true, IpAddr::V6(_)) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), addr.port()),
        _ => addr,
    };
    let s = new_socket(&bind, Type::DGRAM, Protocol::UDP, reuse_port || multicast)?;
    s.bind(&SockAddr::from(bind))?;
    match addr.ip() {
        IpAddr::V4(g) if multicast => s.join_multicast_v4(&g, &Ipv4Addr::UNSPECIFIED)?,
        IpAddr::V6(g) if multicast => s.join_multicast_v6(&g, 0)?,
        _ => {}
    }
    Ok(s.into())
}

/// Text form of an address: `1.2.3.4:5` or `[::1]:5`.
pub fn ntoa(addr: &SocketAddr) -> String {
    addr.to_string()
}

/// The addresses of the machine's interfaces: (interface name, address).
pub fn interfaces() -> Vec<(String, IpAddr)> {
    let mut out = vec![];
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let ifa = &*cur;
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(ifa.ifa_name)
                .to_string_lossy()
                .into_owned();
            match (*ifa.ifa_addr).sa_family as i32 {
                libc::AF_INET => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    out.push((name, IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)))));
                }
                libc::AF_INET6 => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    out.push((name, IpAddr::V6(Ipv6Addr::from(sa.sin6_addr.s6_addr))));
                }
                _ => {}
            }
        }
        libc::freeifaddrs(head);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_addr("127.0.0.1:80"), Ok(([127, 0, 0, 1], 80).into()));
        assert_eq!(parse_addr("localhost:9"), Ok(([127, 0, 0, 1], 9).into()));
        assert_eq!(parse_addr("[::1]:7").unwrap().to_string(), "[::1]:7");
        assert_eq!(
            parse_addr("nohost"),
            Err("bad address 'nohost' (expected host:port)".into())
        );
        assert_eq!(
            parse_addr("example.com:80"),
            Err("bad address 'example.com:80' (expected ip:port)".into())
        );
        assert!(parse_addr("127.0.0.1:99999").is_err());
    }

    #[test]
    fn shared_ports() {
        let s = vec!["0.0.0.0:8801".to_string(), "[::]:8802".to_string()];
        assert!(is_shared(&s, 8801));
        assert!(is_shared(&s, 8802));
        assert!(!is_shared(&s, 8803));
        assert!(!is_shared(&s, 0));
    }

    #[test]
    fn reuse_port_lets_two_listeners_share() {
        let a = tcp_listener("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let port = a.local_addr().unwrap().port();
        let b = tcp_listener(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port), true);
        assert!(b.is_ok());
        // Without SO_REUSEPORT the port is taken.
        let c = tcp_listener(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port), false);
        assert_eq!(c.unwrap_err().raw_os_error(), Some(libc::EADDRINUSE));
    }

    #[test]
    fn loopback_is_listed() {
        assert!(interfaces().iter().any(|(_, ip)| ip.is_loopback()));
        assert_eq!(literal_addr("localhost", 1), Some("127.0.0.1:1".parse().unwrap()));
        assert_eq!(literal_addr("::1", 2), Some("[::1]:2".parse().unwrap()));
        assert_eq!(literal_addr("example.com", 2), None);
    }
}

/// What an instance does when `accept` fails because the process is out of descriptors
/// (EMFILE/ENFILE): the connection would otherwise wait in the backlog, connected but never
/// served, while accept fails again and again. One descriptor is kept in reserve; at the
/// limit it is released, the waiting connections are accepted and closed at once (the
/// client sees the connection end instead of hanging), and the reserve is taken again.
/// Refusals are counted and reported once per `REPORT_EVERY`.
pub struct Refuser {
    spare: Option<std::fs::File>,
    /// Connections refused since the last report.
    pub refused: u64,
    /// Every connection refused so far.
    pub total: u64,
    last_report: Option<std::time::Instant>,
}

/// How often a port at the descriptor limit is reported.
pub const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl Default for Refuser {
    fn default() -> Self {
        Refuser::new()
    }
}

impl Refuser {
    pub fn new() -> Refuser {
        Refuser {
            spare: std::fs::File::open("/dev/null").ok(),
            refused: 0,
            total: 0,
            last_report: None,
        }
    }

    /// Whether `e` means "out of descriptors".
    pub fn is_fd_limit(e: &io::Error) -> bool {
        matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
    }

    /// Accepts and closes every connection waiting on `listener` (a non-blocking listening
    /// socket), using the reserve descriptor. Returns how many were refused.
    pub fn refuse_waiting(&mut self, listener: std::os::fd::RawFd) -> u64 {
        self.spare = None;
        let mut n = 0;
        loop {
            // SAFETY: accept on a listening descriptor we own; a returned fd is closed at once.
            let fd = unsafe {
                libc::accept4(
                    listener,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                break;
            }
            unsafe { libc::close(fd) };
            n += 1;
            if n >= 1024 {
                break;
            }
        }
        self.spare = std::fs::File::open("/dev/null").ok();
        self.refused += n;
        self.total += n;
        n
    }

    /// `Some(count)` when it is time to report the refusals since the last report.
    pub fn report(&mut self, now: std::time::Instant) -> Option<u64> {
        if self.refused == 0 {
            return None;
        }
        if self
            .last_report
            .is_some_and(|t| now.duration_since(t) < REPORT_EVERY)
        {
            return None;
        }
        self.last_report = Some(now);
        Some(std::mem::take(&mut self.refused))
    }
}

#[cfg(test)]
mod refuser_tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn waiting_connections_are_closed_and_counted() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let mut clients: Vec<std::net::TcpStream> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut r = Refuser::new();
        assert_eq!(r.refuse_waiting(l.as_raw_fd()), 3);
        for c in &mut clients {
            c.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            let mut b = [0u8; 4];
            assert!(matches!(std::io::Read::read(c, &mut b), Ok(0) | Err(_)));
        }
        let t = std::time::Instant::now();
        assert_eq!(r.report(t), Some(3));
        assert_eq!(r.refuse_waiting(l.as_raw_fd()), 0);
        std::net::TcpStream::connect(addr).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(r.refuse_waiting(l.as_raw_fd()), 1);
        // Reported at most once per interval.
        assert_eq!(r.report(t + std::time::Duration::from_secs(1)), None);
        assert_eq!(r.report(t + REPORT_EVERY), Some(1));
        assert_eq!(r.total, 4);
        assert!(Refuser::is_fd_limit(&io::Error::from_raw_os_error(libc::EMFILE)));
    }
}
