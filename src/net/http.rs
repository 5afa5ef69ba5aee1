//! HTTP/1.1 and HTTP/2 serving without Lua: one connection (plain or TLS) driven by hyper 1
//! on the current thread, requests handed to a `Handler` closure with the whole body read,
//! and the limits answered here: a head over `max_head` → 431 (hyper), a body over `max_body`
//! → 413, a head not complete within `head_timeout` → 408 (slowloris; an idle keep-alive
//! connection is closed silently), a handler failure → 500 without details. Every refusal
//! is logged with the peer and the reason, and so is a head with both `content-length` and
//! `transfer-encoding` (hyper serves it safely but silently; see `ConnState::window`). Nothing here needs `Send`: a handler's future may
//! hold the instance's Lua state.

use bytes::Bytes;
use http::{HeaderValue, Request as HttpRequest, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;

/// Default limits: 16 KiB of request head, 1 MiB of body, 10 s to send a request head.
pub const DEFAULT_MAX_HEAD: usize = 16 * 1024;
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
pub const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// What a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head (request line and headers), bytes. Over it: 431.
    pub max_head: usize,
    /// Largest request body (IN), bytes. Over it: 413.
    pub max_body: usize,
    /// Time a client has to send a complete request head, counted from the connection (or
    /// the previous response). Over it: 408 if part of a head arrived, else a quiet close.
    pub head_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: DEFAULT_MAX_HEAD,
            max_body: DEFAULT_MAX_BODY,
            head_timeout: DEFAULT_HEAD_TIMEOUT,
        }
    }
}

/// A request with its whole body.
pub struct Request {
    pub parts: http::request::Parts,
    pub body: Bytes,
    pub remote: SocketAddr,
}

/// A response body: all at once, or chunks sent as the handler produces them (closing the
/// sender ends the body).
pub enum Body {
    Full(Option<Bytes>),
    Chunks(mpsc::Receiver<Bytes>),
}

impl Body {
    pub fn full(b: impl Into<Bytes>) -> Body {
        let b = b.into();
        Body::Full((!b.is_empty()).then_some(b))
    }

    /// A streamed body and the sender that feeds it (`capacity` chunks may wait unsent).
    pub fn channel(capacity: usize) -> (mpsc::Sender<Bytes>, Body) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (tx, Body::Chunks(rx))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Chunks(rx) => rx.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Chunks(_) => SizeHint::default(),
        }
    }
}

pub type Reply = Response<Body>;

/// A plain-text response with `status`.
pub fn text(status: StatusCode, body: &str) -> Reply {
    let mut r = Response::new(Body::full(Bytes::copy_from_slice(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The same with `connection: close`, for refusals after which the rest of the stream
/// cannot be trusted (an unread body).
fn refusal(status: StatusCode, body: &str) -> Reply {
    let mut r = text(status, body);
    r.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// The future a handler returns: `Err(())` = the handler failed and logged why; the client
/// gets a bare 500.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Reply, ()>>>>;
pub type Handler = Rc<dyn Fn(Request) -> HandlerFuture>;

/// One listener's serving rules.
pub struct Server {
    pub limits: Limits,
    pub handler: Handler,
    /// The log target (the instance's name).
    pub log: Rc<str>,
}

/// Bytes read on a connection, and how many had been read when the last response was
/// ready: more than that at a head timeout means a client stalled halfway through a head.
#[derive(Default)]
struct ConnState {
    read: Cell<u64>,
    mark: Cell<u64>,
    /// HTTP/1: the bytes read since the head of the last request (at most `WINDOW`), where
    /// `conflicting_lengths` looks for the head of the next one. hyper drops a
    /// `content-length` sent with `transfer-encoding` before the service sees the request,
    /// so the raw head is the only place the smuggling attempt is visible.
    window: Option<RefCell<Vec<u8>>>,
}

/// The most bytes kept for the head check: beyond hyper's read buffer, so the head of the
/// request being served is always still there.
const WINDOW: usize = 256 * 1024;

impl ConnState {
    fn saw(&self, bytes: &[u8]) {
        let Some(w) = &self.window else { return };
        let mut w = w.borrow_mut();
        let keep = bytes.len().min(WINDOW);
        let over = (w.len() + keep).saturating_sub(WINDOW);
        w.drain(..over);
        w.extend_from_slice(&bytes[bytes.len() - keep..]);
    }

    /// Finds the head of the request `method target` (the first one not looked at yet, so
    /// pipelined requests are matched in order), forgets the bytes up to its end, and says
    /// whether it carried both `content-length` and `transfer-encoding`.
    fn conflicting_lengths(&self, method: &str, target: &str) -> bool {
        let Some(w) = &self.window else { return false };
        let mut w = w.borrow_mut();
        let line = format!("{method} {target} HTTP/1.");
        let Some(start) = find(&w, line.as_bytes()) else {
            return false;
        };
        let Some(end) = find(&w[start..], b"\r\n\r\n").map(|e| start + e + 4) else {
            return false;
        };
        let (mut cl, mut te) = (false, false);
        for l in w[start..end].split(|&b| b == b'\n').skip(1) {
            let name = |n: &[u8]| l.len() > n.len() && l[..n.len()].eq_ignore_ascii_case(n);
            cl |= name(b"content-length:");
            te |= name(b"transfer-encoding:");
        }
        w.drain(..end);
        cl && te
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The connection's stream behind a shared handle, so that the 408 can still be written
/// after hyper gave up on the connection; it also counts the bytes read.
struct Shared<S> {
    io: Rc<RefCell<S>>,
    state: Rc<ConnState>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Shared<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.io.borrow_mut()).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.state.read.set(self.state.read.get() + n as u64);
        self.state.saw(&buf.filled()[before..]);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Shared<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.io.borrow_mut()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.io.borrow_mut()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.borrow().is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io.borrow_mut()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io.borrow_mut()).poll_shutdown(cx)
    }
}

/// Runs HTTP/2's per-stream tasks on the current thread's `LocalSet`.
#[derive(Clone, Copy)]
struct LocalExec;

impl<F: Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// Serves one connection until it closes: HTTP/2 when `h2` (ALPN chose it), else HTTP/1.1
/// with keep-alive and pipelining. Must run inside a `LocalSet`.
pub async fn serve<S>(server: Rc<Server>, io: S, remote: SocketAddr, h2: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let state = Rc::new(ConnState {
        window: (!h2).then(RefCell::default),
        ..ConnState::default()
    });
    let io = Rc::new(RefCell::new(io));
    let shared = TokioIo::new(Shared {
        io: io.clone(),
        state: state.clone(),
    });
    let svc = {
        let server = server.clone();
        let state = state.clone();
        service_fn(move |req: HttpRequest<Incoming>| {
            let server = server.clone();
            let state = state.clone();
            async move {
                let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
                if state.conflicting_lengths(req.method().as_str(), target) {
                    log::warn!(target: &*server.log, "http {remote}: {} {}: content-length and transfer-encoding together \
                        (a request smuggling attempt?): the chunked body is used and the connection closed after the answer",
                        req.method(), req.uri().path());
                }
                let reply = handle(&server, req, remote).await;
                state.mark.set(state.read.get());
                Ok::<_, Infallible>(reply)
            }
        })
    };
    let limits = server.limits;
    let result = if h2 {
        http2::Builder::new(LocalExec)
            .timer(TokioTimer::new())
            .max_header_list_size(limits.max_head.min(u32::MAX as usize) as u32)
            .max_concurrent_streams(128)
            .serve_connection(shared, svc)
            .await
    } else {
        http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.head_timeout)
            .max_header_size(limits.max_head)
            .max_buf_size((limits.max_head + 8192).max(64 * 1024))
            .serve_connection(shared, svc)
            .await
    };
    let Err(e) = result else {
        linger(Shared { io, state }).await;
        return;
    };
    let log = &*server.log;
    if e.is_timeout() {
        if state.read.get() > state.mark.get() {
            log::warn!(target: log, "http {remote}: 408, no complete request head within {} ms", limits.head_timeout.as_millis());
            // hyper has let go of the stream; answer through the shared handle, briefly.
            let mut s = Shared { io, state };
            let msg = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
            let _ = tokio::time::timeout(Duration::from_secs(1), s.write_all(msg)).await;
            linger(s).await;
            return;
        } else {
            log::debug!(target: log, "http {remote}: idle keep-alive connection closed after {} ms", limits.head_timeout.as_millis());
        }
    } else if e.is_parse_too_large() {
        log::warn!(target: log, "http {remote}: 431, request head over {} bytes", limits.max_head);
    } else if e.is_parse() || e.is_parse_status() {
        log::warn!(target: log, "http {remote}: 400, bad request: {e}");
    } else if e.is_incomplete_message() || e.is_canceled() || is_reset(&e) {
        log::debug!(target: log, "http {remote}: connection ended: {e}");
    } else {
        log::warn!(target: log, "http {remote}: connection closed: {e}");
    }
    linger(Shared { io, state }).await;
}

/// Closes our side and reads what the client still sends for a moment before the socket is
/// dropped: closing with unread input makes the kernel send a reset, which can destroy the
/// response (a 413 or 431) before the client reads it.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(mut s: Shared<S>) {
    use tokio::io::AsyncReadExt;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = s.shutdown().await;
        let mut buf = [0u8; 4096];
        let mut left = 1usize << 20;
        while left > 0 {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

fn is_reset(e: &hyper::Error) -> bool {
    use std::error::Error;
    let mut src = e.source();
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            );
        }
        src = s.source();
    }
    false
}

/// Reads the body within the limit, runs the handler, and maps failures to statuses.
async fn handle(server: &Server, req: HttpRequest<Incoming>, remote: SocketAddr) -> Reply {
    let log = &*server.log;
    let max = server.limits.max_body;
    let (parts, body) = req.into_parts();
    if body.size_hint().lower() > max as u64 {
        // Refused before reading: no `100 Continue` is sent, and hyper closes the
        // connection rather than read the body it was announced.
        log::warn!(target: log, "http {remote}: 413, {} {}: content-length {} over IN limit {max}",
            parts.method, parts.uri.path(), body.size_hint().lower());
        return refusal(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
    }
    let body = if body.is_end_stream() {
        Bytes::new()
    } else {
        match http_body_util::Limited::new(body, max).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                log::warn!(target: log, "http {remote}: 413, {} {}: body over IN limit {max}", parts.method, parts.uri.path());
                return refusal(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
            }
            Err(e) => {
                log::warn!(target: log, "http {remote}: 400, {} {}: body not read: {e}", parts.method, parts.uri.path());
                return refusal(StatusCode::BAD_REQUEST, "bad request body\n");
            }
        }
    };
    match (server.handler)(Request { parts, body, remote }).await {
        Ok(r) => r,
        Err(()) => text(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n"),
    }
}

/// Splits `a=1&b=x%20y` into decoded pairs (`+` is a space, as forms send it). Bytes that
/// are not valid UTF-8 after decoding are kept as they are (lossy).
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// `%XX` and `+` decoding (query strings); a malformed escape is kept literally.
pub fn percent_decode(s: &str) -> String {
    decode(s, true)
}

/// `%XX` decoding of a path (`+` stays `+`).
pub fn percent_decode_path(s: &str) -> String {
    if !s.contains('%') {
        return s.to_string();
    }
    decode(s, false)
}

fn decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A server on a thread of its own (the metrics and admin endpoints): a current-thread
/// runtime and `LocalSet` serving every connection of `listener` with the handler `make`
/// builds there. Stops when the handle is dropped or `stop` is called.
pub struct ServerThread {
    pub addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    /// Stops accepting and waits for the thread (open connections are dropped).
    pub fn stop(&mut self) {
        self.stop.send_replace(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts a `ServerThread` named `name` on `listener` (plain HTTP/1.1).
pub fn spawn_thread<F>(
    name: &str,
    listener: std::net::TcpListener,
    limits: Limits,
    make: F,
) -> std::io::Result<ServerThread>
where
    F: FnOnce() -> Handler + Send + 'static,
{
    spawn_thread_with(name, listener, limits, move || (make(), None))
}

/// A connection taken over before HTTP is served (a WebSocket upgrade on one path).
pub type Takeover = Rc<dyn Fn(tokio::net::TcpStream, SocketAddr) -> Pin<Box<dyn Future<Output = ()>>>>;

/// Whether a connection's first bytes are a `GET` of `path` (exactly, or with a query).
async fn requests_path(tcp: &tokio::net::TcpStream, path: &str) -> bool {
    let want = format!("GET {path}");
    let mut buf = vec![0u8; want.len() + 1];
    let deadline = tokio::time::Instant::now() + DEFAULT_HEAD_TIMEOUT;
    loop {
        let n = match tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return false,
        };
        if n == 0 || !want.as_bytes().starts_with(&buf[..n.min(want.len())]) {
            return false;
        }
        if n > want.len() {
            return matches!(buf[want.len()], b' ' | b'?');
        }
        // Part of the request line so far: wait for more.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// As `spawn_thread`; `make` may also name a path whose connections go to a `Takeover`
/// instead of HTTP (the admin API's `/events` WebSocket).
pub fn spawn_thread_with<F>(
    name: &str,
    listener: std::net::TcpListener,
    limits: Limits,
    make: F,
) -> std::io::Result<ServerThread>
where
    F: FnOnce() -> (Handler, Option<(String, Takeover)>) + Send + 'static,
{
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let name = name.to_string();
    let thread = std::thread::Builder::new().name(name.clone()).spawn(move || {
        let log: Rc<str> = name.into();
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                log::error!("{log}: cannot start its runtime: {e}");
                return;
            }
        };
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    log::error!("{log}: {e}");
                    return;
                }
            };
            let (handler, takeover) = make();
            let takeover = takeover.map(|(p, t)| (Rc::<str>::from(p), t));
            let server = Rc::new(Server {
                limits,
                handler,
                log: log.clone(),
            });
            loop {
                tokio::select! {
                    r = listener.accept() => match r {
                        Ok((tcp, peer)) => {
                            let _ = tcp.set_nodelay(true);
                            let server = server.clone();
                            let takeover = takeover.clone();
                            tokio::task::spawn_local(async move {
                                if let Some((path, t)) = takeover {
                                    if requests_path(&tcp, &path).await {
                                        return t(tcp, peer).await;
                                    }
                                }
                                serve(server, tcp, peer, false).await
                            });
                        }
                        Err(e) => {
                            log::warn!(target: &log, "accept: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                    _ = stopped.wait_for(|s| *s) => break,
                }
            }
        });
    })?;
    Ok(ServerThread {
        addr,
        stop,
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use tokio::net::TcpListener;

    #[test]
    fn queries() {
        assert_eq!(
            parse_query("a=1&b=x%20y&c&d=%zz&e=a+b&&f=%41"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x y".into()),
                ("c".into(), "".into()),
                ("d".into(), "%zz".into()),
                ("e".into(), "a b".into()),
                ("f".into(), "A".into()),
            ]
        );
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
        assert_eq!(percent_decode_path("/a+b%2Fc"), "/a+b/c");
    }

    /// A server on a thread of its own whose handler echoes method, path and body size,
    /// fails for `/fail` and streams for `/stream`.
    fn start(limits: Limits) -> u16 {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(l.local_addr().unwrap().port()).unwrap();
                let handler: Handler = Rc::new(|req: Request| {
                    Box::pin(async move {
                        match req.parts.uri.path() {
                            "/fail" => Err(()),
                            "/stream" => {
                                let (tx, body) = Body::channel(2);
                                tokio::task::spawn_local(async move {
                                    for i in 0..3 {
                                        let _ = tx.send(Bytes::from(format!("part{i};"))).await;
                                    }
                                });
                                Ok(Response::new(body))
                            }
                            p => Ok(text(
                                StatusCode::OK,
                                &format!("{} {} {}", req.parts.method, p, req.body.len()),
                            )),
                        }
                    }) as HandlerFuture
                });
                let server = Rc::new(Server {
                    limits,
                    handler,
                    log: "test".into(),
                });
                loop {
                    let (s, peer) = l.accept().await.unwrap();
                    tokio::task::spawn_local(serve(server.clone(), s, peer, false));
                }
            });
        });
        rx.recv().unwrap()
    }

    fn raw(port: u16, req: &[u8]) -> String {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(req).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn pipelined_requests_are_answered_in_order() {
        let port = start(Limits::default());
        let r = raw(
            port,
            b"GET /a HTTP/1.1\r\nhost: x\r\n\r\nPOST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabcGET /c HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        );
        let a = r.find("GET /a 0").expect(&r);
        let b = r.find("POST /b 3").expect(&r);
        let c = r.find("GET /c 0").expect(&r);
        assert!(a < b && b < c, "{r}");
    }

    #[test]
    fn limits_answer_with_statuses() {
        let port = start(Limits {
            max_head: 1024,
            max_body: 10,
            head_timeout: Duration::from_millis(300),
        });
        // Head over the limit.
        let big = format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "a".repeat(2000));
        let r = raw(port, big.as_bytes());
        assert!(r.starts_with("HTTP/1.1 431"), "{r:?}");
        // Announced body over IN: refused without reading it.
        let r = raw(port, b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 11\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 413"), "{r}");
        // Chunked body over IN.
        let r = raw(
            port,
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n6\r\nabcdef\r\n6\r\nghijkl\r\n0\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 413"), "{r}");
        // A chunked body within IN.
        let r = raw(
            port,
            b"POST /ok HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
        );
        assert!(r.contains("POST /ok 7"), "{r}");
        // Half a head, then silence: 408.
        let r = raw(port, b"GET / HTTP/1.1\r\nhost:");
        assert!(r.starts_with("HTTP/1.1 408"), "{r}");
        // Silence from the start: closed without a word.
        assert_eq!(raw(port, b""), "");
        // Handler failure: a bare 500.
        let r = raw(
            port,
            b"GET /fail HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        );
        assert!(
            r.starts_with("HTTP/1.1 500") && r.ends_with("internal server error\n"),
            "{r}"
        );
        // Garbage.
        assert!(raw(port, b"\x16\x03\x01 hello\r\n\r\n").starts_with("HTTP/1.1 400"));
    }

    #[test]
    fn smuggling_is_not_served() {
        let port = start(Limits::default());
        // Content-Length and Transfer-Encoding together: chunked wins, the connection is
        // closed after the answer, and the request hidden in the body is never served.
        let r = raw(
            port,
            b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 30\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
        );
        assert!(r.contains("POST /a 0"), "{r}");
        assert!(r.contains("connection: close"), "{r}");
        assert!(!r.contains("smuggled"), "{r}");
    }

    #[test]
    fn conflicting_lengths_are_seen_in_the_raw_head() {
        let st = ConnState {
            window: Some(RefCell::default()),
            ..ConnState::default()
        };
        // Pipelined: the first head is honest, the second has both (any case, any order).
        st.saw(b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcPOST /a HTTP/1.1\r\ncontent-length: 3\r\n");
        st.saw(b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
        assert!(!st.conflicting_lengths("POST", "/a"));
        assert!(st.conflicting_lengths("POST", "/a"));
        assert!(!st.conflicting_lengths("POST", "/a"));
        st.saw(b"PUT /b?x=1 HTTP/1.1\r\ntransfer-encoding: chunked\r\nCONTENT-LENGTH: 9\r\n\r\n");
        assert!(st.conflicting_lengths("PUT", "/b?x=1"));
        // A body that looks like headers is not a head.
        st.saw(b"POST /c HTTP/1.1\r\ncontent-length: 40\r\n\r\ntransfer-encoding: chunked\r\n\r\n");
        assert!(!st.conflicting_lengths("POST", "/c"));
        // The window is bounded.
        st.saw(&vec![b'x'; 2 * WINDOW]);
        assert_eq!(st.window.as_ref().unwrap().borrow().len(), WINDOW);
        // HTTP/2 keeps no window.
        assert!(!ConnState::default().conflicting_lengths("POST", "/a"));
    }

    #[test]
    fn streamed_body_is_chunked() {
        let port = start(Limits::default());
        let r = raw(
            port,
            b"GET /stream HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        );
        assert!(r.contains("transfer-encoding: chunked"), "{r}");
        assert!(r.contains("part0;") && r.contains("part2;"), "{r}");
    }
}
