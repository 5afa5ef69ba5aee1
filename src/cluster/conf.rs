//! `#cluster` as STAGE reads it: an integer is this node's UDP port; `"host:port"` a node
//! this one forwards to; `":eth0"` / `":10.0.0.5"` the device or address it advertises;
//! `"=host:port"` the next node of the fail-over chain. Plus `#cluster-key`,
//! `#cluster-insecure` and `#router[0]` (the sync interval).

use serde_json::Value as Json;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// The cluster part of the configuration, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    pub port: u16,
    /// The nodes this one routes to (STAGE's direction rule).
    pub peers: Vec<SocketAddr>,
    /// The fail-over chain, in order.
    pub failover: Vec<SocketAddr>,
    /// The address other nodes reach this one at (its name is `ip:port`).
    pub advertise: IpAddr,
    /// The key this node signs with (`#cluster-key`, or its first entry).
    pub key: Option<Vec<u8>>,
    /// Older keys still accepted during a rotation (the other entries of `#cluster-key`).
    pub accept: Vec<Vec<u8>>,
    pub sync: Duration,
}

/// A `#cluster` mistake, naming the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("#cluster{where_}: {reason}")]
pub struct ConfError {
    pub where_: String,
    pub reason: String,
}

fn err(where_: impl Into<String>, reason: impl Into<String>) -> ConfError {
    ConfError {
        where_: where_.into(),
        reason: reason.into(),
    }
}

fn resolve(s: &str, at: &str) -> Result<SocketAddr, ConfError> {
    s.to_socket_addrs()
        .map_err(|e| err(at, format!("\"{s}\" is not a host:port ({e})")))?
        .next()
        .ok_or_else(|| err(at, format!("\"{s}\" resolves to no address")))
}

impl ClusterConfig {
    /// `None` when `#cluster` names no port (no cluster). `interfaces` lists (name, address)
    /// of the machine, for `":eth0"`.
    pub fn parse(
        entries: &[Json],
        keys: &[String],
        insecure: bool,
        sync_ms: u64,
        interfaces: &[(String, IpAddr)],
    ) -> Result<Option<ClusterConfig>, ConfError> {
        let mut port = None;
        let mut peers = vec![];
        let mut failover = vec![];
        let mut advertise = None;
        for (i, e) in entries.iter().enumerate() {
            let at = format!("[{i}]");
            match e {
                Json::Number(n) => {
                    let p = n
                        .as_u64()
                        .filter(|p| (1..=65535).contains(p))
                        .ok_or_else(|| err(&at, format!("port {n} is not in 1..65535")))?;
                    if port.replace(p as u16).is_some() {
                        return Err(err(&at, "a second port (a node listens on one)"));
                    }
                }
                // A port given as a string: `"env:STAGE_CLUSTER_PORT"` after resolution, so two
                // processes of one home can listen on different ports.
                Json::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                    let p = s
                        .parse::<u16>()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| err(&at, format!("port {s} is not in 1..65535")))?;
                    if port.replace(p).is_some() {
                        return Err(err(&at, "a second port (a node listens on one)"));
                    }
                }
                Json::String(s) if s.starts_with(':') => {
                    let name = &s[1..];
                    let ip = match name.parse::<IpAddr>() {
                        Ok(ip) => ip,
                        Err(_) => interfaces
                            .iter()
                            .filter(|(n, _)| n == name)
                            .map(|(_, ip)| *ip)
                            .min_by_key(|ip| ip.is_ipv6())
                            .ok_or_else(|| err(&at, format!("no interface or address \"{name}\"")))?,
                    };
                    advertise = Some(ip);
                }
                Json::String(s) if s.starts_with('=') => failover.push(resolve(&s[1..], &at)?),
                Json::String(s) => peers.push(resolve(s, &at)?),
                other => {
                    return Err(err(
                        &at,
                        format!("expected a port, \"host:port\", \":device\" or \"=host:port\", got {other}"),
                    ))
                }
            }
        }
        let Some(port) = port else {
            if entries.is_empty() {
                return Ok(None);
            }
            return Err(err("", "no port: add this node's UDP port (an integer)"));
        };
        if let Some(i) = keys.iter().position(|k| k.is_empty()) {
            return Err(err(
                "-key",
                if keys.len() == 1 {
                    "empty".to_string()
                } else {
                    format!("[{i}] is empty")
                },
            ));
        }
        let key = match keys.first() {
            Some(k) => Some(k.as_bytes().to_vec()),
            None if insecure => None,
            None => return Err(err(
                "-key",
                "missing: every cluster datagram is authenticated with it (use \"env:STAGE_CLUSTER_KEY\"), \
                     or set \"#cluster-insecure\": true on a trusted network",
            )),
        };
        if sync_ms < 100 {
            return Err(err("", format!("#router[0] = {sync_ms} ms is below 100 ms")));
        }
        // Without an address given: the one that reaches the first named node (no packet is
        // sent to find it), else loopback.
        let advertise = advertise.unwrap_or_else(|| {
            peers
                .iter()
                .chain(&failover)
                .next()
                .and_then(|p| {
                    let any: SocketAddr = if p.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().ok()?;
                    let s = std::net::UdpSocket::bind(any).ok()?;
                    s.connect(p).ok()?;
                    Some(s.local_addr().ok()?.ip())
                })
                .unwrap_or(IpAddr::from([127, 0, 0, 1]))
        });
        Ok(Some(ClusterConfig {
            port,
            peers,
            failover,
            advertise,
            key,
            accept: keys.iter().skip(1).map(|k| k.as_bytes().to_vec()).collect(),
            sync: Duration::from_millis(sync_ms),
        }))
    }

    /// This node's address (and name, `ip:port`).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.advertise, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Json, key: Option<&str>, insecure: bool) -> Result<Option<ClusterConfig>, ConfError> {
        parse_ring(v, key.iter().map(|k| k.to_string()).collect(), insecure)
    }

    fn parse_ring(v: Json, keys: Vec<String>, insecure: bool) -> Result<Option<ClusterConfig>, ConfError> {
        let ifs = vec![
            ("lo".to_string(), IpAddr::from([127, 0, 0, 1])),
            ("eth9".into(), "10.1.2.3".parse().unwrap()),
        ];
        ClusterConfig::parse(v.as_array().unwrap(), &keys, insecure, 1500, &ifs)
    }

    #[test]
    fn a_key_ring_signs_with_the_first_and_accepts_the_rest() {
        let c = parse_ring(json!([9801]), vec!["new".into(), "old".into()], false)
            .unwrap()
            .unwrap();
        assert_eq!(c.key.as_deref(), Some(&b"new"[..]));
        assert_eq!(c.accept, vec![b"old".to_vec()]);
        let e = parse_ring(json!([9801]), vec!["new".into(), "".into()], false).unwrap_err();
        assert_eq!(e.to_string(), "#cluster-key: [1] is empty");
    }

    #[test]
    fn stage_entries_mean_what_they_mean_in_stage() {
        let c = parse(
            json!([
                ":eth9",
                "=127.0.0.1:9809",
                9801,
                "127.0.0.1:9802",
                "127.0.0.1:9803"
            ]),
            Some("k"),
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.port, 9801);
        assert_eq!(c.advertise, "10.1.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(
            c.peers,
            vec![
                "127.0.0.1:9802".parse().unwrap(),
                "127.0.0.1:9803".parse().unwrap()
            ]
        );
        assert_eq!(c.failover, vec!["127.0.0.1:9809".parse().unwrap()]);
        assert_eq!(c.addr().to_string(), "10.1.2.3:9801");
        let c = parse(json!([":10.0.0.5", 9801]), Some("k"), false)
            .unwrap()
            .unwrap();
        assert_eq!(c.addr().to_string(), "10.0.0.5:9801");
        // Loopback peers: advertised as loopback.
        let c = parse(json!([9801, "127.0.0.1:9802"]), Some("k"), false)
            .unwrap()
            .unwrap();
        assert_eq!(c.advertise, IpAddr::from([127, 0, 0, 1]));
    }

    #[test]
    fn no_cluster_and_mistakes() {
        assert_eq!(parse(json!([]), None, false), Ok(None));
        let e = parse(json!([9801]), None, false).unwrap_err();
        assert!(e.to_string().starts_with("#cluster-key: missing"), "{e}");
        assert!(parse(json!([9801]), None, true).unwrap().unwrap().key.is_none());
        assert!(parse(json!(["127.0.0.1:1"]), Some("k"), false)
            .unwrap_err()
            .to_string()
            .contains("no port"));
        assert!(parse(json!([70000]), Some("k"), false)
            .unwrap_err()
            .to_string()
            .contains("#cluster[0]"));
        assert!(parse(json!([1, ":nope0"]), Some("k"), false)
            .unwrap_err()
            .to_string()
            .contains("no interface"));
        assert!(parse(json!([1, "nohostport"]), Some("k"), false)
            .unwrap_err()
            .to_string()
            .contains("#cluster[1]"));
        assert!(parse(json!([1, true]), Some("k"), false).is_err());
        assert!(parse(json!([1, 2]), Some("k"), false)
            .unwrap_err()
            .to_string()
            .contains("second port"));
    }
}
