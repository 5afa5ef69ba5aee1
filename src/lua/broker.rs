//! The `broker` module: listeners (`broker.ready`), outgoing connections (`broker.join`) and
//! the socket objects scripts talk through. Every socket lives on the runtime of the instance
//! that opened it: a connection's task (`run_tcp`) reads into its `net::conn::FrameReader`,
//! cuts frames, decodes them (`bson_lua`), calls the script, encodes the replies into its
//! `net::conn::OutBuf` and writes them — no thread hop per frame. The byte handling (buffers,
//! limits, framing) is Lua-free in `net/`; this file converts and calls scripts. Sockets are registered per instance by id; ids are
//! unique in the process, so an id of another instance is simply not found here.

use crate::host::{call_callback, ctx};
use crate::lua::bson as bson_lua;
use crate::net::conn::{FrameReader, OutBuf, OutError};
use crate::net::crypto::Cipher;
use crate::net::framing::{datagram_frame, is_encrypted, Framing};
use crate::net::uri::{self, Endpoint, Proto};
use crate::net::{addr, sock};
use mlua::{Function, Lua, MultiValue, Table, Value, Variadic};
use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Notify;
use tokio::task::{spawn_local, AbortHandle};
use tokio::time::Instant;

/// `tls://`, `ws://`, `wss://`: connections whose task owns a TLS or WebSocket stream (a
/// child module, so it drives `Conn` without widening what this file exposes).
#[path = "broker_ws.rs"]
mod ws;

/// `errno` values STAGE hands to `close` callbacks.
const ETIMEDOUT: i32 = libc::ETIMEDOUT;

/// How long `broker.join` waits for the connection by default (STAGE's `EXPIRE_TIME`).
const JOIN_TIMEOUT_MS: u64 = 3000;

/// Socket ids are unique in the process (not only per instance), so that an id handed to
/// another instance can never name a different socket there.
static NEXT_ID: AtomicI64 = AtomicI64::new(1);

/// The most frames handed to the script in one call.
const MAX_BATCH: usize = 64;

/// Calls `f(socket, frame)` for each frame of a batch, inside ONE coroutine: per frame an
/// `xpcall` with the same traceback handler as `instance::call_callback` (an error affects
/// only that frame), and a non-nil return value committed at once, so replies keep their
/// order with the script's own `socket.commit` calls. Errors come back as a list to log.
/// One coroutine per batch instead of one per frame is what the echo benchmark's profile
/// asked for; a handler that yields (waits) still works, it just holds the rest of its batch.
const BATCH_RUNNER: &str = r#"
-- Receives Lua's raw xpcall and the instance's error handler (see instance.rs): the
-- scripts' global xpcall is a wrapper that costs a closure per call; and the time
-- budget's `enter` (host/budget.rs).
local xpcall, handler, enter = ...
local tostring = tostring
return function(f, socket, batch, n, reply)
    enter()
    local errs
    for i = 1, n do
        local data = batch[i]
        batch[i] = nil
        local ok, r = xpcall(f, handler, socket, data)
        if not ok then
            errs = errs or {}
            errs[#errs + 1] = "error in receive: " .. tostring(r)
        elseif r ~= nil then
            local e = reply(r)
            if e then
                errs = errs or {}
                errs[#errs + 1] = "socket " .. tostring(socket.id) .. ": reply not sent: " .. e
            end
        end
    end
    return errs
end
"#;

pub(crate) fn next_id() -> i64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Field names looked up on the hot path, interned once (a `&str` key would be hashed
/// into a new Lua string on every lookup).
struct Keys {
    receive: mlua::String,
    commit: mlua::String,
    expire: mlua::String,
    /// `BATCH_RUNNER`'s batch loop, compiled once per instance, and the instance's
    /// one-call runner (`instance::xpcall_runner`), kept here to skip a registry lookup.
    batch_runner: Option<Function>,
    runner: Option<Function>,
    /// The metatable of socket and port tables: `crypto`, `errno`, `close` (see `socket_meta`).
    meta: Option<Table>,
}

/// The broker state of one instance (Lua app data).
struct Broker {
    keys: Rc<Keys>,
    conns: RefCell<HashMap<i64, Rc<Conn>>>,
    /// Listening ports: id -> (port table, accept loop).
    ports: RefCell<HashMap<i64, (Table, AbortHandle)>>,
    /// The socket `broker.signal(addr, v)` sends from, bound on first use.
    udp_out: RefCell<Option<Rc<UdpSocket>>>,
    /// `port.crypto` of listening ports, handed to the connections they accept (as STAGE).
    port_crypto: RefCell<HashMap<i64, Cipher>>,
}

fn broker(lua: &Lua) -> Rc<Broker> {
    if let Some(b) = lua.app_data_ref::<Rc<Broker>>() {
        return b.clone();
    }
    let key = |k: &str| lua.create_string(k).expect("a short Lua string");
    let runners = (|| -> mlua::Result<(Function, Function)> {
        let batch = lua.load(BATCH_RUNNER).set_name("=broker").call((
            crate::host::callback::raw_xpcall(lua)?,
            crate::host::callback::error_handler(lua)?,
            crate::host::budget::enter(lua)?,
        ))?;
        Ok((batch, crate::host::callback::xpcall_runner(lua)?))
    })();
    let runners = match runners {
        Ok(r) => Some(r),
        Err(e) => {
            log::error!("broker: cannot compile its runner: {e}");
            None
        }
    };
    let meta = match socket_meta(lua) {
        Ok(m) => Some(m),
        Err(e) => {
            log::error!("broker: cannot make the socket metatable: {e}");
            None
        }
    };
    let b = Rc::new(Broker {
        keys: Rc::new(Keys {
            receive: key("receive"),
            commit: key("commit"),
            expire: key("expire"),
            batch_runner: runners.as_ref().map(|r| r.0.clone()),
            runner: runners.map(|r| r.1),
            meta,
        }),
        conns: RefCell::default(),
        ports: RefCell::default(),
        udp_out: RefCell::default(),
        port_crypto: RefCell::default(),
    });
    lua.set_app_data(b.clone());
    b
}

/// The metatable of socket and port tables, for the fields STAGE computes rather than
/// stores (a plain table keeps user fields and `commit` raw, so the hot path pays nothing):
/// * `socket.crypto = key | {["AES/CBC/PKCS5Padding"] = key} | nil` sets the socket's (or a
///   port's, for the connections it accepts) cipher; reading `crypto` gives whether one is set;
/// * `socket.errno` is the socket's last error (0 when none);
/// * `socket.close = function (socket, errno) ... end` sets the close callback, while
///   `socket.close()` still closes, as in STAGE.
fn socket_meta(lua: &Lua) -> mlua::Result<Table> {
    let meta = lua.create_table()?;
    let noop = lua.create_function(|_, ()| Ok(()))?;
    meta.raw_set(
        "__index",
        lua.create_function(move |lua, (t, k): (Table, Value)| {
            let Value::String(k) = k else {
                return Ok(Value::Nil);
            };
            let id: Option<i64> = t.raw_get("id")?;
            let b = broker(lua);
            let conn = id.and_then(|id| b.conns.borrow().get(&id).cloned());
            Ok(match &*k.as_bytes() {
                b"crypto" => Value::Boolean(match &conn {
                    Some(c) => c.crypto.borrow().is_some(),
                    None => id.is_some_and(|id| b.port_crypto.borrow().contains_key(&id)),
                }),
                b"errno" => Value::Integer(conn.map(|c| c.errno.get() as i64).unwrap_or(0)),
                b"close" => match conn {
                    Some(c) => c
                        .close_fn
                        .borrow()
                        .clone()
                        .map(Value::Function)
                        .unwrap_or(Value::Nil),
                    // A port's `close` is its callback (a raw field once set).
                    None if id.is_some_and(|id| b.ports.borrow().contains_key(&id)) => Value::Nil,
                    // A closed socket: closing it again does nothing.
                    None => Value::Function(noop.clone()),
                },
                _ => Value::Nil,
            })
        })?,
    )?;
    meta.raw_set(
        "__newindex",
        lua.create_function(|lua, (t, k, v): (Table, Value, Value)| {
            let name = match &k {
                Value::String(s) => s.to_str()?.to_string(),
                _ => return t.raw_set(k, v),
            };
            let id: Option<i64> = t.raw_get("id")?;
            let b = broker(lua);
            let conn = id.and_then(|id| b.conns.borrow().get(&id).cloned());
            match name.as_str() {
                "crypto" => {
                    let cipher = match &v {
                        Value::Nil => None,
                        v => Some(cipher_of("socket.crypto", v)?),
                    };
                    match (conn, id) {
                        (Some(c), _) => *c.crypto.borrow_mut() = cipher,
                        (None, Some(id)) if b.ports.borrow().contains_key(&id) => {
                            let mut pc = b.port_crypto.borrow_mut();
                            match cipher {
                                Some(c) => pc.insert(id, c),
                                None => pc.remove(&id),
                            };
                        }
                        _ => {}
                    }
                    Ok(())
                }
                "errno" => Err(mlua::Error::runtime("socket.errno is read-only")),
                "close" if conn.is_some() => match v {
                    Value::Function(f) => {
                        *conn.unwrap().on_close.borrow_mut() = Some(f);
                        Ok(())
                    }
                    Value::Nil => {
                        *conn.unwrap().on_close.borrow_mut() = None;
                        Ok(())
                    }
                    other => Err(mlua::Error::runtime(format!(
                        "socket.close: expected a function (the close callback), got a {}",
                        other.type_name()
                    ))),
                },
                _ => t.raw_set(k, v),
            }
        })?,
    )?;
    Ok(meta)
}

enum Kind {
    /// The stream is shared with the connection's task so that `commit` can write early
    /// when output piles up (a non-blocking `try_write`). Empty while `broker.join` connects.
    Tcp(OnceCell<Rc<TcpStream>>),
    Udp {
        sock: Rc<UdpSocket>,
        /// Where a reply without an address goes: the connected peer or the last sender.
        peer: Cell<Option<SocketAddr>>,
    },
    /// TLS or WebSocket (`ws`): the connection's task owns the stream and writes `out`.
    Task { ws: bool },
}

/// One connection (TCP) or bound/connected UDP socket.
struct Conn {
    id: i64,
    framing: Framing,
    /// The BSON array mapping of the port (`&stage`: STAGE's).
    mode: bson_lua::Mode,
    max_in: usize,
    peer: Cell<Option<SocketAddr>>,
    /// `socket.crypto`: frames of tables are sent encrypted, encrypted frames are opened.
    crypto: RefCell<Option<Cipher>>,
    /// `socket.errno`: the last error (connect, read, write; ETIMEDOUT on expire).
    errno: Cell<i32>,
    /// `socket.close = f`: called with `(socket, errno)` when the socket closes.
    on_close: RefCell<Option<Function>>,
    /// The `socket.close()` method.
    close_fn: RefCell<Option<Function>>,
    /// The script's socket object.
    table: Table,
    /// The listening port's table (for `receive`, `close`, `expire`, `commit`), if accepted.
    port: Option<Table>,
    /// The receive function returned by `accept` / `on_connect`.
    handler: RefCell<Option<Function>>,
    kind: Kind,
    /// Framed, unsent output (TCP).
    out: RefCell<OutBuf>,
    /// Wakes the connection task: output was queued or a close was asked for.
    wake: Notify,
    closing: RefCell<Option<String>>,
    keys: Rc<Keys>,
    /// Frames being handed to the script (reused; the runner clears each slot it takes).
    batch: Table,
    /// `commit` for the batch runner: returns an error message instead of raising.
    reply: RefCell<Option<Function>>,
    /// True while the connection's own task is handling frames: it writes the replies
    /// itself afterwards, so commits need not wake it.
    in_task: Cell<bool>,
    /// False while `accept` has not accepted it: a refused connection gets no `port.close`.
    accepted: Cell<bool>,
    /// The close is the peer's fault (bad input, back-pressure): logged as a warning.
    bad: RefCell<bool>,
    /// Counters of an accepted TCP connection (`#metrics`), per port and instance.
    metrics: Option<crate::metrics::ConnMetrics>,
}

impl Conn {
    fn is_closing(&self) -> bool {
        self.closing.borrow().is_some()
    }

    fn close(&self, reason: &str) {
        let mut c = self.closing.borrow_mut();
        if c.is_none() {
            *c = Some(reason.to_string());
        }
        drop(c);
        self.wake.notify_one();
    }

    /// Closes because of the peer (bad input, back-pressure): logged as a warning.
    fn close_bad(&self, reason: &str) {
        self.close(reason);
        *self.bad.borrow_mut() = true;
    }

    /// Where frames go: the accept/on_connect function, else `port.receive`, else
    /// `socket.receive`.
    fn receiver(&self) -> Option<Function> {
        if let Some(f) = self.handler.borrow().as_ref() {
            return Some(f.clone());
        }
        if let Some(p) = &self.port {
            if let Ok(Some(f)) = p.raw_get::<Option<Function>>(&self.keys.receive) {
                return Some(f);
            }
        }
        self.table
            .raw_get::<Option<Function>>(&self.keys.receive)
            .ok()
            .flatten()
    }

    /// The idle timeout of an accepted connection: `port.expire` in ms, `#limits.idle`
    /// when the port does not set it, none when it is 0 or negative.
    fn expire_ms(&self, idle: u64) -> Option<u64> {
        let port = self.port.as_ref()?;
        match port.raw_get::<Value>(&self.keys.expire).ok()? {
            Value::Integer(i) if i > 0 => Some(i as u64),
            Value::Number(n) if n > 0.0 => Some(n as u64),
            Value::Nil => Some(idle).filter(|ms| *ms > 0),
            _ => None,
        }
    }

    fn port_ms(&self, field: &mlua::String) -> Option<u64> {
        let v: Value = self.port.as_ref()?.raw_get(field).ok()?;
        let ms = match v {
            Value::Integer(i) => i as f64,
            Value::Number(n) => n,
            _ => return None,
        };
        (ms > 0.0).then_some(ms as u64)
    }

    /// Frames `v` into `out` per the framing. Returns the bytes queued. As STAGE: a table is
    /// a BSON document (encrypted with `socket.crypto` on `bson`/`packet` sockets), a string
    /// goes as its bytes.
    fn frame_value(&self, lua: &Lua, v: &Value, out: &mut OutBuf) -> mlua::Result<usize> {
        if let Some(m) = &self.metrics {
            m.frames_out.inc();
        }
        match (self.framing, v) {
            (Framing::Bson | Framing::Packet, Value::Table(_)) if self.crypto.borrow().is_some() => {
                let doc = bson_lua::encode_vec_with(lua, v, self.mode).map_err(mlua::Error::runtime)?;
                let crypto = self.crypto.borrow();
                let cipher = crypto.as_ref().expect("checked above");
                out.put_with(|b| {
                    cipher.seal_frame(&doc, b);
                    Ok::<(), mlua::Error>(())
                })
            }
            (Framing::Bson | Framing::Packet | Framing::Raw, Value::Table(_)) => out
                .put_with(|b| bson_lua::encode_with(lua, v, b, self.mode))
                .map_err(mlua::Error::runtime),
            (Framing::Text, Value::Table(_)) => {
                crate::lua::value::check_depth(v)
                    .map_err(|e| mlua::Error::runtime(format!("socket.commit: {e}")))?;
                out.put_with(|b| serde_json::to_writer(b, v))
                    .map_err(|e| mlua::Error::runtime(format!("socket.commit: {e}")))
            }
            (_, Value::String(s)) => Ok(out.put_frame(&s.as_bytes())),
            (f, Value::Integer(_) | Value::Number(_)) if !f.is_bson() => {
                Ok(out.put_frame(v.to_string()?.as_bytes()))
            }
            (f, other) => Err(mlua::Error::runtime(format!(
                "socket.commit: cannot send a {} on a {} socket (expected a table or a string)",
                other.type_name(),
                f.name()
            ))),
        }
    }

    /// `socket.commit(v [, addr])`: queues (TCP) or sends (UDP) one frame.
    fn commit(&self, lua: &Lua, v: &Value, addr: Option<SocketAddr>) -> mlua::Result<usize> {
        if self.is_closing() {
            return Ok(0);
        }
        match &self.kind {
            Kind::Tcp(stream) => {
                let mut out = self.out.borrow_mut();
                let n = self.frame_value(lua, v, &mut out)?;
                // Before `broker.join` has connected, output waits (within OUT).
                if let Some(stream) = stream.get().filter(|_| out.wants_flush()) {
                    // Replies are normally written once per read batch (fewer syscalls);
                    // when they pile up towards OUT, write what the socket takes now.
                    drop(out);
                    if let Err(e) = flush(self, stream) {
                        self.close_bad(&e.to_string());
                        return Ok(0);
                    }
                    out = self.out.borrow_mut();
                }
                if let Some(e) = out.overflow() {
                    // Back-pressure: close rather than let memory grow without bound.
                    drop(out);
                    self.close_bad(&e.to_string());
                    return Ok(0);
                }
                drop(out);
                if !self.in_task.get() {
                    self.wake.notify_one();
                }
                Ok(n)
            }
            Kind::Task { ws } => ws::commit(self, lua, v, *ws),
            Kind::Udp { sock, peer } => {
                let Some(to) = addr.or(peer.get()) else {
                    return Err(mlua::Error::runtime(
                        "socket.commit: a udp socket needs an address (no peer yet)",
                    ));
                };
                let mut buf = OutBuf::new(self.framing, usize::MAX);
                self.frame_value(lua, v, &mut buf)?;
                Ok(udp_send(sock, buf.bytes(), to))
            }
        }
    }
}

/// Sends one datagram with a direct non-blocking `sendto`: tokio's `try_send_to` refuses
/// until the reactor has seen the socket writable once. A full socket buffer drops the
/// datagram (UDP semantics); returns the bytes sent, 0 when dropped.
fn udp_send(sock: &UdpSocket, buf: &[u8], to: SocketAddr) -> usize {
    socket2::SockRef::from(sock).send_to(buf, &to.into()).unwrap_or(0)
}

pub fn open(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("ready", lua.create_async_function(ready)?)?;
    t.set("join", lua.create_async_function(join)?)?;
    t.set("close", lua.create_function(close)?)?;
    t.set(
        "f",
        lua.create_function(|lua, id: i64| Ok(find(lua, id).map(|c| c.table.clone())))?,
    )?;
    t.set("signal", lua.create_function(signal)?)?;
    t.set("submit", lua.create_function(submit)?)?;
    t.set("ntoa", lua.create_function(ntoa)?)?;
    t.set("aton", lua.create_async_function(aton)?)?;
    t.set("ifaddr", lua.create_function(ifaddr)?)?;
    t.set("encrypt", lua.create_function(encrypt)?)?;
    t.set("decrypt", lua.create_function(decrypt)?)?;
    Ok(t)
}

fn find(lua: &Lua, id: i64) -> Option<Rc<Conn>> {
    broker(lua).conns.borrow().get(&id).cloned()
}

/// The failure return of `ready`/`join`: an errno (or -1) and a message.
pub(crate) fn fail(lua: &Lua, errno: Option<i32>, msg: String) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_vec(vec![
        Value::Integer(errno.unwrap_or(-1) as i64),
        Value::String(lua.create_string(msg)?),
    ]))
}

fn addr_string(lua: &Lua, a: Option<SocketAddr>) -> mlua::Result<Value> {
    match a {
        Some(a) => Ok(Value::String(lua.create_string(sock::ntoa(&a))?)),
        None => Ok(Value::Nil),
    }
}

/// Builds the script's socket (or port) object: `id`, `[0]`, `[1]` peer, `[-1]` local, and
/// the metatable of `socket_meta` (`crypto`, `errno`, `close`).
fn socket_table(
    lua: &Lua,
    id: i64,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(3, 4)?;
    t.raw_set("id", id)?;
    t.raw_set(0, id)?;
    t.raw_set(1, addr_string(lua, peer)?)?;
    t.raw_set(-1, addr_string(lua, local)?)?;
    t.set_metatable(broker(lua).keys.meta.clone())?;
    Ok(t)
}

/// Adds `commit` and `close` to a socket table; they hold the connection weakly, so a
/// script keeping the table does not keep a closed connection alive.
fn add_methods(lua: &Lua, conn: &Rc<Conn>) -> mlua::Result<()> {
    let w: Weak<Conn> = Rc::downgrade(conn);
    conn.table.raw_set(
        "commit",
        lua.create_function(move |lua, (v, addr): (Value, Option<String>)| {
            let Some(c) = w.upgrade() else { return Ok(0) };
            let addr = match addr {
                Some(a) => Some(parse_addr(&a)?),
                None => None,
            };
            c.commit(lua, &v, addr)
        })?,
    )?;
    let w: Weak<Conn> = Rc::downgrade(conn);
    *conn.reply.borrow_mut() = Some(lua.create_function(move |lua, v: Value| {
        let Some(c) = w.upgrade() else { return Ok(None) };
        Ok(c.commit(lua, &v, None)
            .err()
            .map(|e| crate::host::script_error::message(&e)))
    })?);
    // `close` is served by the metatable, so that `socket.close = f` can set the callback.
    let w: Weak<Conn> = Rc::downgrade(conn);
    *conn.close_fn.borrow_mut() = Some(lua.create_function(move |_, ()| {
        if let Some(c) = w.upgrade() {
            c.close("closed by the script");
        }
        Ok(())
    })?);
    Ok(())
}

fn parse_addr(s: &str) -> mlua::Result<SocketAddr> {
    sock::parse_addr(s).map_err(mlua::Error::runtime)
}

fn io_fail(lua: &Lua, what: &str, e: std::io::Error) -> mlua::Result<MultiValue> {
    fail(lua, e.raw_os_error(), format!("{what}: {e}"))
}

/// `broker.ready(uri, accept [, options])`: listens; returns the port table, or errno and a
/// message. For `http://` and `https://`, `accept` is the request handler.
async fn ready(lua: Lua, (uri, accept, opts): (String, Function, Option<Table>)) -> mlua::Result<MultiValue> {
    let ep = match uri::parse(&uri) {
        Ok(ep) => ep,
        Err(e) => return fail(&lua, None, e.to_string()),
    };
    let Some(addr) = sock::literal_addr(&ep.host, ep.port) else {
        return fail(
            &lua,
            None,
            format!("broker.ready {uri}: host must be an ip address"),
        );
    };
    let c = ctx(&lua);
    let most = c.node.config.limits.max_in;
    if ep.max_in > most {
        return fail(
            &lua,
            None,
            format!(
                "broker.ready {uri}: IN {} is over #limits.in ({}); raise #limits.in in conf/stage.json to allow it",
                human_size(ep.max_in),
                human_size(most)
            ),
        );
    }
    match ep.proto {
        Proto::Http => {
            let (local, task) =
                match crate::lua::broker_http::listen(&lua, &uri, &ep, addr, accept, opts.as_ref()) {
                    Ok(x) => x,
                    Err((errno, msg)) => return fail(&lua, errno, msg),
                };
            let id = next_id();
            let port = socket_table(&lua, id, None, local)?;
            port.raw_set("port", local.map(|a| a.port()).unwrap_or(0))?;
            broker(&lua).ports.borrow_mut().insert(id, (port.clone(), task));
            Ok(MultiValue::from_vec(vec![Value::Table(port)]))
        }
        Proto::Ws => ws::ready(&lua, &uri, ep, addr, accept, opts.as_ref()),
        Proto::Tcp if ep.tls => ws::ready(&lua, &uri, ep, addr, accept, opts.as_ref()),
        Proto::Tcp => {
            let shared = sock::is_shared(&c.node.config.services_tcp, ep.port);
            let listener = match sock::tcp_listener(addr, shared).and_then(TcpListener::from_std) {
                Ok(l) => l,
                Err(e) => return io_fail(&lua, &format!("broker.ready {uri}"), e),
            };
            let local = listener.local_addr().ok();
            let id = next_id();
            let port = socket_table(&lua, id, None, local)?;
            port.raw_set("port", local.map(|a| a.port()).unwrap_or(0))?;
            let framing = ep.framing;
            let task = spawn_local(accept_loop(lua.clone(), listener, ep, port.clone(), accept));
            broker(&lua)
                .ports
                .borrow_mut()
                .insert(id, (port.clone(), task.abort_handle()));
            log::info!(target: &c.name, "listening on {} ({}{})", local.map(|a| a.to_string()).unwrap_or_default(),
                framing.name(), if shared { ", shared" } else { "" });
            Ok(MultiValue::from_vec(vec![Value::Table(port)]))
        }
        Proto::Udp => {
            let shared = sock::is_shared(&c.node.config.services_udp, ep.port);
            let s = match sock::udp_socket(addr, shared).and_then(UdpSocket::from_std) {
                Ok(s) => Rc::new(s),
                Err(e) => return io_fail(&lua, &format!("broker.ready {uri}"), e),
            };
            let conn = new_udp(&lua, &ep, s, None)?;
            let rets = call_callback(&lua, "accept", &accept, (conn.table.clone(), Value::Nil)).await;
            match rets.as_ref().and_then(|r| r.front()) {
                Some(Value::Function(f)) => *conn.handler.borrow_mut() = Some(f.clone()),
                Some(Value::Boolean(true)) => {}
                _ => {
                    conn.close("refused by accept");
                    return fail(&lua, None, format!("broker.ready {uri}: refused by accept"));
                }
            }
            // A UDP "port" is its socket: `receive` and friends are set on the socket object.
            Ok(MultiValue::from_vec(vec![Value::Table(conn.table.clone())]))
        }
    }
}

fn new_udp(lua: &Lua, ep: &Endpoint, s: Rc<UdpSocket>, peer: Option<SocketAddr>) -> mlua::Result<Rc<Conn>> {
    let id = next_id();
    let table = socket_table(lua, id, peer, s.local_addr().ok())?;
    let kind = Kind::Udp {
        sock: s.clone(),
        peer: Cell::new(peer),
    };
    let conn = new_conn(lua, ep, id, peer, table.clone(), Some(table), kind)?;
    add_methods(lua, &conn)?;
    broker(lua).conns.borrow_mut().insert(id, conn.clone());
    spawn_local(run_udp(lua.clone(), conn.clone(), s));
    Ok(conn)
}

/// `268435456` → `256m`.
fn human_size(n: usize) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}m", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}k", n >> 10),
        n => n.to_string(),
    }
}

async fn accept_loop(lua: Lua, listener: TcpListener, ep: Endpoint, port: Table, accept: Function) {
    let name = ctx(&lua).name.clone();
    let node = ctx(&lua).node.clone();
    let mut draining = node.draining.subscribe();
    let mut refuser = sock::Refuser::new();
    let mut last_error: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            // Draining (SIGTERM): stop accepting; dropping the listener refuses new clients.
            _ = draining.wait_for(|d| *d) => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors: the waiting clients are accepted and closed at
                // once with the reserve descriptor (counted, reported once per 10 s),
                // instead of hanging in the backlog; the open connections keep being served.
                if sock::Refuser::is_fd_limit(&e) {
                    use std::os::fd::AsRawFd;
                    refuser.refuse_waiting(listener.as_raw_fd());
                    if let Some(n) = refuser.report(std::time::Instant::now()) {
                        log::warn!(
                            target: &name,
                            "port {}: {n} connection(s) refused: out of file descriptors ({e}); {} refused in all",
                            ep.port,
                            refuser.total
                        );
                    }
                } else if last_error.is_none_or(|t| t.elapsed() >= sock::REPORT_EVERY) {
                    last_error = Some(Instant::now());
                    log::warn!(target: &name, "accept on port {}: {e}", ep.port);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let lua = lua.clone();
        let port = port.clone();
        let accept = accept.clone();
        let ep = ep.clone();
        spawn_local(async move {
            let conn = match new_tcp(&lua, &ep, Some(stream), Some(port)) {
                Ok(c) => c,
                Err(e) => {
                    log::error!(target: &ctx(&lua).name, "accept {peer}: {e}");
                    return;
                }
            };
            let peer_s = sock::ntoa(&peer);
            let rets = call_callback(&lua, "accept", &accept, (conn.table.clone(), peer_s)).await;
            match rets.as_ref().and_then(|r| r.front()) {
                Some(Value::Function(f)) => *conn.handler.borrow_mut() = Some(f.clone()),
                Some(Value::Boolean(true)) => {}
                _ => {
                    conn.accepted.set(false);
                    conn.close("refused by accept");
                }
            }
            run_tcp(lua, conn).await;
        });
    }
}

/// A TCP socket: accepted (`stream` given, `port` its listener, whose `crypto` it inherits)
/// or being joined (`stream` set by `connect` once connected).
fn new_tcp(
    lua: &Lua,
    ep: &Endpoint,
    stream: Option<TcpStream>,
    port: Option<Table>,
) -> mlua::Result<Rc<Conn>> {
    let id = next_id();
    let peer = stream.as_ref().and_then(|s| s.peer_addr().ok());
    let local = stream.as_ref().and_then(|s| s.local_addr().ok());
    let table = socket_table(lua, id, peer, local)?;
    // Accepted connections count in their port's metrics (joined ones do not).
    let metrics = match (&port, local) {
        (Some(_), Some(local)) => {
            let c = ctx(lua);
            Some(c.node.metrics.connection(local.port(), &c.name))
        }
        _ => None,
    };
    let cell = OnceCell::new();
    if let Some(s) = stream {
        let _ = cell.set(Rc::new(s));
    }
    let b = broker(lua);
    let inherited = match &port {
        Some(p) => p
            .raw_get::<Option<i64>>("id")?
            .and_then(|pid| b.port_crypto.borrow().get(&pid).cloned()),
        None => None,
    };
    let mut conn = new_conn(lua, ep, id, peer, table, port, Kind::Tcp(cell))?;
    if let Some(c) = Rc::get_mut(&mut conn) {
        c.metrics = metrics;
    }
    *conn.crypto.borrow_mut() = inherited;
    add_methods(lua, &conn)?;
    b.conns.borrow_mut().insert(id, conn.clone());
    Ok(conn)
}

/// The state shared by TCP and UDP sockets, fresh: accepted, nothing queued.
fn new_conn(
    lua: &Lua,
    ep: &Endpoint,
    id: i64,
    peer: Option<SocketAddr>,
    table: Table,
    port: Option<Table>,
    kind: Kind,
) -> mlua::Result<Rc<Conn>> {
    Ok(Rc::new(Conn {
        id,
        framing: ep.framing,
        mode: bson_lua::Mode {
            stage_arrays: ep.stage_arrays,
        },
        max_in: ep.max_in,
        peer: Cell::new(peer),
        crypto: RefCell::new(None),
        errno: Cell::new(0),
        on_close: RefCell::new(None),
        close_fn: RefCell::new(None),
        table,
        port,
        handler: RefCell::new(None),
        kind,
        out: RefCell::new(OutBuf::new(ep.framing, ep.max_out)),
        wake: Notify::new(),
        closing: RefCell::new(None),
        accepted: Cell::new(true),
        bad: RefCell::new(false),
        keys: broker(lua).keys.clone(),
        batch: lua.create_table()?,
        reply: RefCell::new(None),
        in_task: Cell::new(false),
        metrics: None,
    }))
}

/// Turns a frame's bytes into the value a script receives, as STAGE: `bson` and `packet`
/// frames are documents decoded into tables (an encrypted one opened with `socket.crypto`
/// first); `text` lines (with their `\n`) and `raw` chunks are strings.
fn decode_frame(lua: &Lua, conn: &Conn, bytes: &[u8]) -> Result<Value, String> {
    if !conn.framing.is_bson() {
        return lua
            .create_string(bytes)
            .map(Value::String)
            .map_err(|e| e.to_string());
    }
    if is_encrypted(bytes) {
        let crypto = conn.crypto.borrow();
        let Some(cipher) = crypto.as_ref() else {
            return Err("an encrypted frame arrived but socket.crypto is not set".into());
        };
        let doc = cipher.open_frame(bytes).map_err(|e| e.to_string())?;
        drop(crypto);
        return bson_lua::decode_with(lua, &doc, conn.mode).map_err(|e| e.to_string());
    }
    bson_lua::decode_with(lua, bytes, conn.mode).map_err(|e| e.to_string())
}

/// Calls the receiver with `(socket, data [, addr])` and commits a non-nil return value.
async fn deliver(lua: &Lua, conn: &Rc<Conn>, data: Value, from: Option<SocketAddr>) {
    let Some(f) = conn.receiver() else {
        log::warn!(target: &ctx(lua).name, "socket {}: frame dropped, no receive function", conn.id);
        return;
    };
    let reply = match from {
        None => call_receive(lua, conn, &f, (&conn.table, data)).await,
        Some(a) => {
            let addr = addr_string(lua, Some(a)).unwrap_or(Value::Nil);
            call_receive(lua, conn, &f, (&conn.table, data, addr)).await
        }
    };
    if let Some(v) = reply {
        if !v.is_nil() {
            if let Err(e) = conn.commit(lua, &v, from) {
                log::error!(target: &ctx(lua).name, "socket {}: reply not sent: {}", conn.id, crate::host::script_error::message(&e));
            }
        }
    }
}

/// Hands frames `batch[1..n]` to the receive function (see `BATCH_RUNNER`).
async fn deliver_batch(lua: &Lua, conn: &Rc<Conn>, n: usize) {
    let f = conn.receiver();
    let reply = conn.reply.borrow().clone();
    let (Some(f), Some(runner), Some(reply)) = (f, conn.keys.batch_runner.as_ref(), reply) else {
        log::warn!(target: &ctx(lua).name, "socket {}: {n} frame(s) dropped, no receive function", conn.id);
        for i in 1..=n {
            let _ = conn.batch.raw_set(i, Value::Nil);
        }
        return;
    };
    match crate::host::budget::timed(runner.call_async::<Option<Table>>((
        f,
        &conn.table,
        &conn.batch,
        n,
        reply,
    )))
    .await
    {
        Ok(None) => {}
        Ok(Some(errs)) => {
            for e in errs.sequence_values::<String>().flatten() {
                match e.strip_prefix("error in receive: ") {
                    Some(msg) => crate::host::callback::log_error(lua, "receive", msg),
                    None => crate::host::callback::log_error(lua, "receive", &e),
                }
            }
        }
        Err(e) => crate::host::callback::log_error(lua, "receive", &crate::host::script_error::format(&e)),
    }
}

/// `instance::call_callback` specialised for the per-frame call: the same guarantees (a
/// coroutine, xpcall with the same traceback handler, errors logged and contained), with
/// the instance's runner cached in `Keys` and only the first return value kept, which saves the
/// registry lookup, a closure and the `MultiValue` allocations that showed up in the echo
/// benchmark's profile.
async fn call_receive(lua: &Lua, conn: &Conn, f: &Function, args: impl mlua::IntoLuaMulti) -> Option<Value> {
    let runner = conn.keys.runner.as_ref()?;
    let mut all = args.into_lua_multi(lua).ok()?;
    all.push_front(Value::Function(f.clone()));
    match crate::host::budget::timed(runner.call_async::<(bool, Value)>(all)).await {
        Ok((true, v)) => Some(v),
        Ok((false, msg)) => {
            let msg = msg.to_string().unwrap_or_else(|_| "unknown error".into());
            crate::host::callback::log_error(lua, "receive", &msg);
            None
        }
        Err(e) => {
            crate::host::callback::log_error(lua, "receive", &crate::host::script_error::format(&e));
            None
        }
    }
}

/// Writes what the socket takes of the output without waiting; an error or unsent output
/// over `OUT` is a reason to close.
fn flush(conn: &Conn, stream: &TcpStream) -> Result<(), OutError> {
    let Some(m) = &conn.metrics else {
        return conn.out.borrow_mut().flush(|b| stream.try_write(b));
    };
    let mut sent = 0;
    let r = conn.out.borrow_mut().flush(|b| {
        let n = stream.try_write(b)?;
        sent += n;
        Ok(n)
    });
    m.bytes_out.inc_by(sent as u64);
    r
}

/// Why a connection's loop ended: the reason logged, and whether it is the peer's fault.
type End = (String, bool);

/// The life of one TCP connection: read → cut → deliver → flush, until it closes.
async fn run_tcp(lua: Lua, conn: Rc<Conn>) {
    let Kind::Tcp(stream) = &conn.kind else { return };
    let Some(stream) = stream.get().cloned() else {
        return;
    };
    let mut reader = FrameReader::new(conn.framing, conn.max_in);
    let mut last_read = Instant::now();
    let mut flush_at: Option<Instant> = None;
    // Held from the moment frames are cut until their replies are written: what a
    // draining node (SIGTERM) waits for.
    let node = ctx(&lua).node.clone();
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
        if let Err(e) = write_out(&conn, &stream, &mut flush_at) {
            break (e.to_string(), true);
        }
        if let Some(r) = conn.closing.borrow().clone() {
            break (r, *conn.bad.borrow());
        }
        if conn.out.borrow().is_empty() {
            in_flight = None;
            if node.is_draining() {
                break ("node stopping".into(), false);
            }
        }
        if served {
            // Fairness: a connection that always has frames waiting would otherwise be
            // served again at once (tokio's budget allows ~128 rounds), holding up the
            // other connections of this instance for milliseconds.
            tokio::task::yield_now().await;
        }
        if let Some(end) = wait(
            &conn,
            &stream,
            &mut reader,
            &mut last_read,
            flush_at,
            node.config.limits.idle_ms,
        )
        .await
        {
            break end;
        }
    };
    // Best effort, without waiting: send what the script queued before closing (also the
    // replies to the good frames that came before a bad one).
    let _ = flush(&conn, &stream);
    finish(&lua, &conn, &reason, bad).await;
}

/// Hands every complete frame in the reader to the script, in order, at most `MAX_BATCH` at
/// a time. A bad frame or document is an error, after the frames before it were served.
async fn serve(lua: &Lua, conn: &Rc<Conn>, reader: &mut FrameReader) -> Result<(), String> {
    conn.in_task.set(true);
    let r = serve_frames(lua, conn, reader).await;
    conn.in_task.set(false);
    r
}

async fn serve_frames(lua: &Lua, conn: &Rc<Conn>, reader: &mut FrameReader) -> Result<(), String> {
    while !conn.is_closing() {
        let bad_frame = reader.cut(MAX_BATCH);
        let n = reader.frames().len();
        if let Some(m) = &conn.metrics {
            m.frames_in.inc_by(n as u64);
        }
        // Encrypted frames are opened one by one.
        let encrypted = conn.framing.is_bson()
            && n > 1
            && reader
                .frames()
                .iter()
                .any(|&(a, _)| is_encrypted(&reader.bytes()[a..]));
        match n {
            0 => return bad_frame.map_or(Ok(()), |e| Err(e.to_string())),
            // A single frame (the request/response case) goes the direct way: fewer steps
            // than the batch runner's Lua loop.
            1 => {
                let data = decode_frame(lua, conn, reader.frame(0));
                deliver(lua, conn, data?, None).await;
            }
            _ if encrypted => {
                for i in 0..n {
                    let data = decode_frame(lua, conn, reader.frame(i));
                    deliver(lua, conn, data?, None).await;
                }
            }
            // Decoded in one protected call and handed to the script in one coroutine.
            _ => {
                let bson = conn.framing.is_bson();
                let (n, bad_doc) = match bson_lua::decode_batch_with(
                    lua,
                    &conn.batch,
                    reader.bytes(),
                    reader.frames(),
                    bson,
                    conn.mode,
                ) {
                    Ok(n) => (n, None),
                    Err((n, e)) => (n, Some(e.to_string())),
                };
                if n > 0 {
                    deliver_batch(lua, conn, n).await;
                }
                if let Some(e) = bad_doc {
                    return Err(e);
                }
            }
        }
        if let Some(e) = bad_frame {
            return Err(e.to_string());
        }
    }
    Ok(())
}

/// Writes the queued replies at once, or `port.commit` ms after the first one to coalesce
/// writes.
fn write_out(conn: &Conn, stream: &TcpStream, flush_at: &mut Option<Instant>) -> Result<(), OutError> {
    if conn.out.borrow().is_empty() {
        return Ok(());
    }
    let due = match (*flush_at, conn.port_ms(&conn.keys.commit)) {
        (Some(t), _) => t <= Instant::now(),
        (None, Some(ms)) => {
            *flush_at = Some(Instant::now() + Duration::from_millis(ms));
            false
        }
        (None, None) => true,
    };
    if !due {
        return Ok(());
    }
    *flush_at = None;
    flush(conn, stream)
}

/// Waits for the next thing to do: bytes (read into `reader`), room to write the output
/// left over, a wake-up (output queued from elsewhere, or a close asked for), the commit
/// delay, or `port.expire`. `Some` ends the connection.
async fn wait(
    conn: &Conn,
    stream: &TcpStream,
    reader: &mut FrameReader,
    last_read: &mut Instant,
    flush_at: Option<Instant>,
    idle: u64,
) -> Option<End> {
    let pending = !conn.out.borrow().is_empty() && flush_at.is_none();
    let expire = conn.expire_ms(idle);
    let idle_at = expire.map(|ms| *last_read + Duration::from_millis(ms));
    let partial = reader.pending();
    tokio::select! {
        r = stream.readable() => {
            if let Err(e) = r {
                conn.errno.set(e.raw_os_error().unwrap_or(0));
                return Some((format!("read failed: {e}"), false));
            }
            match reader.fill(|b| stream.try_read_buf(b)) {
                Ok(0) if partial > 0 => {
                    return Some((format!("peer closed with {partial} bytes of a partial frame"), true));
                }
                Ok(0) => return Some(("peer closed".into(), false)),
                Ok(n) => {
                    *last_read = Instant::now();
                    if let Some(m) = &conn.metrics {
                        m.bytes_in.inc_by(n as u64);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    conn.errno.set(e.raw_os_error().unwrap_or(0));
                    return Some((format!("read failed: {e}"), false));
                }
            }
        }
        r = stream.writable(), if pending => {
            if let Err(e) = r {
                conn.errno.set(e.raw_os_error().unwrap_or(0));
                return Some((format!("write failed: {e}"), false));
            }
        }
        _ = conn.wake.notified() => {}
        _ = sleep_until_opt(flush_at) => {}
        _ = sleep_until_opt(idle_at) => {
            // Idle with half a frame read is the peer's fault (a stalled client): warn.
            let tail = if partial > 0 { format!(" with {partial} bytes of a partial frame") } else { String::new() };
            conn.errno.set(ETIMEDOUT);
            return Some((format!("idle for {} ms (port.expire){tail}", expire.unwrap_or(0)), partial > 0));
        }
    }
    None
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Unregisters a connection, logs why it closed, and calls its close callback with
/// `(socket, errno)` as STAGE: `socket.close = f`, else the port's `close`, else
/// `socket.onclose`.
async fn finish(lua: &Lua, conn: &Rc<Conn>, reason: &str, bad: bool) {
    conn.close(reason);
    broker(lua).conns.borrow_mut().remove(&conn.id);
    let name = ctx(lua).name.clone();
    let peer = conn
        .peer
        .get()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "-".into());
    if bad {
        log::warn!(target: &name, "closed {peer} (socket {}): {reason}", conn.id);
    } else {
        log::debug!(target: &name, "closed {peer} (socket {}): {reason}", conn.id);
    }
    let on_close = conn
        .on_close
        .borrow()
        .clone()
        .or_else(|| {
            conn.port
                .as_ref()
                .and_then(|p| p.raw_get::<Option<Function>>("close").ok().flatten())
        })
        .or_else(|| conn.table.raw_get::<Option<Function>>("onclose").ok().flatten());
    // The socket is gone from the broker: its errno stays readable on the table.
    let _ = conn.table.raw_set("errno", conn.errno.get());
    if let Some(f) = on_close.filter(|_| conn.accepted.get()) {
        call_callback(lua, "close", &f, (conn.table.clone(), conn.errno.get())).await;
    }
}

/// The life of a UDP socket: each datagram is one frame.
async fn run_udp(lua: Lua, conn: Rc<Conn>, s: Rc<UdpSocket>) {
    let mut buf = vec![0u8; 65536];
    let name = ctx(&lua).name.clone();
    loop {
        let got = tokio::select! {
            r = s.recv_from(&mut buf) => r,
            _ = conn.wake.notified() => {
                if conn.is_closing() { break; }
                continue;
            }
        };
        let (n, from) = match got {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors of earlier sends surface here on Linux; they are not fatal.
                log::debug!(target: &name, "udp socket {}: {e}", conn.id);
                continue;
            }
        };
        let frame = &buf[..n];
        let f = match datagram_frame(conn.framing, frame, conn.max_in) {
            Ok(f) => f,
            Err(e) => {
                log::warn!(target: &name, "dropped datagram from {from}: {e}");
                continue;
            }
        };
        match decode_frame(&lua, &conn, &frame[f.start..f.end]) {
            Ok(v) => {
                if let Kind::Udp { peer, .. } = &conn.kind {
                    peer.set(Some(from));
                }
                deliver(&lua, &conn, v, Some(from)).await;
            }
            Err(e) => log::warn!(target: &name, "dropped datagram from {from}: {e}"),
        }
        if conn.is_closing() {
            break;
        }
    }
    finish(&lua, &conn, "closed", false).await;
}

/// `broker.join(uri [, on_connect] [, timeout_ms | options])`, as STAGE: for tcp:// and
/// udp://, returns the socket at once and connects in the background (frames committed
/// meanwhile wait in its output). Once connected, `on_connect(socket, addr)` runs (a function
/// it returns receives the frames, as `accept`'s; `false` closes). A failed or timed-out
/// connect (3 s unless `timeout_ms`) is reported through the close callback with
/// `(socket, errno)` and `socket.errno`. A bad URI or a name that does not resolve still
/// returns errno and a message. tls://, ws://, wss:// connect (and handshake) before they
/// return, or return errno and a message; `options`: `ca` (PEM file of extra trusted roots),
/// `name` (the name the certificate must carry), `timeout` (ms).
async fn join(lua: Lua, (uri, a2, a3): (String, Value, Value)) -> mlua::Result<MultiValue> {
    let ep = match uri::parse(&uri) {
        Ok(ep) => ep,
        Err(e) => return fail(&lua, None, e.to_string()),
    };
    let ms = |v: &Value| match v {
        Value::Integer(i) => Some(*i),
        Value::Number(n) => Some(*n as i64),
        _ => None,
    };
    let opts = match &a3 {
        Value::Table(t) => Some(t.clone()),
        _ => None,
    };
    let (on_connect, timeout) = match (&a2, &a3) {
        (Value::Function(f), t) => (Some(f.clone()), ms(t)),
        // STAGE also takes a table holding `connect`.
        (Value::Table(t), t3) => (t.raw_get::<Option<Function>>("connect")?, ms(t3)),
        (Value::Nil, t) => (None, ms(t)),
        (t, Value::Nil) if ms(t).is_some() => (None, ms(t)),
        (other, _) => {
            return Err(mlua::Error::runtime(format!(
                "broker.join: expected an on_connect function, got a {}",
                other.type_name()
            )))
        }
    };
    let timeout = match (timeout, &opts) {
        (Some(t), _) => Some(t),
        (None, Some(o)) => o.raw_get::<Option<i64>>("timeout")?,
        (None, None) => None,
    };
    let timeout = Duration::from_millis(timeout.filter(|t| *t > 0).map_or(JOIN_TIMEOUT_MS, |t| t as u64));
    let addr = match sock::literal_addr(&ep.host, ep.port) {
        Some(a) => a,
        None => match tokio::net::lookup_host(ep.authority())
            .await
            .map(|mut i| i.next())
        {
            Ok(Some(a)) => a,
            Ok(None) => {
                return fail(
                    &lua,
                    None,
                    format!("broker.join {uri}: no address for {}", ep.host),
                )
            }
            Err(e) => return io_fail(&lua, &format!("broker.join {uri}"), e),
        },
    };
    let conn = match ep.proto {
        Proto::Http => {
            return fail(
                &lua,
                None,
                format!("broker.join {uri}: http is served, not joined (use a HTTP client)"),
            )
        }
        Proto::Ws => match ws::join(&lua, &uri, &ep, addr, opts.as_ref()).await {
            Ok(conn) => conn,
            Err((errno, msg)) => return fail(&lua, errno, msg),
        },
        Proto::Tcp if ep.tls => match ws::join(&lua, &uri, &ep, addr, opts.as_ref()).await {
            Ok(conn) => conn,
            Err((errno, msg)) => return fail(&lua, errno, msg),
        },
        Proto::Tcp => {
            let conn = new_tcp(&lua, &ep, None, None)?;
            spawn_local(connect(lua.clone(), conn.clone(), uri, addr, timeout, on_connect));
            return Ok(MultiValue::from_vec(vec![Value::Table(conn.table.clone())]));
        }
        Proto::Udp => {
            let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
                .parse()
                .unwrap();
            let s = match sock::udp_socket(bind, false).and_then(UdpSocket::from_std) {
                Ok(s) => Rc::new(s),
                Err(e) => return io_fail(&lua, &format!("broker.join {uri}"), e),
            };
            new_udp(&lua, &ep, s, Some(addr))?
        }
    };
    if let Some(f) = on_connect {
        on_connected(&lua, &conn, &f, addr).await;
    }
    Ok(MultiValue::from_vec(vec![Value::Table(conn.table.clone())]))
}

/// Calls `on_connect(socket, addr)`: a function it returns receives the frames; `false`
/// closes the socket.
async fn on_connected(lua: &Lua, conn: &Rc<Conn>, f: &Function, addr: SocketAddr) {
    let rets = call_callback(lua, "join", f, (conn.table.clone(), sock::ntoa(&addr))).await;
    match rets.as_ref().and_then(|r| r.front()) {
        Some(Value::Function(f)) => *conn.handler.borrow_mut() = Some(f.clone()),
        Some(Value::Boolean(false)) => conn.close("refused by on_connect"),
        _ => {}
    }
}

/// The background half of `broker.join` for TCP: connect within `timeout`, then serve the
/// socket; a failure closes it with its errno.
async fn connect(
    lua: Lua,
    conn: Rc<Conn>,
    uri: String,
    addr: SocketAddr,
    timeout: Duration,
    on_connect: Option<Function>,
) {
    let res = tokio::time::timeout(timeout, TcpStream::connect(addr)).await;
    let stream = match res {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            conn.errno.set(e.raw_os_error().unwrap_or(libc::ECONNREFUSED));
            log::warn!(target: &ctx(&lua).name, "broker.join {uri}: {e}");
            return finish(&lua, &conn, &format!("connect failed: {e}"), false).await;
        }
        Err(_) => {
            conn.errno.set(ETIMEDOUT);
            log::warn!(target: &ctx(&lua).name, "broker.join {uri}: no connection within {} ms", timeout.as_millis());
            return finish(&lua, &conn, "connect timed out", false).await;
        }
    };
    let _ = stream.set_nodelay(true);
    conn.peer.set(stream.peer_addr().ok());
    let _ = conn.table.raw_set(
        1,
        addr_string(&lua, stream.peer_addr().ok()).unwrap_or(Value::Nil),
    );
    let _ = conn.table.raw_set(
        -1,
        addr_string(&lua, stream.local_addr().ok()).unwrap_or(Value::Nil),
    );
    if let Kind::Tcp(cell) = &conn.kind {
        let _ = cell.set(Rc::new(stream));
    }
    if let Some(f) = on_connect.filter(|_| !conn.is_closing()) {
        on_connected(&lua, &conn, &f, addr).await;
    }
    run_tcp(lua, conn).await;
}

/// An id from a number or a socket table.
fn id_of(v: &Value) -> Option<i64> {
    match v {
        Value::Integer(i) => Some(*i),
        Value::Number(n) if n.fract() == 0.0 => Some(*n as i64),
        Value::Table(t) => t.raw_get::<Option<i64>>("id").ok().flatten(),
        _ => None,
    }
}

fn close_one(lua: &Lua, id: i64) -> bool {
    if let Some(c) = find(lua, id) {
        c.close("closed by broker.close");
        return true;
    }
    let b = broker(lua);
    let port = b.ports.borrow_mut().remove(&id);
    b.port_crypto.borrow_mut().remove(&id);
    match port {
        Some((_, task)) => {
            task.abort();
            true
        }
        None => false,
    }
}

/// `broker.close(id | socket | {ids})`: returns how many sockets or ports it closed.
fn close(lua: &Lua, v: Value) -> mlua::Result<i64> {
    if let Value::Table(t) = &v {
        if t.raw_get::<Option<i64>>("id")?.is_none() {
            let mut n = 0;
            for id in t.sequence_values::<Value>() {
                if id_of(&id?).is_some_and(|id| close_one(lua, id)) {
                    n += 1;
                }
            }
            return Ok(n);
        }
    }
    let id = id_of(&v).ok_or_else(|| {
        mlua::Error::runtime(format!(
            "broker.close: expected a socket id or a list of ids, got a {}",
            v.type_name()
        ))
    })?;
    Ok(close_one(lua, id) as i64)
}

/// `broker.signal(id, v)` delivers `v` as if received; `broker.signal({ids}, v)` sends it;
/// `broker.signal("host:port", v)` sends one UDP datagram. Returns the number of sockets
/// (or datagrams) it reached.
fn signal(lua: &Lua, (target, v): (Value, Value)) -> mlua::Result<i64> {
    match &target {
        Value::Table(t) => {
            let mut n = 0;
            for id in t.sequence_values::<Value>() {
                if let Some(c) = id_of(&id?).and_then(|id| find(lua, id)) {
                    if c.commit(lua, &v, None)? > 0 {
                        n += 1;
                    }
                }
            }
            Ok(n)
        }
        Value::String(s) => {
            let addr = parse_addr(&s.to_str()?)?;
            let sock = udp_out(lua, &addr)?;
            let mut buf = Vec::new();
            match &v {
                Value::Table(_) => bson_lua::encode(lua, &v, &mut buf).map_err(mlua::Error::runtime)?,
                Value::String(s) => buf.extend_from_slice(&s.as_bytes()),
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "broker.signal: cannot send a {} (expected a table or a string)",
                        other.type_name()
                    )))
                }
            }
            Ok((udp_send(&sock, &buf, addr) > 0) as i64)
        }
        _ => {
            let Some(c) = id_of(&target).and_then(|id| find(lua, id)) else {
                return Ok(0);
            };
            let lua2 = lua.clone();
            spawn_local(async move { deliver(&lua2, &c, v, None).await });
            Ok(1)
        }
    }
}

fn udp_out(lua: &Lua, to: &SocketAddr) -> mlua::Result<Rc<UdpSocket>> {
    let b = broker(lua);
    if let Some(s) = b.udp_out.borrow().as_ref() {
        if s.local_addr().map(|l| l.is_ipv6()).unwrap_or(false) || to.is_ipv4() {
            return Ok(s.clone());
        }
    }
    // Dual-stack when possible, so one socket reaches IPv4 and IPv6 peers.
    let s = sock::udp_socket("[::]:0".parse().unwrap(), false)
        .or_else(|_| sock::udp_socket("0.0.0.0:0".parse().unwrap(), false))
        .and_then(UdpSocket::from_std)
        .map_err(|e| mlua::Error::runtime(format!("broker.signal: cannot open a udp socket: {e}")))?;
    let s = Rc::new(s);
    *b.udp_out.borrow_mut() = Some(s.clone());
    Ok(s)
}

/// `broker.submit(socket, f, ...)`: `stage.submit` keyed by the socket; `f(socket, ...)` as
/// STAGE calls it.
fn submit(lua: &Lua, (socket, f, args): (Value, Function, Variadic<Value>)) -> mlua::Result<()> {
    let id = id_of(&socket).ok_or_else(|| {
        mlua::Error::runtime(format!(
            "broker.submit: expected a socket or an id, got a {}",
            socket.type_name()
        ))
    })?;
    // The socket itself goes first (an id is turned into the socket when it is ours).
    let first = match &socket {
        Value::Table(_) => socket.clone(),
        _ => find(lua, id)
            .map(|c| Value::Table(c.table.clone()))
            .unwrap_or(socket.clone()),
    };
    let mut all = vec![first];
    all.extend(args);
    ctx(lua).submit(
        lua,
        Some(format!("broker.socket:{id}")),
        f,
        MultiValue::from_vec(all),
    );
    Ok(())
}

/// Reads an address: text `host:port`, STAGE's raw sockaddr bytes, or a table
/// `{addr =, port =}` (also `{host =, port =}`).
fn addr_arg(v: &Value) -> mlua::Result<SocketAddr> {
    match v {
        Value::String(s) => addr::parse_any(&s.as_bytes()).ok_or_else(|| {
            mlua::Error::runtime(format!(
                "bad address {:?} (expected host:port)",
                s.to_string_lossy()
            ))
        }),
        Value::Table(t) => {
            let host: String = match t.get::<Option<String>>("addr")? {
                Some(h) => h,
                None => t.get("host")?,
            };
            let port: u16 = t.get::<Option<u16>>("port")?.unwrap_or(0);
            sock::literal_addr(&host, port)
                .ok_or_else(|| mlua::Error::runtime(format!("bad address host '{host}' (expected an ip)")))
        }
        other => Err(mlua::Error::runtime(format!(
            "expected an address, got a {}",
            other.type_name()
        ))),
    }
}

/// STAGE's `ntoa(a, t)` fields: `family` (2 IPv4, 10 IPv6), `addr`, `port`, `scope_id`.
fn addr_fields(a: &SocketAddr, t: Table) -> mlua::Result<Table> {
    let p = addr::parts(a);
    t.set("family", p.family)?;
    t.set("addr", p.addr)?;
    t.set("port", p.port)?;
    if let Some(s) = p.scope_id {
        t.set("scope_id", s)?;
    }
    Ok(t)
}

/// `broker.ntoa(addr [, t])`: the text form of an address (text or STAGE's raw sockaddr);
/// with a table `t`, fills `t.family`, `t.addr`, `t.port` (and `t.scope_id`) and returns `t`.
fn ntoa(lua: &Lua, (addr, t): (Value, Option<Table>)) -> mlua::Result<Value> {
    let a = addr_arg(&addr)?;
    match t {
        Some(t) => addr_fields(&a, t).map(Value::Table),
        None => lua.create_string(sock::ntoa(&a)).map(Value::String),
    }
}

/// The addresses `s` names (`[scheme://]host:port`): a literal at once, a name resolved
/// without blocking the instance.
async fn resolve(s: &str) -> Vec<SocketAddr> {
    let (_, hp) = addr::split_uri(s);
    if let Some(a) = addr::parse_text(hp) {
        return vec![a];
    }
    match tokio::net::lookup_host(hp).await {
        Ok(it) => it.collect(),
        Err(_) => vec![],
    }
}

/// `broker.aton(s [, {}])`, `broker.aton(family, {addr =, port =})`, as STAGE: the first
/// address `s` (`[tcp|udp://]host:port`) resolves to, or nil; with a table, all of them as a
/// list. A family number (2 IPv4, 10 IPv6) and a table of parts build one address.
async fn aton(lua: Lua, (s, t): (Value, Value)) -> mlua::Result<Value> {
    let text = |a: &SocketAddr| lua.create_string(sock::ntoa(a)).map(Value::String);
    match (&s, &t) {
        (Value::Integer(family), Value::Table(parts)) => {
            let host: Option<String> = parts.get("addr")?;
            let port: u16 = parts.get::<Option<u16>>("port")?.unwrap_or(0);
            let scope: u32 = parts.get::<Option<u32>>("scope_id")?.unwrap_or(0);
            let a = addr::from_parts(*family, host.as_deref(), port, scope)
                .map_err(|e| mlua::Error::runtime(format!("broker.aton: {e}")))?;
            text(&a)
        }
        (Value::Integer(family), Value::String(hp)) => {
            let all = resolve(&hp.to_str()?).await;
            let want = |a: &&SocketAddr| (*family == addr::AF_INET) == a.is_ipv4();
            match all.iter().find(want) {
                Some(a) => text(a),
                None => Ok(Value::Nil),
            }
        }
        (Value::String(s), _) => {
            let all = resolve(&s.to_str()?).await;
            match t {
                Value::Table(list) => {
                    for (i, a) in all.iter().enumerate() {
                        list.raw_set(i + 1, text(a)?)?;
                    }
                    Ok(Value::Table(list))
                }
                _ => match all.first() {
                    Some(a) => text(a),
                    None => Ok(Value::Nil),
                },
            }
        }
        _ => Err(mlua::Error::runtime(format!(
            "broker.aton: expected \"[scheme://]host:port\" or a family number and a table, got a {} and a {}",
            s.type_name(),
            t.type_name()
        ))),
    }
}

/// `broker.ifaddr([name])`, as STAGE: `{ [interface] = {addr, ...} }` without loopback
/// addresses, only the interfaces whose name contains `name` when given.
fn ifaddr(lua: &Lua, name: Option<String>) -> mlua::Result<Table> {
    let groups = addr::ifaddrs(&sock::interfaces(), name.as_deref().unwrap_or(""));
    let t = lua.create_table()?;
    for (name, ips) in groups {
        let list = lua.create_table()?;
        for ip in ips {
            list.raw_push(ip.to_string())?;
        }
        t.raw_set(name, list)?;
    }
    Ok(t)
}

/// The cipher a `socket.crypto` value or the first argument of `broker.encrypt`/`decrypt`
/// names: a key (AES/CBC/PKCS5Padding, STAGE's default) or `{["AES/CBC/PKCS5Padding"] = key}`.
fn cipher_of(what: &str, v: &Value) -> mlua::Result<crate::net::crypto::Cipher> {
    use crate::net::crypto::Cipher;
    match v {
        Value::String(k) => Ok(Cipher::new(&k.as_bytes())),
        Value::Table(t) => {
            let mut found = None;
            for pair in t.pairs::<Value, Value>() {
                let (spec, key) = pair?;
                match (spec, key) {
                    (Value::String(spec), Value::String(key)) if found.is_none() => {
                        found = Some(
                            Cipher::from_spec(&spec.to_str()?, &key.as_bytes())
                                .map_err(|e| mlua::Error::runtime(format!("{what}: {e}")))?,
                        );
                    }
                    _ => {
                        return Err(mlua::Error::runtime(format!(
                            "{what}: expected one entry {{[\"AES/CBC/PKCS5Padding\"] = key}}"
                        )))
                    }
                }
            }
            found.ok_or_else(|| mlua::Error::runtime(format!("{what}: the cipher table is empty")))
        }
        other => Err(mlua::Error::runtime(format!(
            "{what}: expected a key or {{[\"AES/CBC/PKCS5Padding\"] = key}}, got a {}",
            other.type_name()
        ))),
    }
}

/// `broker.encrypt(key | {[cipher] = key}, table)`: the table as an encrypted BSON frame,
/// exactly what a socket with that `crypto` sends.
fn encrypt(lua: &Lua, (how, v): (Value, Value)) -> mlua::Result<mlua::String> {
    let cipher = cipher_of("broker.encrypt", &how)?;
    let doc =
        bson_lua::encode_vec(lua, &v).map_err(|e| mlua::Error::runtime(format!("broker.encrypt: {e}")))?;
    let mut frame = Vec::with_capacity(doc.len() + 20);
    cipher.seal_frame(&doc, &mut frame);
    lua.create_string(frame)
}

/// `broker.decrypt(key | {[cipher] = key}, data)`: an encrypted frame (or a plain BSON
/// document) decoded into a table; data that is neither comes back as the string, as STAGE.
fn decrypt(lua: &Lua, (how, data): (Value, mlua::String)) -> mlua::Result<Value> {
    let cipher = cipher_of("broker.decrypt", &how)?;
    let bytes = data.as_bytes();
    let header = bytes
        .get(..4)
        .map(|h| u32::from_le_bytes([h[0], h[1], h[2], h[3]]));
    let doc = match header {
        Some(h) if crate::net::crypto::is_encrypted(h) => match cipher.open_frame(&bytes) {
            Ok(doc) => doc,
            Err(e) => return Err(mlua::Error::runtime(format!("broker.decrypt: {e}"))),
        },
        _ => bytes.to_vec(),
    };
    match bson_lua::decode(lua, &doc) {
        Ok(v) => Ok(v),
        Err(_) => Ok(Value::String(data.clone())),
    }
}
