//! Addresses in the shapes STAGE's `broker.ntoa`/`aton`/`ifaddr` use (datumflux/platform
//! `stage/lua/lbrokerlib.cpp` `__ntoa`, `__aton`, `__ifaddr`), in plain Rust.
//!
//! The product's addresses are text (`1.2.3.4:5`, `[::1]:5`); STAGE's are the raw bytes of a
//! `struct sockaddr`. Both are read wherever an address is taken ([`parse_any`]), so an
//! address a STAGE script saved or built still works; the ones handed out stay text.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// STAGE's `family` numbers: the Linux `AF_INET` and `AF_INET6`.
pub const AF_INET: i64 = libc::AF_INET as i64;
pub const AF_INET6: i64 = libc::AF_INET6 as i64;

/// The fields of `ntoa(a, {})`: `{family = 2|10, addr, port, scope_id (IPv6)}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts {
    pub family: i64,
    pub addr: String,
    pub port: u16,
    pub scope_id: Option<u32>,
}

/// The parts of an address.
pub fn parts(a: &SocketAddr) -> Parts {
    match a {
        SocketAddr::V4(v4) => Parts {
            family: AF_INET,
            addr: v4.ip().to_string(),
            port: v4.port(),
            scope_id: None,
        },
        SocketAddr::V6(v6) => Parts {
            family: AF_INET6,
            addr: v6.ip().to_string(),
            port: v6.port(),
            scope_id: Some(v6.scope_id()),
        },
    }
}

/// `aton(family, {addr =, port =, scope_id =})`: an address from its parts. A missing `addr`
/// is the unspecified address, a missing port 0.
pub fn from_parts(family: i64, addr: Option<&str>, port: u16, scope_id: u32) -> Result<SocketAddr, String> {
    match family {
        AF_INET => {
            let ip: Ipv4Addr = match addr {
                Some(a) => a.parse().map_err(|_| format!("bad IPv4 address {a:?}"))?,
                None => Ipv4Addr::UNSPECIFIED,
            };
            Ok(SocketAddrV4::new(ip, port).into())
        }
        AF_INET6 => {
            let ip: Ipv6Addr = match addr {
                Some(a) => a.parse().map_err(|_| format!("bad IPv6 address {a:?}"))?,
                None => Ipv6Addr::UNSPECIFIED,
            };
            Ok(SocketAddrV6::new(ip, port, 0, scope_id).into())
        }
        other => Err(format!(
            "unsupported address family {other} (expected {AF_INET} for IPv4 or {AF_INET6} for IPv6)"
        )),
    }
}

/// The raw `struct sockaddr_in`/`sockaddr_in6` bytes STAGE uses as an address.
pub fn to_sockaddr(a: &SocketAddr) -> Vec<u8> {
    let mut out = Vec::new();
    match a {
        SocketAddr::V4(v4) => {
            out.extend_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            out.extend_from_slice(&v4.port().to_be_bytes());
            out.extend_from_slice(&v4.ip().octets());
            out.extend_from_slice(&[0; 8]);
        }
        SocketAddr::V6(v6) => {
            out.extend_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            out.extend_from_slice(&v6.port().to_be_bytes());
            out.extend_from_slice(&v6.flowinfo().to_be_bytes());
            out.extend_from_slice(&v6.ip().octets());
            out.extend_from_slice(&v6.scope_id().to_ne_bytes());
        }
    }
    out
}

/// Raw `sockaddr_in` (16 bytes) / `sockaddr_in6` (28 bytes) → address.
pub fn from_sockaddr(b: &[u8]) -> Option<SocketAddr> {
    if b.len() < 2 {
        return None;
    }
    let family = u16::from_ne_bytes([b[0], b[1]]) as i32;
    match (family, b.len()) {
        (libc::AF_INET, 16) => {
            let port = u16::from_be_bytes([b[2], b[3]]);
            let ip = Ipv4Addr::new(b[4], b[5], b[6], b[7]);
            Some(SocketAddrV4::new(ip, port).into())
        }
        (libc::AF_INET6, 28) => {
            let port = u16::from_be_bytes([b[2], b[3]]);
            let flow = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
            let ip: [u8; 16] = b[8..24].try_into().ok()?;
            let scope = u32::from_ne_bytes(b[24..28].try_into().ok()?);
            Some(SocketAddrV6::new(ip.into(), port, flow, scope).into())
        }
        _ => None,
    }
}

/// `host:port` or `[v6]:port` with a literal ip (or `localhost`).
pub fn parse_text(s: &str) -> Option<SocketAddr> {
    let s = s.trim();
    if let Ok(a) = s.parse() {
        return Some(a);
    }
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = match host {
        "localhost" => Ipv4Addr::LOCALHOST.into(),
        "" | "*" => Ipv4Addr::UNSPECIFIED.into(),
        h => h.parse().ok()?,
    };
    Some(SocketAddr::new(ip, port))
}

/// An address given as text or as STAGE's raw sockaddr bytes.
pub fn parse_any(b: &[u8]) -> Option<SocketAddr> {
    match std::str::from_utf8(b) {
        Ok(s) if s.bytes().all(|c| (b' '..0x80).contains(&c)) => parse_text(s),
        _ => from_sockaddr(b),
    }
}

/// `aton("udp://host:port")`: the scheme (tcp, udp, none) and the `host:port` part, without
/// a query. A host name is for the caller to resolve.
pub fn split_uri(s: &str) -> (&str, &str) {
    let (scheme, rest) = s.split_once("://").unwrap_or(("", s));
    let rest = rest.split('?').next().unwrap_or(rest).trim_end_matches('/');
    (scheme, rest)
}

/// `ifaddr([name])` as STAGE: interface name → its addresses, without loopback addresses,
/// keeping the interfaces whose name contains `filter` (all when empty).
pub fn ifaddrs(all: &[(String, IpAddr)], filter: &str) -> BTreeMap<String, Vec<IpAddr>> {
    let mut out: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for (name, ip) in all {
        if ip.is_loopback() || !name.contains(filter) {
            continue;
        }
        out.entry(name.clone()).or_default().push(*ip);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_as_stage_names_them() {
        let p = parts(&"1.2.3.4:5".parse().unwrap());
        assert_eq!(
            p,
            Parts {
                family: 2,
                addr: "1.2.3.4".into(),
                port: 5,
                scope_id: None
            }
        );
        let p = parts(&"[::1]:6".parse().unwrap());
        assert_eq!(
            (p.family, p.addr.as_str(), p.port, p.scope_id),
            (10, "::1", 6, Some(0))
        );
        assert_eq!(
            from_parts(2, Some("10.0.0.1"), 80, 0).unwrap(),
            "10.0.0.1:80".parse().unwrap()
        );
        assert_eq!(from_parts(10, None, 81, 0).unwrap(), "[::]:81".parse().unwrap());
        assert!(from_parts(3, None, 1, 0)
            .unwrap_err()
            .contains("unsupported address family 3"));
        assert!(from_parts(2, Some("nope"), 1, 0)
            .unwrap_err()
            .contains("bad IPv4 address"));
    }

    #[test]
    fn raw_sockaddrs_round_trip_and_are_read_like_text() {
        for s in ["127.0.0.1:8080", "[fe80::1%3]:9", "[::1]:1"] {
            let a: SocketAddr = match s.parse() {
                Ok(a) => a,
                Err(_) => SocketAddrV6::new("fe80::1".parse().unwrap(), 9, 0, 3).into(),
            };
            let raw = to_sockaddr(&a);
            assert_eq!(raw.len(), if a.is_ipv4() { 16 } else { 28 });
            assert_eq!(from_sockaddr(&raw), Some(a));
            assert_eq!(parse_any(&raw), Some(a));
        }
        assert_eq!(parse_any(b"127.0.0.1:5"), Some("127.0.0.1:5".parse().unwrap()));
        assert_eq!(parse_any(b"localhost:5"), Some("127.0.0.1:5".parse().unwrap()));
        assert_eq!(parse_any(b"[::1]:5"), Some("[::1]:5".parse().unwrap()));
        assert_eq!(parse_any(b"nonsense"), None);
    }

    #[test]
    fn splits_uris_and_groups_interfaces() {
        assert_eq!(split_uri("udp://224.0.0.1:8082"), ("udp", "224.0.0.1:8082"));
        assert_eq!(split_uri("tcp://[::1]:1?bson=4k"), ("tcp", "[::1]:1"));
        assert_eq!(split_uri("1.2.3.4:5"), ("", "1.2.3.4:5"));
        let all = vec![
            ("lo".to_string(), IpAddr::from(Ipv4Addr::LOCALHOST)),
            ("eth0".to_string(), "10.0.0.2".parse().unwrap()),
            ("eth0".to_string(), "fe80::2".parse().unwrap()),
            ("wlan0".to_string(), "192.168.1.2".parse().unwrap()),
        ];
        let g = ifaddrs(&all, "");
        assert_eq!(g.keys().collect::<Vec<_>>(), vec!["eth0", "wlan0"], "no loopback");
        assert_eq!(g["eth0"].len(), 2);
        assert_eq!(ifaddrs(&all, "eth").len(), 1, "a substring of the name");
    }
}
