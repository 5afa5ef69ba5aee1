//! `tls://`, `ws://` and `wss://` in the broker, served and joined: the socket / receive /
//! commit / close model and the framings of `tcp://`, over a stream that the connection's
//! task owns (`Kind::Task`). A child module of `broker.rs` (`#[path]`), so it reuses the
//! connection state, `serve`, `deliver` and `finish` as they are.
//!
//! * `tls://`: TLS (rustls, `net::tls`) under the URI's framing; frames are cut from the
//!   decrypted bytes exactly as on `tcp://`.
//! * `ws://`, `wss://`: each WebSocket message is one frame (`net::ws`): `?bson` takes binary
//!   messages holding one document (`?packet` too), `?text` text messages, `?raw` either as bytes. Replies
//!   are queued length-prefixed in `out` (whatever the framing) so that each stays one message.
//!
//! Closing is graceful so that the last replies and the close frame reach the peer: the
//! close frame (with the code `net::ws` chose: 1007 for invalid UTF-8, 1009 too big, ...),
//! then a TLS close_notify and FIN, then reading (and dropping) what the peer still sends,
//! its close answer included, until it closes too or `LINGER` passes (closing a socket with unread input makes
//! the kernel send a reset, which can destroy replies the peer has not read yet).

use super::*;
use crate::lua::broker_http::{cert_paths, tls_conf};
use crate::net::conn::next_message;
use crate::net::tls::{self, TlsFiles};
use crate::net::ws as wsnet;
use futures_util::{FutureExt, Sink, SinkExt, StreamExt};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

/// How long a client has for its WebSocket upgrade request (after TLS, if any).
const UPGRADE_TIMEOUT: Duration = tls::HANDSHAKE_TIMEOUT;
/// How long a closing connection waits for the peer's close, then for its end of stream.
const LINGER: Duration = Duration::from_secs(2);

/// `socket.commit` on a TLS or WebSocket connection: queues the frame and wakes the task.
pub(super) fn commit(conn: &Conn, lua: &Lua, v: &Value, ws: bool) -> mlua::Result<usize> {
    if ws && conn.framing == Framing::Text {
        if let Value::String(s) = v {
            if std::str::from_utf8(&s.as_bytes()).is_err() {
                return Err(mlua::Error::runtime(
                    "socket.commit: a ?text websocket sends UTF-8 text only (use ?raw for bytes)",
                ));
            }
        }
    }
    let mut out = conn.out.borrow_mut();
    let n = conn.frame_value(lua, v, &mut out)?;
    if let Some(e) = out.overflow() {
        drop(out);
        conn.close_bad(&e.to_string());
        return Ok(0);
    }
    drop(out);
    if !conn.in_task.get() {
        conn.wake.notify_one();
    }
    Ok(n)
}

fn opt_string(opts: Option<&Table>, key: &str) -> mlua::Result<Option<String>> {
    match opts {
        Some(t) => t
            .raw_get::<Option<String>>(key)
            .map_err(|e| mlua::Error::runtime(format!("options.{key}: {e}"))),
        None => Ok(None),
    }
}

/// What the log calls an endpoint: `tls, bson`, `ws /game, text`, ...
fn describe(ep: &Endpoint) -> String {
    let scheme = match (ep.proto, ep.tls) {
        (Proto::Ws, false) => "ws",
        (Proto::Ws, true) => "wss",
        _ => "tls",
    };
    let path = if ep.proto == Proto::Ws && !ep.path.is_empty() {
        format!(" {}", ep.path)
    } else {
        String::new()
    };
    format!("{scheme}{path}, {}", ep.framing.name())
}

/// `broker.ready` for `tls://`, `ws://`, `wss://`: listens; returns the port table, or errno
/// and a message. TLS needs `options.cert` / `options.key` or `#tls` in stage.json.
pub(super) fn ready(
    lua: &Lua,
    uri: &str,
    ep: Endpoint,
    addr: SocketAddr,
    accept: Function,
    opts: Option<&Table>,
) -> mlua::Result<MultiValue> {
    let tls = if ep.tls {
        let paths = cert_paths(lua, opt_string(opts, "cert")?, opt_string(opts, "key")?);
        // A WebSocket upgrade is an HTTP/1.1 request: say so by ALPN, as browsers expect.
        let alpn: &[&[u8]] = if ep.proto == Proto::Ws {
            &[b"http/1.1"]
        } else {
            &[]
        };
        match paths.and_then(|(c, k)| TlsFiles::load(&c, &k, alpn)) {
            Ok(f) => Some(Rc::new(f)),
            Err(e) => return fail(lua, None, format!("broker.ready {uri}: {e}")),
        }
    } else {
        None
    };
    let c = ctx(lua);
    let shared = sock::is_shared(&c.node.config.services_tcp, ep.port);
    let listener = match sock::tcp_listener(addr, shared).and_then(TcpListener::from_std) {
        Ok(l) => l,
        Err(e) => return io_fail(lua, &format!("broker.ready {uri}"), e),
    };
    let local = listener.local_addr().ok();
    let id = next_id();
    let port = socket_table(lua, id, None, local)?;
    port.raw_set("port", local.map(|a| a.port()).unwrap_or(0))?;
    log::info!(target: &c.name, "listening on {} ({}{})", local.map(|a| a.to_string()).unwrap_or_default(),
        describe(&ep), if shared { ", shared" } else { "" });
    let task = spawn_local(accept_loop(lua.clone(), listener, ep, port.clone(), accept, tls));
    broker(lua)
        .ports
        .borrow_mut()
        .insert(id, (port.clone(), task.abort_handle()));
    Ok(MultiValue::from_vec(vec![Value::Table(port)]))
}

async fn accept_loop(
    lua: Lua,
    listener: TcpListener,
    ep: Endpoint,
    port: Table,
    accept: Function,
    tls: Option<Rc<TlsFiles>>,
) {
    let name = ctx(&lua).name.clone();
    let mut draining = ctx(&lua).node.draining.subscribe();
    let mut last_error: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = draining.wait_for(|d| *d) => return,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                if last_error.is_none_or(|t| t.elapsed() >= sock::REPORT_EVERY) {
                    last_error = Some(Instant::now());
                    log::warn!(target: &name, "accept on port {}: {e}", ep.port);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        spawn_local(accepted_one(
            lua.clone(),
            tcp,
            peer,
            ep.clone(),
            port.clone(),
            accept.clone(),
            tls.clone(),
        ));
    }
}

/// One accepted connection: the TLS handshake, the WebSocket upgrade, `accept`, then its life.
/// A failed handshake (garbage, a plain-text client on a TLS port, a wrong path) is logged
/// and touches nothing else.
async fn accepted_one(
    lua: Lua,
    tcp: TcpStream,
    peer: SocketAddr,
    ep: Endpoint,
    port: Table,
    accept: Function,
    tls: Option<Rc<TlsFiles>>,
) {
    let name = ctx(&lua).name.clone();
    let local = tcp.local_addr().ok();
    let stream = match &tls {
        Some(t) => match tls::accept(t.acceptor(&name), tcp).await {
            Ok((s, _)) => s,
            Err(e) => {
                log::warn!(target: &name, "port {}: {peer}: {e}", ep.port);
                return;
            }
        },
        None => tls::Stream::Plain(tcp),
    };
    if ep.proto != Proto::Ws {
        if let Some(conn) = accepted_conn(&lua, &ep, peer, local, port, &accept, false, None).await {
            run_stream(lua, conn, stream).await;
        }
        return;
    }
    let ws = match tokio::time::timeout(UPGRADE_TIMEOUT, wsnet::accept(stream, &ep.path, ep.max_in)).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            log::warn!(target: &name, "port {}: {peer}: {e}", ep.port);
            return;
        }
        Err(_) => {
            log::warn!(target: &name, "port {}: {peer}: no websocket upgrade within {} s", ep.port,
                UPGRADE_TIMEOUT.as_secs());
            return;
        }
    };
    let (ws, path) = ws;
    if let Some(conn) = accepted_conn(&lua, &ep, peer, local, port, &accept, true, Some(path)).await {
        run_ws(lua, conn, ws).await;
    }
}

/// A socket for a connection whose task owns its stream. A WebSocket's output is queued as
/// packets, one per message.
fn task_conn(
    lua: &Lua,
    ep: &Endpoint,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    port: Option<Table>,
    ws: bool,
) -> mlua::Result<Rc<Conn>> {
    let id = next_id();
    let table = socket_table(lua, id, Some(peer), local)?;
    // An accepted connection inherits its port's `crypto`, as on tcp://.
    let inherited = match &port {
        Some(p) => p
            .raw_get::<Option<i64>>("id")?
            .and_then(|pid| broker(lua).port_crypto.borrow().get(&pid).cloned()),
        None => None,
    };
    // Accepted connections count in their port's metrics as on `tcp://` (joined ones do not).
    let metrics = match (&port, local) {
        (Some(_), Some(local)) => {
            let c = ctx(lua);
            Some(c.node.metrics.connection(local.port(), &c.name))
        }
        _ => None,
    };
    let mut conn = new_conn(lua, ep, id, Some(peer), table, port, Kind::Task { ws })?;
    if let Some(c) = Rc::get_mut(&mut conn) {
        c.metrics = metrics;
    }
    *conn.crypto.borrow_mut() = inherited;
    if ws {
        *conn.out.borrow_mut() = OutBuf::messages(ep.max_out);
    }
    add_methods(lua, &conn)?;
    broker(lua).conns.borrow_mut().insert(id, conn.clone());
    Ok(conn)
}

/// Registers an accepted connection and runs `accept(socket, addr)` as `tcp://` does.
#[allow(clippy::too_many_arguments)]
async fn accepted_conn(
    lua: &Lua,
    ep: &Endpoint,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    port: Table,
    accept: &Function,
    ws: bool,
    path: Option<String>,
) -> Option<Rc<Conn>> {
    let conn = match task_conn(lua, ep, peer, local, Some(port), ws) {
        Ok(c) => c,
        Err(e) => {
            log::error!(target: &ctx(lua).name, "accept {peer}: {e}");
            return None;
        }
    };
    if let Some(p) = path {
        let _ = conn.table.raw_set("path", p);
    }
    let rets = call_callback(lua, "accept", accept, (conn.table.clone(), sock::ntoa(&peer))).await;
    match rets.as_ref().and_then(|r| r.front()) {
        Some(Value::Function(f)) => *conn.handler.borrow_mut() = Some(f.clone()),
        Some(Value::Boolean(true)) => {}
        _ => {
            conn.accepted.set(false);
            conn.close("refused by accept");
        }
    }
    Some(conn)
}

/// `broker.join` for `tls://`, `ws://`, `wss://`: connects, runs the TLS handshake (trusting
/// the public roots, `options.ca` or `#tls.ca`; the name checked is `options.name` or the
/// URI's host) and the WebSocket upgrade, and starts the connection's task.
pub(super) async fn join(
    lua: &Lua,
    uri: &str,
    ep: &Endpoint,
    addr: SocketAddr,
    opts: Option<&Table>,
) -> Result<Rc<Conn>, (Option<i32>, String)> {
    let err = |e: String| (None, format!("broker.join {uri}: {e}"));
    let ca = opt_string(opts, "ca").map_err(|e| err(e.to_string()))?;
    let name = opt_string(opts, "name").map_err(|e| err(e.to_string()))?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| (e.raw_os_error(), format!("broker.join {uri}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().ok();
    if !ep.tls {
        return joined(lua, uri, ep, tcp, addr, local).await;
    }
    let root = ctx(lua).node.home.root.clone();
    let ca = ca.map(|p| root.join(p)).or_else(|| tls_conf(lua, "ca"));
    let alpn: &[&[u8]] = if ep.proto == Proto::Ws {
        &[b"http/1.1"]
    } else {
        &[]
    };
    let cfg = tls::client_config(ca.as_deref(), alpn).map_err(err)?;
    let s = tls::connect(Arc::new(cfg), name.as_deref().unwrap_or(&ep.host), tcp)
        .await
        .map_err(err)?;
    joined(lua, uri, ep, s, addr, local).await
}

async fn joined<S: AsyncRead + AsyncWrite + Unpin + 'static>(
    lua: &Lua,
    uri: &str,
    ep: &Endpoint,
    s: S,
    peer: SocketAddr,
    local: Option<SocketAddr>,
) -> Result<Rc<Conn>, (Option<i32>, String)> {
    let err = |e: String| (None, format!("broker.join {uri}: {e}"));
    if ep.proto != Proto::Ws {
        let conn = task_conn(lua, ep, peer, local, None, false).map_err(|e| err(e.to_string()))?;
        spawn_local(run_stream(lua.clone(), conn.clone(), s));
        return Ok(conn);
    }
    let url = format!(
        "{}://{}{}",
        if ep.tls { "wss" } else { "ws" },
        ep.authority(),
        if ep.path.is_empty() { "/" } else { &ep.path }
    );
    let upgrade = tokio_tungstenite::client_async_with_config(url, s, Some(wsnet::config(ep.max_in)));
    let ws = match tokio::time::timeout(UPGRADE_TIMEOUT, upgrade).await {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(tungstenite::Error::Http(r))) => {
            return Err(err(format!("websocket upgrade refused with {}", r.status())))
        }
        Ok(Err(e)) => return Err(err(format!("websocket upgrade failed: {e}"))),
        Err(_) => {
            return Err(err(format!(
                "no websocket upgrade within {} s",
                UPGRADE_TIMEOUT.as_secs()
            )))
        }
    };
    let conn = task_conn(lua, ep, peer, local, None, true).map_err(|e| err(e.to_string()))?;
    spawn_local(run_ws(lua.clone(), conn.clone(), ws));
    Ok(conn)
}

/// One read into the frame reader's spare room (`FrameReader::fill` as on a `TcpStream`).
fn poll_fill<R: AsyncRead + Unpin>(
    reader: &mut FrameReader,
    r: &mut R,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<usize>> {
    let res = reader.fill(|b| {
        let read = std::pin::pin!(r.read_buf(b));
        match read.poll(cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    });
    match res {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Poll::Pending,
        r => Poll::Ready(r),
    }
}

/// Writes the queued output and flushes it (TLS records included); ready when all is out.
fn poll_write_out<W: AsyncWrite + Unpin>(
    conn: &Conn,
    w: &mut W,
    cx: &mut Context<'_>,
) -> Poll<Result<(), OutError>> {
    let mut out = conn.out.borrow_mut();
    let mut sent = 0;
    let r = out.flush(|b| match Pin::new(&mut *w).poll_write(cx, b) {
        Poll::Ready(r) => {
            if let Ok(n) = r {
                sent += n;
            }
            r
        }
        Poll::Pending => Err(std::io::ErrorKind::WouldBlock.into()),
    });
    if let Some(m) = &conn.metrics {
        m.bytes_out.inc_by(sent as u64);
    }
    r?;
    if !out.is_empty() {
        return Poll::Pending;
    }
    Pin::new(w).poll_flush(cx).map_err(OutError::Write)
}

/// True when queued output may be written now: at once, or `port.commit` ms after the first
/// reply (as `write_out` on `tcp://`).
fn due(conn: &Conn, flush_at: &mut Option<Instant>) -> bool {
    if conn.out.borrow().is_empty() {
        return false;
    }
    match (*flush_at, conn.port_ms(&conn.keys.commit)) {
        (Some(t), _) if t <= Instant::now() => {
            *flush_at = None;
            true
        }
        (Some(_), _) => false,
        (None, Some(ms)) => {
            *flush_at = Some(Instant::now() + Duration::from_millis(ms));
            false
        }
        (None, None) => true,
    }
}

/// The life of a `tls://` connection: read → cut → deliver → write, until it closes.
async fn run_stream<S: AsyncRead + AsyncWrite + Unpin>(lua: Lua, conn: Rc<Conn>, s: S) {
    let (mut rd, mut wr) = tokio::io::split(s);
    let mut reader = FrameReader::new(conn.framing, conn.max_in);
    let node = ctx(&lua).node.clone();
    let idle = node.config.limits.idle_ms;
    let mut last_read = Instant::now();
    let mut flush_at: Option<Instant> = None;
    let mut writing = false;
    let mut in_flight: Option<crate::host::node::InFlight> = None;
    let (reason, bad) = loop {
        if reader.pending() > 0 && in_flight.is_none() {
            in_flight = Some(node.in_flight());
        }
        if let Err(e) = serve(&lua, &conn, &mut reader).await {
            break (e, true);
        }
        let served = reader.consumed_any();
        reader.compact();
        if let Some(r) = conn.closing.borrow().clone() {
            break (r, *conn.bad.borrow());
        }
        writing |= due(&conn, &mut flush_at);
        if !writing && conn.out.borrow().is_empty() {
            in_flight = None;
            if node.is_draining() {
                break ("node stopping".into(), false);
            }
        }
        if served {
            tokio::task::yield_now().await;
        }
        let expire = conn.expire_ms(idle);
        let idle_at = expire.map(|ms| last_read + Duration::from_millis(ms));
        let partial = reader.pending();
        tokio::select! {
            r = std::future::poll_fn(|cx| poll_fill(&mut reader, &mut rd, cx)) => match r {
                Ok(0) if partial > 0 => {
                    break (format!("peer closed with {partial} bytes of a partial frame"), true);
                }
                Ok(0) => break ("peer closed".into(), false),
                Ok(n) => {
                    last_read = Instant::now();
                    if let Some(m) = &conn.metrics {
                        m.bytes_in.inc_by(n as u64);
                    }
                }
                Err(e) => break (format!("read failed: {e}"), false),
            },
            r = std::future::poll_fn(|cx| poll_write_out(&conn, &mut wr, cx)), if writing => match r {
                Ok(()) => writing = false,
                Err(e) => break (e.to_string(), true),
            },
            _ = conn.wake.notified() => {}
            _ = sleep_until_opt(flush_at) => {}
            _ = sleep_until_opt(idle_at) => {
                let tail = if partial > 0 { format!(" with {partial} bytes of a partial frame") } else { String::new() };
                break (format!("idle for {} ms (port.expire){tail}", expire.unwrap_or(0)), partial > 0);
            }
        }
    };
    // The replies queued so far (also those to the good frames before a bad one), then
    // close_notify and FIN, then what the peer still sends until it closes.
    let _ = tokio::time::timeout(LINGER, async {
        if std::future::poll_fn(|cx| poll_write_out(&conn, &mut wr, cx))
            .await
            .is_ok()
        {
            let _ = wr.shutdown().await;
            let mut sink = [0u8; 4096];
            while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
        }
    })
    .await;
    finish(&lua, &conn, &reason, bad).await;
}

/// Sends the queued replies, one message each, and flushes; ready when all is out.
fn poll_ws_write<K>(conn: &Conn, sink: &mut K, cx: &mut Context<'_>) -> Poll<Result<(), String>>
where
    K: Sink<Message, Error = tungstenite::Error> + Unpin,
{
    let framing = conn.framing;
    let mut out = conn.out.borrow_mut();
    let mut sent = 0;
    let r = out.flush(|b| {
        match Pin::new(&mut *sink).poll_ready(cx) {
            Poll::Pending => return Err(std::io::ErrorKind::WouldBlock.into()),
            Poll::Ready(Err(e)) => return Err(std::io::Error::other(e)),
            Poll::Ready(Ok(())) => {}
        }
        let Some((start, end, consumed)) = next_message(b) else {
            return Err(std::io::Error::other("broken output queue"));
        };
        // `commit` let only UTF-8 through on a text socket.
        let msg = wsnet::outbound(framing, b[start..end].to_vec()).map_err(std::io::Error::other)?;
        Pin::new(&mut *sink)
            .start_send(msg)
            .map_err(std::io::Error::other)?;
        sent += end - start;
        Ok(consumed)
    });
    // WebSocket payload bytes (the message framing is not counted).
    if let Some(m) = &conn.metrics {
        m.bytes_out.inc_by(sent as u64);
    }
    if let Err(e) = r {
        return Poll::Ready(Err(e.to_string()));
    }
    if !out.is_empty() {
        return Poll::Pending;
    }
    drop(out);
    Pin::new(sink)
        .poll_flush(cx)
        .map_err(|e| format!("write failed: {e}"))
}

/// Hands the messages `ranges` of `buf` to the script: one directly, more in one batch.
async fn serve_messages(
    lua: &Lua,
    conn: &Rc<Conn>,
    buf: &[u8],
    ranges: &[(usize, usize)],
) -> Result<(), String> {
    conn.in_task.set(true);
    let r = async {
        let bson = conn.framing.is_bson();
        // One message, or encrypted ones among them (opened with socket.crypto): one at a time.
        if ranges.len() == 1 || (bson && ranges.iter().any(|&(a, _)| is_encrypted(&buf[a..]))) {
            for &(a, b) in ranges {
                let data = decode_frame(lua, conn, &buf[a..b])
                    .map_err(|e| format!("message is not a valid BSON document: {e}"))?;
                deliver(lua, conn, data, None).await;
                if conn.is_closing() {
                    break;
                }
            }
            return Ok(());
        }
        let (n, bad) = match bson_lua::decode_batch_with(lua, &conn.batch, buf, ranges, bson, conn.mode) {
            Ok(n) => (n, None),
            Err((n, e)) => (n, Some(format!("message is not a valid BSON document: {e}"))),
        };
        if n > 0 {
            deliver_batch(lua, conn, n).await;
        }
        bad.map_or(Ok(()), Err)
    }
    .await;
    conn.in_task.set(false);
    r
}

/// The life of a WebSocket connection: messages in (in batches of what has arrived) →
/// deliver → replies out as messages, until either side closes.
async fn run_ws<S: AsyncRead + AsyncWrite + Unpin>(lua: Lua, conn: Rc<Conn>, ws: WebSocketStream<S>) {
    let (mut sink, mut stream) = ws.split();
    let node = ctx(&lua).node.clone();
    let idle = node.config.limits.idle_ms;
    let mut last_read = Instant::now();
    let mut flush_at: Option<Instant> = None;
    let mut writing = false;
    let mut buf: Vec<u8> = Vec::new();
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    // The close frame we send: the refusal's code, 1000 otherwise; none when the peer closed
    // (tungstenite answers its close itself).
    let mut refusal: Option<wsnet::Refusal> = None;
    let mut peer_closed = false;
    let (reason, bad) = loop {
        if let Some(r) = conn.closing.borrow().clone() {
            break (r, *conn.bad.borrow());
        }
        writing |= due(&conn, &mut flush_at);
        if !writing && conn.out.borrow().is_empty() && node.is_draining() {
            break ("node stopping".into(), false);
        }
        let expire = conn.expire_ms(idle);
        let idle_at = expire.map(|ms| last_read + Duration::from_millis(ms));
        tokio::select! {
            m = stream.next() => {
                last_read = Instant::now();
                buf.clear();
                ranges.clear();
                // This message and those already arrived behind it, up to a batch.
                let mut next = Some(m);
                let mut end: Option<End> = None;
                while let Some(m) = next.take() {
                    let m = match m {
                        None => {
                            peer_closed = true;
                            end = Some(("peer closed".into(), false));
                            break;
                        }
                        Some(Err(e)) => {
                            match wsnet::read_error(&e) {
                                Some(r) => {
                                    end = Some((format!("websocket closed with {r}"), true));
                                    refusal = Some(r);
                                }
                                None => {
                                    peer_closed = true;
                                    end = Some((format!("read failed: {e}"), false));
                                }
                            }
                            break;
                        }
                        Some(Ok(m)) => m,
                    };
                    if let Message::Close(c) = &m {
                        peer_closed = true;
                        let code = c.as_ref().map(|c| u16::from(c.code)).unwrap_or(1005);
                        end = Some((format!("peer closed ({code})"), false));
                        break;
                    }
                    match wsnet::inbound(conn.framing, m) {
                        Ok(Some(b)) => {
                            let start = buf.len();
                            buf.extend_from_slice(&b);
                            ranges.push((start, buf.len()));
                        }
                        Ok(None) => {}
                        Err(r) => {
                            end = Some((format!("websocket closed with {r}"), true));
                            refusal = Some(r);
                            break;
                        }
                    }
                    if ranges.len() < MAX_BATCH {
                        next = stream.next().now_or_never();
                    }
                }
                if !ranges.is_empty() {
                    // One frame per message, payload bytes (as `tcp://` counts frames).
                    if let Some(m) = &conn.metrics {
                        m.frames_in.inc_by(ranges.len() as u64);
                        m.bytes_in.inc_by(buf.len() as u64);
                    }
                    let _guard = node.in_flight();
                    if let Err(e) = serve_messages(&lua, &conn, &buf, &ranges).await {
                        refusal = Some(wsnet::Refusal { code: CloseCode::Invalid.into(), reason: e.clone() });
                        break (format!("websocket closed with {e} (1007)"), true);
                    }
                    // The replies go out now when the socket takes them (as `tcp://` writes
                    // after each batch), without another round through the select; what
                    // does not fit is left to the write branch.
                    writing |= due(&conn, &mut flush_at);
                    if writing {
                        match std::future::poll_fn(|cx| poll_ws_write(&conn, &mut sink, cx)).now_or_never() {
                            Some(Ok(())) => writing = false,
                            Some(Err(e)) => {
                                peer_closed = true;
                                break (e, false);
                            }
                            None => {}
                        }
                    }
                    tokio::task::yield_now().await;
                }
                if let Some(end) = end {
                    break end;
                }
            }
            r = std::future::poll_fn(|cx| poll_ws_write(&conn, &mut sink, cx)), if writing => match r {
                Ok(()) => writing = false,
                Err(e) => {
                    peer_closed = true;
                    break (e, false);
                }
            },
            _ = conn.wake.notified() => {}
            _ = sleep_until_opt(flush_at) => {}
            _ = sleep_until_opt(idle_at) => {
                break (format!("idle for {} ms (port.expire)", expire.unwrap_or(0)), false);
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, async {
        // What was queued (the replies to the messages before a bad one, too).
        if std::future::poll_fn(|cx| poll_ws_write(&conn, &mut sink, cx))
            .await
            .is_err()
        {
            return;
        }
        if peer_closed {
            // The close answer tungstenite queued, if any.
            let _ = sink.flush().await;
        } else {
            let frame = match &refusal {
                Some(r) => r.frame(),
                // 1001 "going away" when the node stops, else 1000.
                None if reason == "node stopping" => CloseFrame {
                    code: CloseCode::Away,
                    reason: "node stopping".into(),
                },
                None => CloseFrame {
                    code: CloseCode::Normal,
                    reason: "".into(),
                },
            };
            if sink.send(Message::Close(Some(frame))).await.is_err() {
                return;
            }
        }
        // FIN (after close_notify on wss), then read until the peer closes too: its close
        // answer, if it sends one, is read and dropped here.
        if let Ok(ws) = sink.reunite(stream) {
            let mut s = ws.into_inner();
            let _ = s.shutdown().await;
            let mut rest = [0u8; 4096];
            while matches!(s.read(&mut rest).await, Ok(n) if n > 0) {}
        }
    })
    .await;
    finish(&lua, &conn, &reason, bad).await;
}
