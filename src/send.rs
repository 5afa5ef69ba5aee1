//! `stage send ADDR [JSON]`: a BSON client for people and scripts over `tcp://`, `udp://`,
//! `tls://`, `ws://` and `wss://` (each request one WebSocket message), and an HTTP one for
//! `http://` and `https://` addresses. Each request (the JSON
//! argument, or each line of stdin) is sent as one frame; each reply is printed as one JSON
//! line. Also the JSON <-> BSON conversion it needs (extended JSON `$date`, `$oid`).

use crate::net::framing::{next_frame, put_frame, Framing};
use crate::net::uri::{self, Proto};
use anyhow::{anyhow, bail, Context};
use serde_json::{Map, Number, Value as Json};
use std::io::{BufRead, Read, Write};
use std::net::{TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::{self, Message};

/// `stage send http://host:port/path [JSON]`: a GET, or a POST of each JSON request (the
/// argument, or each line of stdin when the argument is `-`); prints each body. Counts the
/// requests that failed or got a status of 400 or more.
fn http(opts: &SendOptions) -> anyhow::Result<usize> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(opts.timeout_ms.max(1)))
        .build()?;
    let bodies: Vec<Option<String>> = match opts.json.as_deref() {
        None => vec![None],
        Some("-") => std::io::stdin()
            .lock()
            .lines()
            .filter(|l| l.as_ref().map(|l| !l.trim().is_empty()).unwrap_or(true))
            .map(|l| l.map(Some))
            .collect::<Result<_, _>>()?,
        Some(j) => vec![Some(j.to_string())],
    };
    let mut failed = 0;
    for body in bodies {
        let req = match body {
            None => client.get(&opts.addr),
            Some(b) => client
                .post(&opts.addr)
                .header("content-type", "application/json")
                .body(b),
        };
        let res = rt.block_on(async {
            let r = req.send().await?;
            let status = r.status();
            Ok::<_, reqwest::Error>((status, r.bytes().await?))
        });
        match res {
            Ok((status, body)) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&body)?;
                if !body.ends_with(b"\n") {
                    out.write_all(b"\n")?;
                }
                if status.as_u16() >= 400 {
                    eprintln!("stage send: {} answered {status}", opts.addr);
                    failed += 1;
                }
            }
            Err(e) => {
                eprintln!("stage send: {}: {e}", opts.addr);
                failed += 1;
            }
        }
    }
    Ok(failed)
}

/// Options of `stage send`.
pub struct SendOptions {
    pub addr: String,
    pub json: Option<String>,
    pub framing: Option<String>,
    pub timeout_ms: u64,
    /// A PEM file of extra trusted roots for `tls://` and `wss://` (a private CA).
    pub ca: Option<std::path::PathBuf>,
}

/// Runs the client; returns the number of requests that got no reply.
pub fn run(opts: &SendOptions) -> anyhow::Result<usize> {
    if opts.addr.starts_with("http://") || opts.addr.starts_with("https://") {
        return http(opts);
    }
    let target = if opts.addr.contains("://") {
        opts.addr.clone()
    } else {
        format!("tcp://{}", opts.addr)
    };
    let mut ep = uri::parse(&target)?;
    if !target.contains('?') {
        // The broker's default is a raw stream (as STAGE); this client speaks BSON unless told.
        ep.framing = Framing::Bson;
    }
    if let Some(f) = &opts.framing {
        ep.framing = Framing::parse(f)
            .ok_or_else(|| anyhow!("--framing: expected bson, packet, text or raw, got '{f}'"))?;
    }
    let addr = ep
        .authority()
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {}", ep.authority()))?
        .next()
        .ok_or_else(|| anyhow!("no address for {}", ep.authority()))?;
    let timeout = Duration::from_millis(opts.timeout_ms.max(1));
    let requests: Box<dyn Iterator<Item = std::io::Result<String>>> = match &opts.json {
        Some(j) => Box::new(std::iter::once(Ok(j.clone()))),
        None => Box::new(std::io::stdin().lock().lines()),
    };
    let mut conn = match ep.proto {
        Proto::Http => unreachable!("http is sent by `http`"),
        Proto::Ws => {
            let s = connect(&ep, addr, timeout, opts)?;
            let url = format!(
                "{}://{}{}",
                if ep.tls { "wss" } else { "ws" },
                ep.authority(),
                if ep.path.is_empty() { "/" } else { &ep.path }
            );
            let cfg = crate::net::ws::config(ep.max_in.max(16 << 20));
            let (ws, _) =
                tungstenite::client::client_with_config(url.as_str(), s, Some(cfg)).map_err(|e| match e {
                    tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r)) => {
                        anyhow!("{url}: websocket upgrade refused with {}", r.status())
                    }
                    e => anyhow!("{url}: websocket upgrade failed: {e}"),
                })?;
            Conn::Ws(Box::new(ws))
        }
        Proto::Tcp if ep.tls => Conn::Stream(connect(&ep, addr, timeout, opts)?, Vec::new()),
        Proto::Tcp => {
            let s = TcpStream::connect_timeout(&addr, timeout)
                .with_context(|| format!("cannot connect to {addr}"))?;
            let _ = s.set_nodelay(true);
            Conn::Tcp(s, Vec::new())
        }
        Proto::Udp => {
            let bind = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
            let s = UdpSocket::bind(bind)?;
            s.connect(addr)?;
            Conn::Udp(s)
        }
    };
    let mut missing = 0;
    let stdout = std::io::stdout();
    for line in requests {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let mut frame = Vec::new();
        let payload = match ep.framing {
            Framing::Text | Framing::Raw => line.clone().into_bytes(),
            _ => {
                let v: Json = serde_json::from_str(&line).with_context(|| format!("invalid JSON: {line}"))?;
                json_to_bson(&v)?
            }
        };
        match &mut conn {
            Conn::Ws(ws) => {
                let msg = crate::net::ws::outbound(ep.framing, payload).map_err(|e| anyhow!(e))?;
                ws.send(msg)?;
            }
            _ => {
                put_frame(ep.framing, &payload, &mut frame);
                conn.send(&frame)?;
            }
        }
        match conn.recv(ep.framing, ep.max_in.max(16 << 20), timeout)? {
            Some(reply) => {
                let text = match ep.framing {
                    Framing::Text | Framing::Raw => {
                        String::from_utf8_lossy(reply.strip_suffix(b"\n").unwrap_or(&reply)).into_owned()
                    }
                    _ => match bson_to_json(&reply) {
                        Ok(j) => j.to_string(),
                        Err(_) => Json::String(String::from_utf8_lossy(&reply).into_owned()).to_string(),
                    },
                };
                writeln!(stdout.lock(), "{text}")?;
            }
            None => {
                eprintln!("stage send: no reply within {} ms", timeout.as_millis());
                missing += 1;
            }
        }
    }
    Ok(missing)
}

/// A TCP connection, plain or TLS (`tls://`, `wss://`).
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(b),
            Stream::Tls(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(b),
            Stream::Tls(s) => s.write(b),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// Connects to `addr`, with TLS when the URI asks (the certificate checked against the
/// URI's host, trusting the public roots and `--ca`).
fn connect(
    ep: &uri::Endpoint,
    addr: std::net::SocketAddr,
    timeout: Duration,
    opts: &SendOptions,
) -> anyhow::Result<Stream> {
    let s =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("cannot connect to {addr}"))?;
    let _ = s.set_nodelay(true);
    if !ep.tls {
        return Ok(Stream::Plain(s));
    }
    let alpn: &[&[u8]] = if ep.proto == Proto::Ws {
        &[b"http/1.1"]
    } else {
        &[]
    };
    let cfg = crate::net::tls::client_config(opts.ca.as_deref(), alpn).map_err(|e| anyhow!(e))?;
    let name = rustls::pki_types::ServerName::try_from(ep.host.clone())
        .map_err(|e| anyhow!("tls server name '{}': {e}", ep.host))?;
    let mut c = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name)?;
    let mut s = s;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    while c.is_handshaking() {
        c.complete_io(&mut s)
            .map_err(|e| anyhow!("{}: tls handshake failed: {e}", ep.authority()))?;
    }
    Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(c, s))))
}

enum Conn {
    Tcp(TcpStream, Vec<u8>),
    Stream(Stream, Vec<u8>),
    Ws(Box<tungstenite::WebSocket<Stream>>),
    Udp(UdpSocket),
}

impl Conn {
    fn send(&mut self, frame: &[u8]) -> anyhow::Result<()> {
        match self {
            Conn::Tcp(s, _) => s.write_all(frame)?,
            Conn::Stream(s, _) => {
                s.write_all(frame)?;
                s.flush()?;
            }
            Conn::Ws(_) => unreachable!("websocket messages are sent by `run`"),
            Conn::Udp(s) => {
                s.send(frame)?;
            }
        }
        Ok(())
    }

    /// One reply frame's payload, or None on timeout.
    fn recv(&mut self, framing: Framing, limit: usize, timeout: Duration) -> anyhow::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        match self {
            Conn::Udp(s) => {
                s.set_read_timeout(Some(timeout))?;
                let mut buf = vec![0u8; 65536];
                match s.recv(&mut buf) {
                    Ok(n) => {
                        let f = next_frame(framing, &buf[..n], limit)?
                            .ok_or_else(|| anyhow!("truncated datagram"))?;
                        let end = if framing == Framing::Text { n } else { f.end };
                        Ok(Some(buf[f.start..end].to_vec()))
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        Ok(None)
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Conn::Ws(ws) => loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                ws.get_ref().tcp().set_read_timeout(Some(left))?;
                match ws.read() {
                    Ok(Message::Binary(b)) => return Ok(Some(b.to_vec())),
                    Ok(Message::Text(t)) => return Ok(Some(t.as_bytes().to_vec())),
                    Ok(Message::Close(c)) => match c {
                        Some(c) => bail!(
                            "the server closed the websocket: {} ({})",
                            c.reason,
                            u16::from(c.code)
                        ),
                        None => bail!("the server closed the websocket"),
                    },
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        return Ok(None)
                    }
                    Err(e) => bail!("websocket: {e}"),
                }
            },
            Conn::Stream(s, buf) => loop {
                if let Some(f) = next_frame(framing, buf, limit)? {
                    let payload = buf[f.start..f.end].to_vec();
                    buf.drain(..f.consumed);
                    return Ok(Some(payload));
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                s.tcp().set_read_timeout(Some(left))?;
                let mut chunk = [0u8; 16384];
                match s.read(&mut chunk) {
                    Ok(0) => bail!("connection closed by the server"),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        return Ok(None)
                    }
                    Err(e) => return Err(e.into()),
                }
            },
            Conn::Tcp(s, buf) => loop {
                if let Some(f) = next_frame(framing, buf, limit)? {
                    let payload = buf[f.start..f.end].to_vec();
                    buf.drain(..f.consumed);
                    return Ok(Some(payload));
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                s.set_read_timeout(Some(left))?;
                let mut chunk = [0u8; 16384];
                match s.read(&mut chunk) {
                    Ok(0) => bail!("connection closed by the server"),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        return Ok(None)
                    }
                    Err(e) => return Err(e.into()),
                }
            },
        }
    }
}

// ---------------------------------------------------------------------------------------
// JSON <-> BSON

/// Encodes a JSON object as a BSON document.
pub fn json_to_bson(v: &Json) -> anyhow::Result<Vec<u8>> {
    let Json::Object(m) = v else {
        bail!("a request must be a JSON object, got {v}")
    };
    let mut out = Vec::new();
    put_doc(&mut out, &mut m.iter().map(|(k, v)| (k.clone(), v)), 0)?;
    Ok(out)
}

fn put_doc(
    out: &mut Vec<u8>,
    items: &mut dyn Iterator<Item = (String, &Json)>,
    depth: u32,
) -> anyhow::Result<()> {
    if depth > 100 {
        bail!("JSON nested deeper than 100 levels");
    }
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    for (k, v) in items {
        if k.contains('\0') {
            bail!("key {k:?} contains NUL");
        }
        let key = |out: &mut Vec<u8>, ty: u8| {
            out.push(ty);
            out.extend_from_slice(k.as_bytes());
            out.push(0);
        };
        match v {
            Json::Null => key(out, 0x0A),
            Json::Bool(b) => {
                key(out, 0x08);
                out.push(*b as u8);
            }
            Json::Number(n) => {
                if let Some(i) = n.as_i64() {
                    if let Ok(i) = i32::try_from(i) {
                        key(out, 0x10);
                        out.extend_from_slice(&i.to_le_bytes());
                    } else {
                        key(out, 0x12);
                        out.extend_from_slice(&i.to_le_bytes());
                    }
                } else {
                    key(out, 0x01);
                    out.extend_from_slice(&n.as_f64().unwrap_or(f64::NAN).to_le_bytes());
                }
            }
            Json::String(s) => {
                key(out, 0x02);
                out.extend_from_slice(&((s.len() + 1) as i32).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
                out.push(0);
            }
            Json::Array(a) => {
                key(out, 0x04);
                put_doc(
                    out,
                    &mut a.iter().enumerate().map(|(i, v)| (i.to_string(), v)),
                    depth + 1,
                )?;
            }
            Json::Object(m) => {
                if m.len() == 1 {
                    if let Some(ms) = m.get("$date").and_then(Json::as_i64) {
                        key(out, 0x09);
                        out.extend_from_slice(&ms.to_le_bytes());
                        continue;
                    }
                    if let Some(oid) = m.get("$oid").and_then(Json::as_str).and_then(parse_hex12) {
                        key(out, 0x07);
                        out.extend_from_slice(&oid);
                        continue;
                    }
                }
                key(out, 0x03);
                put_doc(out, &mut m.iter().map(|(k, v)| (k.clone(), v)), depth + 1)?;
            }
        }
    }
    out.push(0);
    let n = (out.len() - start) as i32;
    out[start..start + 4].copy_from_slice(&n.to_le_bytes());
    Ok(())
}

fn parse_hex12(s: &str) -> Option<[u8; 12]> {
    if s.len() != 24 {
        return None;
    }
    let mut o = [0u8; 12];
    for (i, b) in o.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(o)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Decodes a BSON document to JSON (binary as `{"$binary": hex}` unless it is UTF-8). Keys
/// are sorted, so that the output of a reply built from a Lua table (whose field order is
/// arbitrary) is the same every time.
pub fn bson_to_json(b: &[u8]) -> anyhow::Result<Json> {
    get_doc(b, false, 0)
}

fn get_doc(b: &[u8], array: bool, depth: u32) -> anyhow::Result<Json> {
    let bad = || anyhow!("invalid bson");
    if depth > 100
        || b.len() < 5
        || i32::from_le_bytes(b[..4].try_into()?) as usize != b.len()
        || b[b.len() - 1] != 0
    {
        return Err(bad());
    }
    let end = b.len() - 1;
    let mut at = 4;
    let mut map = std::collections::BTreeMap::new();
    let mut arr = Vec::new();
    let i32_at = |at: usize| -> anyhow::Result<i32> {
        Ok(i32::from_le_bytes(b.get(at..at + 4).ok_or_else(bad)?.try_into()?))
    };
    let i64_at = |at: usize| -> anyhow::Result<i64> {
        Ok(i64::from_le_bytes(b.get(at..at + 8).ok_or_else(bad)?.try_into()?))
    };
    while at < end {
        let ty = b[at];
        let kend = at + 1 + b[at + 1..end].iter().position(|&c| c == 0).ok_or_else(bad)?;
        let k = String::from_utf8_lossy(&b[at + 1..kend]).into_owned();
        at = kend + 1;
        let v = match ty {
            0x01 => {
                let f = f64::from_bits(i64_at(at)? as u64);
                at += 8;
                Number::from_f64(f).map(Json::Number).unwrap_or(Json::Null)
            }
            0x02 | 0x0D | 0x0E => {
                let n = i32_at(at)?;
                let s = b.get(at + 4..at + 3 + n.max(1) as usize).ok_or_else(bad)?;
                at += 4 + n as usize;
                Json::String(String::from_utf8_lossy(s).into_owned())
            }
            0x03 | 0x04 => {
                let n = i32_at(at)? as usize;
                let sub = b.get(at..at + n).ok_or_else(bad)?;
                at += n;
                get_doc(sub, ty == 0x04, depth + 1)?
            }
            0x05 => {
                let n = i32_at(at)? as usize;
                let s = b.get(at + 5..at + 5 + n).ok_or_else(bad)?;
                at += 5 + n;
                match std::str::from_utf8(s) {
                    Ok(t) => Json::String(t.to_string()),
                    Err(_) => serde_json::json!({ "$binary": hex(s) }),
                }
            }
            0x07 => {
                let s = b.get(at..at + 12).ok_or_else(bad)?;
                at += 12;
                serde_json::json!({ "$oid": hex(s) })
            }
            0x08 => {
                at += 1;
                Json::Bool(*b.get(at - 1).ok_or_else(bad)? != 0)
            }
            0x09 => {
                at += 8;
                serde_json::json!({ "$date": i64_at(at - 8)? })
            }
            0x06 | 0x0A | 0x7F | 0xFF => Json::Null,
            0x10 => {
                at += 4;
                Json::from(i32_at(at - 4)?)
            }
            0x11 | 0x12 => {
                at += 8;
                Json::from(i64_at(at - 8)?)
            }
            _ => bail!("unsupported bson type 0x{ty:02x}"),
        };
        if array {
            arr.push(v);
        } else {
            map.insert(k, v);
        }
    }
    Ok(if array {
        Json::Array(arr)
    } else {
        Json::Object(map.into_iter().collect::<Map<String, Json>>())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let src = r#"{"cmd":"login","n":1,"big":10000000000,"f":1.5,"t":true,"z":null,"a":[1,"x",{"y":2}],"d":{"$date":17},"o":{"$oid":"0123456789abcdef01234567"}}"#;
        let v: Json = serde_json::from_str(src).unwrap();
        let b = json_to_bson(&v).unwrap();
        let back = bson_to_json(&b).unwrap();
        assert_eq!(back, v);
        let keys: Vec<_> = back.as_object().unwrap().keys().cloned().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }

    #[test]
    fn rejects_non_objects_and_garbage() {
        assert!(json_to_bson(&Json::from(1)).is_err());
        assert!(bson_to_json(&[5, 0, 0, 0, 1]).is_err());
        assert!(bson_to_json(&[9, 0, 0, 0, 0x02, b'a', 0, 1, 0]).is_err());
    }
}
