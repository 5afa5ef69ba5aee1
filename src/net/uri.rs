//! Broker endpoint URIs: `tcp://host:port?FRAMING=IN,OUT`, `udp://host:port?FRAMING`,
//! `tls://` (TLS under a framing), `ws://host:port/path?FRAMING=IN,OUT` and `wss://`
//! (WebSocket messages as frames), `http://host:port` and `https://`. As in STAGE, a URI
//! without a scheme is TCP (`0.0.0.0:8080?bson`), the limits may also be written `IN:OUT`
//! (the spelling of STAGE's broker.md table), a URI without `?FRAMING` is a raw byte stream
//! (also spelled `?raw`), and IN/OUT not given are 8 KiB (STAGE's `BUFSIZ`).

use super::framing::{parse_size, Framing};
use thiserror::Error;

/// Default largest frame accepted (IN) and largest unsent output (OUT): STAGE's `BUFSIZ`.
pub const DEFAULT_IN: usize = 8 * 1024;
pub const DEFAULT_OUT: usize = 8 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    /// HTTP/1.1 (and HTTP/2 over TLS) served by a handler.
    Http,
    /// WebSocket: each message is a frame.
    Ws,
}

/// A parsed endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub proto: Proto,
    /// The host as written, without IPv6 brackets.
    pub host: String,
    pub port: u16,
    pub framing: Framing,
    pub max_in: usize,
    pub max_out: usize,
    /// `&stage`: STAGE's BSON array mapping on this port (0-based arrays, `{"#1": ...}`).
    pub stage_arrays: bool,
    /// `tls://`, `https://`, `wss://`.
    pub tls: bool,
    /// The path after the authority (`/game` of `ws://h:1/game`), empty when none.
    pub path: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("bad broker uri '{uri}': {why}")]
pub struct UriError {
    pub uri: String,
    pub why: String,
}

impl Endpoint {
    /// `host:port` with brackets for IPv6, for resolving and for messages.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

pub fn parse(uri: &str) -> Result<Endpoint, UriError> {
    let err = |why: &str| UriError {
        uri: uri.to_string(),
        why: why.to_string(),
    };
    let (scheme, rest) = uri.split_once("://").unwrap_or(("tcp", uri));
    let (proto, tls) = match scheme.to_ascii_lowercase().as_str() {
        "tcp" => (Proto::Tcp, false),
        "udp" => (Proto::Udp, false),
        "tls" => (Proto::Tcp, true),
        "http" => (Proto::Http, false),
        "https" => (Proto::Http, true),
        "ws" => (Proto::Ws, false),
        "wss" => (Proto::Ws, true),
        other => {
            return Err(err(&format!(
                "unsupported scheme '{other}' (expected tcp, udp, tls, http, https, ws or wss)"
            )))
        }
    };
    let (addr, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (addr, path) = match addr.find('/') {
        Some(i) => (&addr[..i], addr[i..].trim_end_matches('/')),
        None => (addr, ""),
    };
    if proto == Proto::Http && !query.is_empty() {
        return Err(err(
            "http takes no ?framing (limits go in the options table: max_body, max_head, timeout)",
        ));
    }
    let (host, port) = if let Some(v6) = addr.strip_prefix('[') {
        let (h, p) = v6.split_once("]:").ok_or_else(|| err("expected [ipv6]:port"))?;
        (h, p)
    } else {
        addr.rsplit_once(':').ok_or_else(|| err("expected host:port"))?
    };
    let port: u16 = port.parse().map_err(|_| err(&format!("bad port '{port}'")))?;
    let host = match host {
        "" | "*" => "0.0.0.0",
        h => h,
    };
    let mut ep = Endpoint {
        proto,
        host: host.to_string(),
        port,
        framing: Framing::Raw,
        max_in: DEFAULT_IN,
        max_out: DEFAULT_OUT,
        stage_arrays: false,
        tls,
        path: path.to_string(),
    };
    // Options after the framing: `?bson=4k,64k&stage`.
    let mut options = query.split('&');
    let query = options.next().unwrap_or("");
    for opt in options {
        match opt {
            "stage" => ep.stage_arrays = true,
            other => return Err(err(&format!("unknown option '{other}' (expected stage)"))),
        }
    }
    if !query.is_empty() {
        let (name, limits) = query.split_once('=').unwrap_or((query, ""));
        ep.framing = Framing::parse(name).ok_or_else(|| {
            err(&format!(
                "unknown framing '{name}' (expected bson, packet, text or raw)"
            ))
        })?;
        if !limits.is_empty() {
            let (i, o) = limits
                .split_once(',')
                .or_else(|| limits.split_once(':'))
                .unwrap_or((limits, ""));
            ep.max_in = parse_size(i).ok_or_else(|| err(&format!("bad IN limit '{i}'")))?;
            if !o.is_empty() {
                ep.max_out = parse_size(o).ok_or_else(|| err(&format!("bad OUT limit '{o}'")))?;
            }
            if ep.max_in < 5 {
                return Err(err("IN limit below 5 bytes"));
            }
        }
    }
    Ok(ep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        let e = parse("tcp://0.0.0.0:8801?bson=2k,4k").unwrap();
        assert_eq!(
            (e.proto, e.port, e.framing, e.max_in, e.max_out),
            (Proto::Tcp, 8801, Framing::Bson, 2048, 4096)
        );
        let e = parse("tcp://[::]:8802?text").unwrap();
        assert_eq!(
            (e.host.as_str(), e.framing, e.max_in),
            ("::", Framing::Text, DEFAULT_IN)
        );
        assert_eq!(e.authority(), "[::]:8802");
        let e = parse("udp://239.1.2.3:9000?bson").unwrap();
        assert_eq!(e.proto, Proto::Udp);
        let e = parse("tcp://127.0.0.1:0?packet=1m").unwrap();
        assert_eq!((e.max_in, e.max_out), (1 << 20, DEFAULT_OUT));
        assert_eq!(parse("tcp://:5").unwrap().host, "0.0.0.0");
        // No framing: a raw byte stream, as STAGE; `?raw` says so explicitly.
        let e = parse("tcp://127.0.0.1:1").unwrap();
        assert_eq!((e.framing, e.max_in, e.max_out), (Framing::Raw, 8192, 8192));
        let e = parse("tcp://127.0.0.1:1?raw=1k").unwrap();
        assert_eq!((e.framing, e.max_in), (Framing::Raw, 1024));
        assert_eq!(
            parse("tcp://127.0.0.1:1?bson").unwrap().max_in,
            8192,
            "STAGE's BUFSIZ"
        );
    }

    #[test]
    fn accepts_stage_spellings() {
        // No scheme: TCP, as STAGE's broker.ready/join.
        let e = parse("127.0.0.1:8081?text").unwrap();
        assert_eq!(
            (e.proto, e.host.as_str(), e.port, e.framing),
            (Proto::Tcp, "127.0.0.1", 8081, Framing::Text)
        );
        let e = parse("[::1]:9").unwrap();
        assert_eq!(
            (e.proto, e.host.as_str(), e.framing),
            (Proto::Tcp, "::1", Framing::Raw)
        );
        // IN:OUT as well as IN,OUT.
        let e = parse("tcp://127.0.0.1:1?packet=4k:10k").unwrap();
        assert_eq!((e.max_in, e.max_out), (4096, 10240));
        assert_eq!(parse("UDP://127.0.0.1:1").unwrap().proto, Proto::Udp);
        // STAGE's array mapping as an option.
        let e = parse("tcp://127.0.0.1:1?bson=4k,64k&stage").unwrap();
        assert!(e.stage_arrays);
        assert_eq!(e.max_in, 4096);
        assert!(!parse("tcp://127.0.0.1:1?bson").unwrap().stage_arrays);
        assert!(parse("tcp://127.0.0.1:1?bson&zip")
            .unwrap_err()
            .to_string()
            .contains("unknown option 'zip'"));
    }

    #[test]
    fn web_and_tls_schemes() {
        let e = parse("ws://0.0.0.0:8081/game?bson=1m").unwrap();
        assert_eq!(
            (e.proto, e.tls, e.path.as_str(), e.framing, e.max_in),
            (Proto::Ws, false, "/game", Framing::Bson, 1 << 20)
        );
        let e = parse("wss://[::1]:8443/a/b/?text").unwrap();
        assert_eq!(
            (e.proto, e.tls, e.path.as_str(), e.host.as_str()),
            (Proto::Ws, true, "/a/b", "::1")
        );
        let e = parse("https://127.0.0.1:8443/").unwrap();
        assert_eq!((e.proto, e.tls, e.path.as_str()), (Proto::Http, true, ""));
        let e = parse("tls://127.0.0.1:0?packet").unwrap();
        assert_eq!((e.proto, e.tls, e.framing), (Proto::Tcp, true, Framing::Packet));
        assert!(parse("http://1.2.3.4:80?bson")
            .unwrap_err()
            .to_string()
            .contains("options table"));
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(parse("gopher://x:1")
            .unwrap_err()
            .to_string()
            .contains("unsupported scheme 'gopher'"));
        assert!(parse("tcp://x").unwrap_err().to_string().contains("host:port"));
        assert!(parse("tcp://x:99999")
            .unwrap_err()
            .to_string()
            .contains("bad port"));
        assert!(parse("tcp://x:1?json")
            .unwrap_err()
            .to_string()
            .contains("unknown framing 'json'"));
        assert!(parse("tcp://x:1?bson=zz")
            .unwrap_err()
            .to_string()
            .contains("bad IN limit"));
    }
}
