//! `broker.ready("http://...", handler [, options])` and `https://`: the Lua side of
//! `net::http`. Each request becomes a table (`method`, `path`, `query`, `headers`, `body`,
//! `remote`, `version`), the handler runs in a coroutine of its own (it may wait), and its
//! return value becomes the response. Listeners share ports through `#services` like TCP
//! ports; TLS certificates come from the options or `#tls` in stage.json.

use crate::host::callback::{call_callback, xpcall_runner};
use crate::host::ctx;
use crate::net::http::{self as core, Body, HandlerFuture, Limits, Reply, Request, Server};
use crate::net::sock;
use crate::net::tls::{self, TlsFiles};
use crate::net::uri::Endpoint;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode};
use mlua::{Function, Lua, Table, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::{spawn_local, AbortHandle};

/// What `options` may hold, read once at `broker.ready`.
struct Options {
    limits: Limits,
    tls: Option<(PathBuf, PathBuf)>,
}

fn size_opt(t: &Table, key: &str, default: usize) -> Result<usize, String> {
    match t.raw_get::<Value>(key).map_err(|e| e.to_string())? {
        Value::Nil => Ok(default),
        Value::Integer(n) if n > 0 => Ok(n as usize),
        Value::Number(n) if n > 0.0 => Ok(n as usize),
        Value::String(s) => crate::net::framing::parse_size(&s.to_string_lossy())
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("options.{key}: bad size '{}'", s.to_string_lossy())),
        other => Err(format!(
            "options.{key}: expected a size (bytes, or '64k', '1m'), got {other:?}"
        )),
    }
}

fn options(lua: &Lua, ep: &Endpoint, opts: Option<&Table>) -> Result<Options, String> {
    let mut limits = Limits::default();
    let mut cert = None;
    let mut key = None;
    if let Some(t) = opts {
        limits.max_body = size_opt(t, "max_body", limits.max_body)?;
        limits.max_head = size_opt(t, "max_head", limits.max_head)?;
        let ms = size_opt(t, "timeout", limits.head_timeout.as_millis() as usize)?;
        limits.head_timeout = Duration::from_millis(ms as u64);
        cert = t
            .raw_get::<Option<String>>("cert")
            .map_err(|e| format!("options.cert: {e}"))?;
        key = t
            .raw_get::<Option<String>>("key")
            .map_err(|e| format!("options.key: {e}"))?;
    }
    if !ep.tls {
        return Ok(Options { limits, tls: None });
    }
    Ok(Options {
        limits,
        tls: Some(cert_paths(lua, cert, key)?),
    })
}

/// A `#tls` entry of stage.json (`cert`, `key`, `ca`), as a path under the home.
pub(crate) fn tls_conf(lua: &Lua, k: &str) -> Option<PathBuf> {
    let c = ctx(lua);
    let v = c.node.config.lookup("#tls")?.get(k)?.as_str()?.to_string();
    Some(c.node.home.root.join(v))
}

/// The certificate and key of a TLS listener: the options' `cert` and `key`, else `#tls`.
pub(crate) fn cert_paths(
    lua: &Lua,
    cert: Option<String>,
    key: Option<String>,
) -> Result<(PathBuf, PathBuf), String> {
    let root = ctx(lua).node.home.root.clone();
    let cert = cert.map(|p| root.join(p)).or_else(|| tls_conf(lua, "cert"));
    let key = key.map(|p| root.join(p)).or_else(|| tls_conf(lua, "key"));
    let (Some(cert), Some(key)) = (cert, key) else {
        return Err("TLS needs a certificate and a key: options { cert = ..., key = ... } or \"#tls\": {\"cert\": ..., \"key\": ...} in stage.json".into());
    };
    Ok((cert, key))
}

/// Starts an HTTP(S) listener for `ep` at `addr`. Returns the local address and the accept
/// loop's handle, or an errno and a message.
pub(crate) fn listen(
    lua: &Lua,
    uri: &str,
    ep: &Endpoint,
    addr: SocketAddr,
    handler: Function,
    opts: Option<&Table>,
) -> Result<(Option<SocketAddr>, AbortHandle), (Option<i32>, String)> {
    let o = options(lua, ep, opts).map_err(|e| (None, format!("broker.ready {uri}: {e}")))?;
    let tls = match &o.tls {
        Some((cert, key)) => Some(Rc::new(
            TlsFiles::load(cert, key, tls::ALPN_HTTP)
                .map_err(|e| (None, format!("broker.ready {uri}: {e}")))?,
        )),
        None => None,
    };
    let c = ctx(lua);
    let shared = sock::is_shared(&c.node.config.services_tcp, ep.port);
    let listener = sock::tcp_listener(addr, shared)
        .and_then(TcpListener::from_std)
        .map_err(|e| (e.raw_os_error(), format!("broker.ready {uri}: {e}")))?;
    let local = listener.local_addr().ok();
    let runner = xpcall_runner(lua).map_err(|e| (None, e.to_string()))?;
    let log: Rc<str> = c.name.as_str().into();
    let keys = Rc::new(Keys::new(lua).map_err(|e| (None, e.to_string()))?);
    // Resolved once per listener: each request costs one observation in this histogram.
    let latency = c.node.metrics.http(local.map_or(ep.port, |a| a.port()), &c.name);
    let server = Rc::new(Server {
        limits: o.limits,
        handler: {
            let lua = lua.clone();
            Rc::new(move |req: Request| -> HandlerFuture {
                let (lua, f, runner, keys) = (lua.clone(), handler.clone(), runner.clone(), keys.clone());
                let latency = latency.clone();
                Box::pin(async move {
                    let start = std::time::Instant::now();
                    let reply = call(&lua, &keys, &runner, &f, req).await;
                    latency.observe(start.elapsed().as_secs_f64());
                    reply
                })
            })
        },
        log: log.clone(),
    });
    log::info!(target: &log, "listening on {} ({}{})", local.map(|a| a.to_string()).unwrap_or_default(),
        if tls.is_some() { "https" } else { "http" }, if shared { ", shared" } else { "" });
    let task = spawn_local(accept_loop(listener, server, tls));
    Ok((local, task.abort_handle()))
}

async fn accept_loop(listener: TcpListener, server: Rc<Server>, tls: Option<Rc<TlsFiles>>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                log::warn!(target: &server.log, "http accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let server = server.clone();
        match &tls {
            None => {
                spawn_local(core::serve(server, tcp, peer, false));
            }
            Some(files) => {
                let acceptor = files.acceptor(&server.log);
                spawn_local(async move {
                    match tls::accept(acceptor, tcp).await {
                        Ok((s, h2)) => core::serve(server, s, peer, h2).await,
                        Err(e) => log::warn!(target: &server.log, "https {peer}: {e}"),
                    }
                });
            }
        }
    }
}

/// Field names, interned once per listener.
struct Keys {
    method: mlua::String,
    path: mlua::String,
    query: mlua::String,
    headers: mlua::String,
    body: mlua::String,
    remote: mlua::String,
    version: mlua::String,
    status: mlua::String,
}

impl Keys {
    fn new(lua: &Lua) -> mlua::Result<Keys> {
        let k = |s: &str| lua.create_string(s);
        Ok(Keys {
            method: k("method")?,
            path: k("path")?,
            query: k("query")?,
            headers: k("headers")?,
            body: k("body")?,
            remote: k("remote")?,
            version: k("version")?,
            status: k("status")?,
        })
    }
}

fn request_table(lua: &Lua, k: &Keys, req: &Request) -> mlua::Result<Table> {
    let p = &req.parts;
    let t = lua.create_table_with_capacity(0, 7)?;
    t.raw_set(&k.method, p.method.as_str())?;
    t.raw_set(&k.path, core::percent_decode_path(p.uri.path()))?;
    let q = lua.create_table()?;
    if let Some(qs) = p.uri.query() {
        for (name, v) in core::parse_query(qs) {
            match q.raw_get::<Value>(name.as_str())? {
                Value::Nil => q.raw_set(name, v)?,
                Value::Table(list) => list.raw_push(v)?,
                first => q.raw_set(
                    name,
                    lua.create_sequence_from([first, Value::String(lua.create_string(v)?)])?,
                )?,
            }
        }
    }
    t.raw_set(&k.query, q)?;
    let h = lua.create_table_with_capacity(0, p.headers.keys_len())?;
    for name in p.headers.keys() {
        let mut all = p.headers.get_all(name).iter();
        let first = all.next().map(|v| v.as_bytes()).unwrap_or_default();
        match all.next() {
            None => h.raw_set(name.as_str(), lua.create_string(first)?)?,
            Some(second) => {
                let sep: &[u8] = if name == http::header::COOKIE {
                    b"; "
                } else {
                    b", "
                };
                let mut v = [first, sep, second.as_bytes()].concat();
                for more in all {
                    v.extend_from_slice(sep);
                    v.extend_from_slice(more.as_bytes());
                }
                h.raw_set(name.as_str(), lua.create_string(v)?)?
            }
        }
    }
    t.raw_set(&k.headers, h)?;
    t.raw_set(&k.body, lua.create_string(&req.body)?)?;
    t.raw_set(&k.remote, sock::ntoa(&req.remote))?;
    t.raw_set(
        &k.version,
        match p.version {
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        },
    )?;
    Ok(t)
}

/// Runs the handler for one request; `Err(())` after logging = 500.
async fn call(lua: &Lua, keys: &Keys, runner: &Function, f: &Function, req: Request) -> Result<Reply, ()> {
    let name = || ctx(lua).name.clone();
    let what = || {
        format!(
            "{} {} from {}",
            req.parts.method,
            req.parts.uri.path(),
            req.remote
        )
    };
    let t = match request_table(lua, keys, &req) {
        Ok(t) => t,
        Err(e) => {
            log::error!(target: &name(), "http {}: 500, request not converted: {e}", what());
            return Err(());
        }
    };
    match runner.call_async::<(bool, Value)>((f, t)).await {
        Ok((true, v)) => reply_from(lua, keys, v).map_err(|e| {
            log::error!(target: &name(), "http {}: 500, bad reply from the handler: {e}", what());
        }),
        Ok((false, msg)) => {
            let msg = msg.to_string().unwrap_or_else(|_| "unknown error".into());
            log::error!(target: &name(), "http {}: 500, error in handler: {msg}", what());
            Err(())
        }
        Err(e) => {
            log::error!(target: &name(), "http {}: 500, error in handler: {}", what(),
                crate::host::script_error::format(&e));
            Err(())
        }
    }
}

const TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// A handler's return value as a response: a string (200, text), a number (a status), nil
/// (204), or `{status =, headers =, body =}` where body is a string, a table (sent as
/// JSON) or a function called for each chunk until it returns nil (streamed).
fn reply_from(lua: &Lua, keys: &Keys, v: Value) -> Result<Reply, String> {
    let mut r = match v {
        Value::Nil => {
            let mut r = Response::new(Body::full(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            return Ok(r);
        }
        Value::String(s) => {
            let mut r = Response::new(Body::full(Bytes::copy_from_slice(&s.as_bytes())));
            r.headers_mut().insert(http::header::CONTENT_TYPE, TEXT);
            return Ok(r);
        }
        Value::Integer(_) | Value::Number(_) => {
            let mut r = Response::new(Body::full(Bytes::new()));
            *r.status_mut() = status(&v)?;
            return Ok(r);
        }
        Value::Table(t) => {
            let (body, default_type) = match t.raw_get::<Value>(&keys.body).map_err(|e| e.to_string())? {
                Value::Nil => (Body::full(Bytes::new()), None),
                Value::String(s) => (Body::full(Bytes::copy_from_slice(&s.as_bytes())), Some(TEXT)),
                b @ Value::Table(_) => {
                    let json = serde_json::to_vec(&b).map_err(|e| format!("body: {e}"))?;
                    (Body::full(json), Some(JSON))
                }
                Value::Function(f) => (stream(lua, f), Some(TEXT)),
                other => {
                    return Err(format!(
                        "body: expected a string, a table or a function, got a {}",
                        other.type_name()
                    ))
                }
            };
            let mut r = Response::new(body);
            let st: Value = t.raw_get(&keys.status).map_err(|e| e.to_string())?;
            if !st.is_nil() {
                *r.status_mut() = status(&st)?;
            }
            if let Some(h) = t
                .raw_get::<Option<Table>>(&keys.headers)
                .map_err(|e| format!("headers: {e}"))?
            {
                for pair in h.pairs::<mlua::String, Value>() {
                    let (name, v) = pair.map_err(|e| format!("headers: {e}"))?;
                    let name = HeaderName::from_bytes(&name.as_bytes())
                        .map_err(|_| format!("headers: bad header name '{}'", name.to_string_lossy()))?;
                    let mut add = |v: &Value| -> Result<(), String> {
                        let s = match v {
                            Value::String(s) => HeaderValue::from_bytes(&s.as_bytes()),
                            Value::Integer(_) | Value::Number(_) => {
                                HeaderValue::from_str(&v.to_string().unwrap_or_default())
                            }
                            other => {
                                return Err(format!(
                                    "headers.{name}: expected a string, got a {}",
                                    other.type_name()
                                ))
                            }
                        }
                        .map_err(|_| format!("headers.{name}: value with a forbidden character"))?;
                        r.headers_mut().append(&name, s);
                        Ok(())
                    };
                    match &v {
                        Value::Table(list) => {
                            for item in list.sequence_values::<Value>() {
                                add(&item.map_err(|e| e.to_string())?)?;
                            }
                        }
                        v => add(v)?,
                    }
                }
            }
            if let Some(ct) = default_type {
                r.headers_mut().entry(http::header::CONTENT_TYPE).or_insert(ct);
            }
            r
        }
        other => {
            return Err(format!(
                "expected a string, a number, a table or nil, got a {}",
                other.type_name()
            ))
        }
    };
    if r.status().is_informational() {
        return Err(format!("status {} is not a final status", r.status().as_u16()));
    }
    // Keep hyper in charge of framing.
    r.headers_mut().remove(http::header::TRANSFER_ENCODING);
    r.headers_mut().remove(http::header::CONTENT_LENGTH);
    Ok(r)
}

fn status(v: &Value) -> Result<StatusCode, String> {
    let n = match v {
        Value::Integer(n) => *n,
        Value::Number(n) if n.fract() == 0.0 => *n as i64,
        other => return Err(format!("status: expected an integer, got {other:?}")),
    };
    u16::try_from(n)
        .ok()
        .filter(|n| (100..=999).contains(n))
        .and_then(|n| StatusCode::from_u16(n).ok())
        .ok_or_else(|| format!("status: {n} is not an HTTP status"))
}

/// A body produced by calling `f` until it returns nil (each call a callback of its own, so
/// it may wait); chunks go out as the client takes them.
fn stream(lua: &Lua, f: Function) -> Body {
    let (tx, body) = Body::channel(4);
    let lua = lua.clone();
    spawn_local(async move {
        loop {
            let Some(rets) = call_callback(&lua, "http body", &f, ()).await else {
                break;
            };
            let chunk = match rets.front() {
                Some(Value::String(s)) => Bytes::copy_from_slice(&s.as_bytes()),
                Some(Value::Nil) | None => break,
                Some(other) => {
                    log::error!(target: &ctx(&lua).name, "http body: expected a string chunk or nil, got a {}", other.type_name());
                    break;
                }
            };
            if tx.send(chunk).await.is_err() {
                break; // the client left
            }
        }
    });
    body
}
