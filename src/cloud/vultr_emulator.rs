//! An emulator of the Vultr API v2, for tests and for trying `stage vultr` without an
//! account (`stage vultr-emulator --port N`). It speaks the real shapes (see
//! shared/reference/cloud-apis.md §1): bearer auth with 401 `Invalid API token.`, cursor
//! pagination with `meta.total` and `meta.links`, 202 `{"instance": …}` on create, 204 on
//! delete and actions, `{"error", "status"}` bodies, and the observed non-monotonic
//! lifecycle: pending/running/none → active/stopped/locked (IP assigned) →
//! active/running/installingbooting → active/running/ok, on configurable timings.
//!
//! Test hooks: [`Emulator::fail_next`] (or `POST /__emulator/fail {"status", "count"}`)
//! answers the next requests with an error status (429 injection), [`Emulator::delay_next`]
//! (or `{"delay_ms", "count"}`) answers them late (client timeouts), an optional per-IP rate
//! limit answers 429 as the real API does above 30 requests per second, and
//! `locked_delete_fails` makes DELETE of a locked instance answer the real 500.
//!
//! Reserved IPs (`/v2/reserved-ips`: create 201, list, get, PATCH label 202, attach and
//! detach 204, delete 204) keep the API's object shape (`id`, `region`, `ip_type`, `subnet`,
//! `subnet_size`, `label`, `instance_id`) and its rules: an IP attaches to an instance of its
//! own region, to one instance at a time; deleting the instance detaches it.
//! Instances created with `enable_vpc` / `attach_vpc` get an `internal_ip` from
//! [`EmulatorConfig::vpc_prefix`]; `GET /v2/instances/{id}/user-data` returns what was sent.
//! [`Emulator::crash`] makes an instance report itself stopped, as a crashed VM does.

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value as Json};
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// When a new instance reaches each state, counted from its creation.
#[derive(Clone, Debug)]
pub struct Lifecycle {
    /// → active / stopped / locked, `main_ip` assigned.
    pub locked_after: Duration,
    /// → active / running / installingbooting.
    pub installing_after: Duration,
    /// → active / running / ok (ready).
    pub ok_after: Duration,
}

impl Lifecycle {
    /// About what a small plan takes on the real API (≈ 20 s, 40 s, 60 s).
    pub fn realistic() -> Lifecycle {
        Lifecycle::scaled(Duration::from_secs(20))
    }

    /// Each step `step` after the previous one.
    pub fn scaled(step: Duration) -> Lifecycle {
        Lifecycle {
            locked_after: step,
            installing_after: step * 2,
            ok_after: step * 3,
        }
    }
}

#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// The one API key the emulator accepts.
    pub api_key: String,
    pub lifecycle: Lifecycle,
    /// Requests per second per client IP before 429 (the real limit is 30); `None` = no limit.
    pub rate_limit: Option<u32>,
    /// DELETE of a locked instance answers 500 "Server is currently locked", as the real API can.
    pub locked_delete_fails: bool,
    /// The first three octets (with the trailing dot) of VPC addresses given to instances
    /// created with `enable_vpc` or `attach_vpc`; tests use a loopback prefix such as
    /// `127.0.96.` so that something local can listen on an instance's private address.
    pub vpc_prefix: String,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            api_key: "EMULATOR-KEY".into(),
            lifecycle: Lifecycle::scaled(Duration::from_millis(100)),
            rate_limit: None,
            locked_delete_fails: false,
            vpc_prefix: "10.1.96.".into(),
        }
    }
}

/// The four facts that change along the lifecycle.
#[derive(Clone, Copy, Debug)]
struct Phase {
    status: &'static str,
    power: &'static str,
    server: &'static str,
    ip: bool,
}

struct Emu {
    /// The instance object as the API shows it (kept up to date by `settle`).
    inst: Map<String, Json>,
    /// The assigned address, shown once a phase has `ip`.
    ip: String,
    /// Future phase changes, in time order.
    schedule: VecDeque<(Instant, Phase)>,
    /// The `user_data` of the create request (base64, as sent), for `GET …/user-data`.
    user_data: String,
}

impl Emu {
    fn apply(&mut self, p: Phase) {
        self.inst.insert("status".into(), p.status.into());
        self.inst.insert("power_status".into(), p.power.into());
        self.inst.insert("server_status".into(), p.server.into());
        if p.ip {
            let octets: Vec<&str> = self.ip.split('.').collect();
            self.inst.insert("main_ip".into(), self.ip.clone().into());
            self.inst.insert("netmask_v4".into(), "255.255.254.0".into());
            self.inst.insert(
                "gateway_v4".into(),
                format!("{}.{}.{}.1", octets[0], octets[1], octets[2]).into(),
            );
        }
    }

    fn settle(&mut self, now: Instant) {
        while let Some((at, p)) = self.schedule.front().copied() {
            if at > now {
                break;
            }
            self.schedule.pop_front();
            self.apply(p);
        }
    }

    fn field(&self, k: &str) -> &str {
        self.inst.get(k).and_then(Json::as_str).unwrap_or("")
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Status(u16),
    Delay(Duration),
}

struct State {
    cfg: EmulatorConfig,
    regions: Vec<Json>,
    plans: Vec<Json>,
    os: Vec<Json>,
    instances: Vec<Emu>,
    reserved_ips: Vec<Map<String, Json>>,
    /// Injected faults for the next requests, in order.
    fail_next: VecDeque<Fault>,
    window: HashMap<IpAddr, (Instant, u32)>,
    created: u32,
    requests: u64,
}

/// A running emulator on its own thread; stops when dropped.
pub struct Emulator {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Emulator {
    /// Binds `addr` (use port 0 in tests) and serves on a thread of its own.
    pub fn start(addr: SocketAddr, cfg: EmulatorConfig) -> std::io::Result<Emulator> {
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let state = new_state(cfg);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("vultr-emulator".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("emulator runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(std_listener).expect("emulator listener");
                    serve(listener, st, async {
                        let _ = stopped.await;
                    })
                    .await
                })
            })?;
        Ok(Emulator {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The base URL to give a client: `http://127.0.0.1:PORT/v2`.
    pub fn endpoint(&self) -> String {
        format!("http://{}/v2", self.addr)
    }

    /// Answers the next `count` requests with `status` (e.g. 429 or 503).
    pub fn fail_next(&self, status: u16, count: usize) {
        let mut s = self.state.lock().expect("emulator state");
        s.fail_next
            .extend(std::iter::repeat_n(Fault::Status(status), count));
    }

    /// Answers the next `count` requests only after `delay` (to exercise client timeouts).
    pub fn delay_next(&self, delay: Duration, count: usize) {
        let mut s = self.state.lock().expect("emulator state");
        s.fail_next
            .extend(std::iter::repeat_n(Fault::Delay(delay), count));
    }

    /// Requests served so far (including refused ones).
    pub fn requests(&self) -> u64 {
        self.state.lock().expect("emulator state").requests
    }

    /// Instances that exist now.
    pub fn instance_count(&self) -> usize {
        self.state.lock().expect("emulator state").instances.len()
    }

    /// Simulates a crash of instance `id`: from now on the API reports it
    /// `active` / `stopped` / `ok` (powered off, not locked), as after a kernel panic or a
    /// host failure. Returns false when there is no such instance.
    pub fn crash(&self, id: &str) -> bool {
        let mut s = self.state.lock().expect("emulator state");
        let now = Instant::now();
        match s.instances.iter_mut().find(|e| e.field("id") == id) {
            Some(e) => {
                e.settle(now);
                e.schedule.clear();
                e.apply(Phase {
                    status: "active",
                    power: "stopped",
                    server: "ok",
                    ip: true,
                });
                true
            }
            None => false,
        }
    }

    /// The reserved IPs as the API shows them.
    pub fn reserved_ips(&self) -> Vec<Json> {
        let s = self.state.lock().expect("emulator state");
        s.reserved_ips.iter().cloned().map(Json::Object).collect()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn new_state(cfg: EmulatorConfig) -> Arc<Mutex<State>> {
    Arc::new(Mutex::new(State {
        cfg,
        regions: regions(),
        plans: plans(),
        os: os_list(),
        instances: Vec::new(),
        reserved_ips: Vec::new(),
        fail_next: VecDeque::new(),
        window: HashMap::new(),
        created: 0,
        requests: 0,
    }))
}

/// Serves the emulator on `listener` until `shutdown` completes (for `stage vultr-emulator`).
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    cfg: EmulatorConfig,
    shutdown: impl std::future::Future<Output = ()>,
) {
    serve(listener, new_state(cfg), shutdown).await
}

async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<Mutex<State>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let state = state.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, peer.ip(), req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.abort_all();
}

fn reply(status: u16, body: Option<Json>) -> Response<Full<Bytes>> {
    let mut b =
        Response::builder().status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    let bytes = match body {
        Some(v) => {
            b = b.header("Content-Type", "application/json");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    b.body(Full::new(bytes)).expect("a valid response")
}

fn error(status: u16, message: &str) -> Response<Full<Bytes>> {
    reply(status, Some(json!({"error": message, "status": status})))
}

fn query_map(req: &Request<Incoming>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for pair in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(percent_decode(k), percent_decode(v));
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(state: &Arc<Mutex<State>>, peer: IpAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = query_map(&req);
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(413, "Request body too large."),
    };
    let fault = {
        let mut s = state.lock().expect("emulator state");
        s.requests += 1;
        if path == "/__emulator/fail" && method == Method::POST {
            let v: Json = serde_json::from_slice(&body).unwrap_or(Json::Null);
            let count = v.get("count").and_then(Json::as_u64).unwrap_or(1) as usize;
            let fault = match v.get("delay_ms").and_then(Json::as_u64) {
                Some(ms) => Fault::Delay(Duration::from_millis(ms)),
                None => Fault::Status(v.get("status").and_then(Json::as_u64).unwrap_or(429) as u16),
            };
            s.fail_next.extend(std::iter::repeat_n(fault, count));
            return reply(204, None);
        }
        s.fail_next.pop_front()
    };
    match fault {
        Some(Fault::Status(status)) => {
            let msg = if status == 429 {
                "Rate limit reached - please try your request again later."
            } else {
                "Internal server error."
            };
            return error(status, msg);
        }
        // The lock is not held while sleeping: other connections are served meanwhile.
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        None => {}
    }
    let mut s = state.lock().expect("emulator state");
    let now = Instant::now();
    if let Some(limit) = s.cfg.rate_limit {
        let w = s.window.entry(peer).or_insert((now, 0));
        if now.duration_since(w.0) >= Duration::from_secs(1) {
            *w = (now, 0);
        }
        w.1 += 1;
        if w.1 > limit {
            return error(429, "Rate limit reached - please try your request again later.");
        }
    }
    for e in s.instances.iter_mut() {
        e.settle(now);
    }
    let Some(rest) = path.strip_prefix("/v2") else {
        return error(404, "Invalid API endpoint.");
    };
    let segs: Vec<&str> = rest
        .trim_matches('/')
        .split('/')
        .filter(|x| !x.is_empty())
        .collect();
    let authed = auth.as_deref() == Some(format!("Bearer {}", s.cfg.api_key).as_str());
    match (&method, segs.as_slice()) {
        (&Method::GET, ["regions"]) => list(&s.regions.clone(), "regions", &query),
        (&Method::GET, ["regions", id, "availability"]) => {
            if !s.regions.iter().any(|r| r["id"] == *id) {
                return error(404, "region not found");
            }
            let avail: Vec<Json> = s
                .plans
                .iter()
                .filter(|p| {
                    p["locations"]
                        .as_array()
                        .is_some_and(|l| l.iter().any(|x| x == id))
                })
                .map(|p| p["id"].clone())
                .collect();
            reply(200, Some(json!({ "available_plans": avail })))
        }
        (&Method::GET, ["plans"]) => {
            let kind = query.get("type").map(String::as_str).unwrap_or("all");
            let plans: Vec<Json> = s
                .plans
                .iter()
                .filter(|p| kind == "all" || p["type"] == kind)
                .cloned()
                .collect();
            list(&plans, "plans", &query)
        }
        (&Method::GET, ["os"]) => list(&s.os.clone(), "os", &query),
        (_, ["instances", ..]) if !authed => error(401, "Invalid API token."),
        (&Method::GET, ["instances"]) => {
            let items: Vec<Json> = s
                .instances
                .iter()
                .filter(|e| {
                    query.get("tag").is_none_or(|t| {
                        e.inst["tags"]
                            .as_array()
                            .is_some_and(|a| a.iter().any(|x| x == t.as_str()))
                    }) && query.get("label").is_none_or(|l| e.field("label") == l)
                        && query.get("main_ip").is_none_or(|ip| e.field("main_ip") == ip)
                        && query.get("region").is_none_or(|r| e.field("region") == r)
                })
                .map(|e| Json::Object(e.inst.clone()))
                .collect();
            list(&items, "instances", &query)
        }
        (&Method::POST, ["instances"]) => create(&mut s, &body, now),
        (&Method::GET, ["instances", id, "user-data"]) => {
            match s.instances.iter().find(|e| e.field("id") == *id) {
                Some(e) => reply(200, Some(json!({ "user_data": { "data": e.user_data } }))),
                None => error(404, "instance not found"),
            }
        }
        (_, ["reserved-ips", ..]) if !authed => error(401, "Invalid API token."),
        (_, ["reserved-ips", rest @ ..]) => reserved_ips(&mut s, &method, rest, &body, &query),
        (&Method::GET, ["instances", id]) => match s.instances.iter().find(|e| e.field("id") == *id) {
            Some(e) => reply(200, Some(json!({ "instance": e.inst }))),
            None => error(404, "instance not found"),
        },
        (&Method::DELETE, ["instances", id]) => {
            let Some(i) = s.instances.iter().position(|e| e.field("id") == *id) else {
                return error(404, "instance not found");
            };
            if s.cfg.locked_delete_fails && s.instances[i].field("server_status") == "locked" {
                return error(
                    500,
                    "Unable to destroy server: Unable to remove VM: Server is currently locked",
                );
            }
            s.instances.remove(i);
            for r in s.reserved_ips.iter_mut() {
                if r.get("instance_id").and_then(Json::as_str) == Some(*id) {
                    r.insert("instance_id".into(), json!(""));
                }
            }
            reply(204, None)
        }
        (&Method::POST, ["instances", id, action @ ("start" | "halt" | "reboot")]) => {
            let lc = s.cfg.lifecycle.clone();
            let Some(e) = s.instances.iter_mut().find(|e| e.field("id") == *id) else {
                return error(404, "instance not found");
            };
            if !e.schedule.is_empty() || e.field("status") != "active" {
                return error(
                    400,
                    &format!("Unable to {action} server: Server is currently locked"),
                );
            }
            match *action {
                "halt" => {
                    e.inst.insert("power_status".into(), "stopped".into());
                }
                "start" if e.field("power_status") == "stopped" => {
                    e.inst.insert("power_status".into(), "running".into());
                }
                _ => {
                    // start on a running box restarts it, as reboot does: briefly stopped and locked.
                    let down = Phase {
                        status: "active",
                        power: "stopped",
                        server: "locked",
                        ip: true,
                    };
                    let up = Phase {
                        status: "active",
                        power: "running",
                        server: "ok",
                        ip: true,
                    };
                    e.apply(down);
                    e.schedule
                        .push_back((now + lc.ok_after.saturating_sub(lc.installing_after), up));
                }
            }
            reply(204, None)
        }
        (_, ["regions" | "plans" | "os"]) | (_, ["instances", ..]) => error(405, "Method not allowed."),
        _ => error(404, "Invalid API endpoint."),
    }
}

/// One page of `items` as the API pages lists: `per_page` (default 100, at most 500) and an
/// opaque `cursor` (base64 of `next__<offset>` / `prev__<offset>`).
fn list(items: &[Json], key: &str, query: &HashMap<String, String>) -> Response<Full<Bytes>> {
    let per_page = match query.get("per_page") {
        None => 100,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=500).contains(&n) => n,
            _ => return error(400, "per_page must be an integer from 1 to 500."),
        },
    };
    let offset = match query.get("cursor").filter(|c| !c.is_empty()) {
        None => 0,
        Some(c) => {
            let decoded = super::base64_decode(c).and_then(|b| String::from_utf8(b).ok());
            let off = decoded.as_deref().and_then(|d| {
                d.strip_prefix("next__")
                    .or_else(|| d.strip_prefix("prev__"))
                    .and_then(|n| n.parse::<usize>().ok())
            });
            match off {
                Some(o) => o.min(items.len()),
                None => return error(400, "Invalid cursor."),
            }
        }
    };
    let end = (offset + per_page).min(items.len());
    let next = if end < items.len() {
        super::base64_encode(format!("next__{end}").as_bytes())
    } else {
        String::new()
    };
    let prev = if offset > 0 {
        super::base64_encode(format!("prev__{}", offset.saturating_sub(per_page)).as_bytes())
    } else {
        String::new()
    };
    reply(
        200,
        Some(json!({
            key: &items[offset..end],
            "meta": {"total": items.len(), "links": {"next": next, "prev": prev}},
        })),
    )
}

fn opt_str<'a>(req: &'a Map<String, Json>, k: &str) -> Result<Option<&'a str>, String> {
    match req.get(k) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("{k} must be a string.")),
    }
}

fn create(s: &mut State, body: &[u8], now: Instant) -> Response<Full<Bytes>> {
    let req: Map<String, Json> = match serde_json::from_slice::<Json>(body) {
        Ok(Json::Object(m)) => m,
        _ => return error(400, "Invalid JSON body."),
    };
    let fields = (|| -> Result<_, String> {
        let region = opt_str(&req, "region")?.ok_or("region is required.")?;
        let plan = opt_str(&req, "plan")?.ok_or("plan is required.")?;
        let label = opt_str(&req, "label")?.unwrap_or("").to_string();
        let hostname = opt_str(&req, "hostname")?.unwrap_or("").to_string();
        let mut tags: Vec<Json> = match req.get("tags") {
            None | Some(Json::Null) => vec![],
            Some(Json::Array(a)) if a.iter().all(Json::is_string) => a.clone(),
            Some(_) => return Err("tags must be an array of strings.".into()),
        };
        if let Some(t) = opt_str(&req, "tag")? {
            tags.push(t.into());
        }
        if let Some(u) = opt_str(&req, "user_data")? {
            if super::base64_decode(u).is_none() {
                return Err("user_data must be base64 encoded.".into());
            }
        }
        let os_id = match req.get("os_id") {
            None | Some(Json::Null) => None,
            Some(v) => Some(v.as_i64().ok_or("os_id must be an integer.")?),
        };
        let user_data = opt_str(&req, "user_data")?.unwrap_or("").to_string();
        let vpc = match (req.get("enable_vpc"), req.get("attach_vpc")) {
            (Some(Json::Bool(true)), _) => true,
            (_, Some(Json::Array(a))) if !a.is_empty() => {
                if !a.iter().all(Json::is_string) {
                    return Err("attach_vpc must be an array of VPC ids.".into());
                }
                true
            }
            _ => false,
        };
        Ok((
            region.to_string(),
            plan.to_string(),
            label,
            hostname,
            tags,
            os_id,
            user_data,
            vpc,
        ))
    })();
    let (region, plan_id, label, hostname, tags, os_id, user_data, vpc) = match fields {
        Ok(f) => f,
        Err(m) => return error(400, &m),
    };
    if !s.regions.iter().any(|r| r["id"] == region.as_str()) {
        return error(400, &format!("Invalid region: {region}."));
    }
    let Some(plan) = s.plans.iter().find(|p| p["id"] == plan_id.as_str()).cloned() else {
        return error(400, &format!("Invalid plan: {plan_id}."));
    };
    if !plan["locations"]
        .as_array()
        .is_some_and(|l| l.iter().any(|x| x == region.as_str()))
    {
        return error(
            400,
            &format!("Plan {plan_id} is not available in region {region}."),
        );
    }
    let other_image = ["app_id", "image_id", "snapshot_id", "iso_id"]
        .iter()
        .any(|k| req.get(*k).is_some_and(|v| !v.is_null()));
    let os = match os_id {
        Some(id) => match s.os.iter().find(|o| o["id"] == id) {
            Some(o) => o.clone(),
            None => return error(400, &format!("Invalid operating system: {id}.")),
        },
        None if other_image => json!({"id": 0, "name": "Custom"}),
        None => {
            return error(
                400,
                "An operating system, application, snapshot, ISO or image is required.",
            )
        }
    };
    s.created += 1;
    let n = s.created;
    let id = uuid4();
    let ip = format!("198.18.{}.{}", (n / 250) % 256, n % 250 + 2);
    let lc = s.cfg.lifecycle.clone();
    let mut inst = Map::new();
    for (k, v) in [
        ("id", json!(id)),
        ("os", os["name"].clone()),
        ("ram", plan["ram"].clone()),
        ("disk", plan["disk"].clone()),
        ("main_ip", json!("0.0.0.0")),
        ("vcpu_count", plan["vcpu_count"].clone()),
        ("region", json!(region)),
        ("plan", json!(plan_id)),
        ("date_created", json!(iso8601(SystemTime::now()))),
        ("status", json!("pending")),
        ("allowed_bandwidth", plan["bandwidth"].clone()),
        ("netmask_v4", json!("")),
        ("gateway_v4", json!("0.0.0.0")),
        ("power_status", json!("running")),
        ("server_status", json!("none")),
        ("v6_network", json!("")),
        ("v6_main_ip", json!("")),
        ("v6_network_size", json!(0)),
        ("label", json!(label)),
        (
            "internal_ip",
            json!(if vpc {
                format!("{}{}", s.cfg.vpc_prefix, n % 250 + 3)
            } else {
                String::new()
            }),
        ),
        ("kvm", json!("")),
        (
            "hostname",
            json!(if hostname.is_empty() {
                "vultr.guest".to_string()
            } else {
                hostname
            }),
        ),
        ("os_id", os["id"].clone()),
        (
            "app_id",
            req.get("app_id")
                .filter(|v| v.is_i64())
                .cloned()
                .unwrap_or(json!(0)),
        ),
        ("image_id", json!("")),
        ("snapshot_id", json!("")),
        ("firewall_group_id", json!("")),
        ("features", json!([])),
        ("tags", Json::Array(tags)),
        ("user_scheme", json!("root")),
        ("vpc_only", json!(false)),
    ] {
        inst.insert(k.into(), v);
    }
    let mut shown = inst.clone();
    shown.insert("default_password".into(), json!(password()));
    let phase = |status, power, server, ip| Phase {
        status,
        power,
        server,
        ip,
    };
    let schedule = VecDeque::from([
        (now + lc.locked_after, phase("active", "stopped", "locked", true)),
        (
            now + lc.installing_after,
            phase("active", "running", "installingbooting", true),
        ),
        (now + lc.ok_after, phase("active", "running", "ok", true)),
    ]);
    s.instances.push(Emu {
        inst,
        ip,
        schedule,
        user_data,
    });
    reply(202, Some(json!({ "instance": shown })))
}

/// `/v2/reserved-ips[/{id}[/attach|/detach]]` (authenticated already).
fn reserved_ips(
    s: &mut State,
    method: &Method,
    rest: &[&str],
    body: &[u8],
    query: &HashMap<String, String>,
) -> Response<Full<Bytes>> {
    let parse_body = || -> Result<Map<String, Json>, &'static str> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Map::new());
        }
        match serde_json::from_slice::<Json>(body) {
            Ok(Json::Object(m)) => Ok(m),
            _ => Err("Invalid JSON body."),
        }
    };
    let find = |s: &State, id: &str| {
        s.reserved_ips
            .iter()
            .position(|r| r.get("id").and_then(Json::as_str) == Some(id))
    };
    match (method, rest) {
        (&Method::GET, []) => {
            let items: Vec<Json> = s.reserved_ips.iter().cloned().map(Json::Object).collect();
            list(&items, "reserved_ips", query)
        }
        (&Method::POST, []) => {
            let req = match parse_body() {
                Ok(m) => m,
                Err(m) => return error(400, m),
            };
            let fields = (|| -> Result<_, String> {
                let region = opt_str(&req, "region")?.ok_or("region is required.")?;
                let ip_type = opt_str(&req, "ip_type")?.ok_or("ip_type is required.")?;
                if ip_type != "v4" && ip_type != "v6" {
                    return Err("ip_type must be v4 or v6.".into());
                }
                let label = opt_str(&req, "label")?.unwrap_or("").to_string();
                Ok((region.to_string(), ip_type.to_string(), label))
            })();
            let (region, ip_type, label) = match fields {
                Ok(f) => f,
                Err(m) => return error(400, &m),
            };
            if !s.regions.iter().any(|r| r["id"] == region.as_str()) {
                return error(400, &format!("Invalid region: {region}."));
            }
            s.created += 1;
            let n = s.created;
            // Documentation ranges (RFC 5737 / RFC 3849): never a real address.
            let (subnet, size) = if ip_type == "v4" {
                (format!("203.0.113.{}", n % 250 + 2), 32)
            } else {
                (format!("2001:db8:{:x}::", n), 64)
            };
            let r = json!({"id": uuid4(), "region": region, "ip_type": ip_type, "subnet": subnet,
                           "subnet_size": size, "label": label, "instance_id": ""});
            let Json::Object(m) = r.clone() else {
                unreachable!()
            };
            s.reserved_ips.push(m);
            reply(201, Some(json!({ "reserved_ip": r })))
        }
        (&Method::GET, [id]) => match find(s, id) {
            Some(i) => reply(200, Some(json!({ "reserved_ip": s.reserved_ips[i] }))),
            None => error(404, "reserved IP not found"),
        },
        (&Method::PATCH, [id]) => {
            let req = match parse_body() {
                Ok(m) => m,
                Err(m) => return error(400, m),
            };
            let Some(i) = find(s, id) else {
                return error(404, "reserved IP not found");
            };
            match opt_str(&req, "label") {
                Ok(Some(l)) => {
                    s.reserved_ips[i].insert("label".into(), json!(l));
                    reply(202, Some(json!({ "reserved_ip": s.reserved_ips[i] })))
                }
                Ok(None) => error(400, "label is required."),
                Err(m) => error(400, &m),
            }
        }
        (&Method::DELETE, [id]) => match find(s, id) {
            Some(i) => {
                s.reserved_ips.remove(i);
                reply(204, None)
            }
            None => error(404, "reserved IP not found"),
        },
        (&Method::POST, [id, "attach"]) => {
            let req = match parse_body() {
                Ok(m) => m,
                Err(m) => return error(400, m),
            };
            let Some(i) = find(s, id) else {
                return error(404, "reserved IP not found");
            };
            let instance = match opt_str(&req, "instance_id") {
                Ok(Some(x)) if !x.is_empty() => x.to_string(),
                Ok(_) => return error(400, "instance_id is required."),
                Err(m) => return error(400, &m),
            };
            let Some(inst) = s.instances.iter().find(|e| e.field("id") == instance) else {
                return error(400, "Unable to attach reserved IP: invalid instance_id.");
            };
            let r = &s.reserved_ips[i];
            if inst.field("region") != r["region"].as_str().unwrap_or("") {
                return error(
                    400,
                    "Unable to attach reserved IP: the instance is in another region.",
                );
            }
            if r["instance_id"].as_str().is_some_and(|x| !x.is_empty()) {
                return error(400, "Floating IPv4 address is already attached to another server");
            }
            s.reserved_ips[i].insert("instance_id".into(), json!(instance));
            reply(204, None)
        }
        (&Method::POST, [id, "detach"]) => {
            let Some(i) = find(s, id) else {
                return error(404, "reserved IP not found");
            };
            if s.reserved_ips[i]["instance_id"].as_str().unwrap_or("").is_empty() {
                return error(400, "Unable to detach reserved IP: it is not attached.");
            }
            s.reserved_ips[i].insert("instance_id".into(), json!(""));
            reply(204, None)
        }
        _ => error(405, "Method not allowed."),
    }
}

fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

fn uuid4() -> String {
    let (a, b) = (random_u64(), random_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

fn password() -> String {
    let chars = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789#{}";
    (0..16)
        .map(|_| chars[(random_u64() % chars.len() as u64) as usize] as char)
        .collect()
}

/// `2026-11-22T02:30:00+00:00`, as the real API formats dates.
fn iso8601(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days → civil date.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn regions() -> Vec<Json> {
    let all = [
        "ddos_protection",
        "block_storage_high_perf",
        "load_balancers",
        "kubernetes",
    ];
    [
        ("ams", "Amsterdam", "NL", "Europe"),
        ("atl", "Atlanta", "US", "North America"),
        ("cdg", "Paris", "FR", "Europe"),
        ("ewr", "New Jersey", "US", "North America"),
        ("fra", "Frankfurt", "DE", "Europe"),
        ("icn", "Seoul", "KR", "Asia"),
        ("lax", "Los Angeles", "US", "North America"),
        ("lhr", "London", "GB", "Europe"),
        ("nrt", "Tokyo", "JP", "Asia"),
        ("sgp", "Singapore", "SG", "Asia"),
        ("syd", "Sydney", "AU", "Australia"),
        ("sea", "Seattle", "US", "North America"),
    ]
    .iter()
    .map(|(id, city, country, continent)| json!({"id": id, "city": city, "country": country, "continent": continent, "options": all}))
    .collect()
}

fn plans() -> Vec<Json> {
    let everywhere = [
        "ams", "atl", "cdg", "ewr", "fra", "icn", "lax", "lhr", "nrt", "sgp", "syd", "sea",
    ];
    let some = ["ewr", "lax", "fra", "icn", "nrt"];
    [
        ("vc2-1c-0.5gb", 1, 512, 10, 500, 2.5, "vc2", &["ewr", "atl"][..]),
        ("vc2-1c-1gb", 1, 1024, 25, 1024, 5.0, "vc2", &everywhere[..]),
        ("vc2-1c-2gb", 1, 2048, 55, 2048, 10.0, "vc2", &everywhere[..]),
        ("vc2-2c-4gb", 2, 4096, 80, 3072, 20.0, "vc2", &everywhere[..]),
        ("vc2-4c-8gb", 4, 8192, 160, 4096, 40.0, "vc2", &everywhere[..]),
        ("vhf-1c-1gb", 1, 1024, 32, 1024, 6.0, "vhf", &some[..]),
        ("vhf-2c-4gb", 2, 4096, 128, 3072, 24.0, "vhf", &some[..]),
        ("vhp-1c-1gb-amd", 1, 1024, 25, 2048, 6.0, "vhp", &some[..]),
        ("vhp-2c-4gb-amd", 2, 4096, 100, 5120, 24.0, "vhp", &some[..]),
        (
            "vdc-2c-8gb",
            2,
            8192,
            110,
            10240,
            60.0,
            "vdc",
            &["ewr", "lax"][..],
        ),
        ("voc-c-2c-4gb-50s-amd", 2, 4096, 50, 5120, 40.0, "voc", &some[..]),
    ]
    .iter()
    .map(|(id, cpu, ram, disk, bw, cost, kind, locs)| {
        json!({"id": id, "vcpu_count": cpu, "ram": ram, "disk": disk, "disk_count": 1, "bandwidth": bw,
               "monthly_cost": cost, "type": kind, "locations": locs})
    })
    .collect()
}

fn os_list() -> Vec<Json> {
    [
        (124, "Windows 2012 R2 x64", "x64", "windows"),
        (159, "Custom", "x64", "iso"),
        (164, "Snapshot", "x64", "snapshot"),
        (186, "Application", "x64", "application"),
        (477, "Debian 11 x64 (bullseye)", "x64", "debian"),
        (1743, "Ubuntu 22.04 LTS x64", "x64", "ubuntu"),
        (1868, "AlmaLinux 9 x64", "x64", "almalinux"),
        (2136, "Debian 12 x64 (bookworm)", "x64", "debian"),
        (2284, "Ubuntu 24.04 LTS x64", "x64", "ubuntu"),
        (2187, "Fedora 40 x64", "x64", "fedora"),
    ]
    .iter()
    .map(|(id, name, arch, family)| json!({"id": id, "name": name, "arch": arch, "family": family}))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_iso8601() {
        assert_eq!(iso8601(UNIX_EPOCH), "1970-01-01T00:00:00+00:00");
        assert_eq!(
            iso8601(UNIX_EPOCH + Duration::from_secs(1_602_294_980)),
            "2020-10-10T01:56:20+00:00"
        );
    }

    #[test]
    fn ids_look_like_uuids() {
        let id = uuid4();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(id, uuid4());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("bmV4dF9fMjMw%3D"), "bmV4dF9fMjMw=");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
