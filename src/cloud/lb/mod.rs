//! The LB controller behind the `lb` Lua module, in plain Rust (no mlua): the desired state of
//! each load balancer ([`Spec`], parsed from JSON with errors naming the field), the HAProxy
//! config renderer ([`render`]), the HAProxy driver (process and runtime API, [`haproxy`]),
//! the persisted store ([`store`]), the controller with its reconcile / health / fail-over loop
//! ([`controller`]), the autoscaling policy ([`autoscale`]) and the remote (VM) mode's
//! cloud-init rendering ([`remote`]).
//!
//! The design follows Octavia and the Kubernetes service controller (see docs/lb.md): the
//! desired state is persisted first, the data plane (one HAProxy master-worker process per LB)
//! is converged to it, membership changes go through the runtime API *and* the rendered config,
//! structural changes go through render → `haproxy -c` → state dump → seamless reload.

pub mod autoscale;
pub mod controller;
pub mod haproxy;
pub mod remote;
pub mod remote_ctl;
pub mod render;
pub mod store;

pub use controller::{Controller, Event, Info};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use std::net::SocketAddr;

/// An error of the LB controller: the text names the LB, the field and the limit.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum LbError {
    /// Bad input: which field, and what was wrong with it.
    #[error("{0}")]
    Invalid(String),
    /// HAProxy refused a config or a command; the running LB is untouched.
    #[error("{0}")]
    Rejected(String),
    /// An LB (or a backend) that does not exist, or that already exists.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    /// The data plane or the store failed.
    #[error("{0}")]
    Failed(String),
}

pub type Result<T> = std::result::Result<T, LbError>;

pub(crate) fn invalid(msg: impl Into<String>) -> LbError {
    LbError::Invalid(msg.into())
}

/// Traffic mode of the frontend and backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Tcp,
}

impl Protocol {
    pub fn word(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
        }
    }
}

/// The balancing algorithm; both are HAProxy "dynamic" algorithms, which runtime `add server`
/// requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Roundrobin,
    Leastconn,
}

impl Algorithm {
    pub fn word(self) -> &'static str {
        match self {
            Algorithm::Roundrobin => "roundrobin",
            Algorithm::Leastconn => "leastconn",
        }
    }
}

/// Health checks, from the seed's criteria.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// `http` (an HTTP request to `path`, expecting `expect`) or `tcp` (a connect).
    pub protocol: Protocol,
    pub path: String,
    /// HAProxy's `http-check expect status` codes: `200`, `200-399`, `200,204`.
    pub expect: String,
    /// Another port to check on (the backend's own port when absent).
    pub port: Option<u16>,
    /// Seconds between checks (`inter`).
    pub interval: f64,
    /// Seconds a check may take (`timeout check`).
    pub timeout: f64,
    /// Passed checks to become UP (`rise`).
    pub healthy: u32,
    /// Failed checks to become DOWN (`fall`).
    pub unhealthy: u32,
}

impl Health {
    fn default_for(protocol: Protocol) -> Health {
        Health {
            protocol,
            path: "/".into(),
            expect: "200-399".into(),
            port: None,
            interval: 2.0,
            timeout: 1.0,
            healthy: 2,
            unhealthy: 2,
        }
    }
}

/// What target tracking keeps at its target value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Current sessions per ready backend (`scur` of the backend / ready servers).
    SessionsPerBackend,
    /// HTTP requests (or TCP sessions) per second per ready backend.
    RequestsPerSecond,
    /// Requests waiting in the backend's queue (`qcur`), per ready backend.
    Queue,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::SessionsPerBackend => "sessions_per_backend",
            Metric::RequestsPerSecond => "requests_per_second",
            Metric::Queue => "queue",
        }
    }
}

/// Autoscaling by target tracking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Autoscale {
    pub min: usize,
    pub max: usize,
    pub metric: Metric,
    pub target: f64,
    /// Seconds after a scale-out before the next one.
    pub cooldown: f64,
    /// Seconds of lower recommendations before a scale-in (the rolling maximum's window).
    pub stabilization: f64,
    /// Seconds between evaluations.
    pub period: f64,
    /// A script name whose module provides `create(lb)` / `release(lb, address)`; absent when
    /// the provider is a Lua function (then it is attached again by `lb.get`).
    pub provider: Option<String>,
    /// Seconds of warm-up for backends the autoscaler adds: HAProxy's `slowstart`, which
    /// ramps a new server's weight from 0 to full over this time (0 = none).
    #[serde(default)]
    pub warmup: f64,
}

/// One backend server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Backend {
    /// `ip:port` (IPv6 as `[ip]:port`).
    pub address: String,
    /// Added by the autoscaler (only those are scaled in).
    #[serde(default)]
    pub autoscaled: bool,
}

/// The desired state of one load balancer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    pub name: String,
    pub protocol: Protocol,
    pub listen: String,
    pub algorithm: Algorithm,
    pub backends: Vec<Backend>,
    pub health: Health,
    pub autoscale: Option<Autoscale>,
    /// Seconds `remove` waits for a draining backend's sessions to end.
    pub drain: f64,
    /// Per-connection limit of the frontend (`maxconn`).
    pub maxconn: u32,
    /// Extra lines for the backend section, passed to HAProxy as they are (validated by
    /// `haproxy -c` like everything else).
    pub options: Vec<String>,
    /// The seed's project this LB belongs to, if any.
    pub project: Option<String>,
}

/// The longest LB name (it becomes part of file and proxy names).
pub const MAX_NAME: usize = 32;
/// The most backends one LB may have.
pub const MAX_BACKENDS: usize = 256;

/// Checks an LB name: 1 to 32 of `A-Z a-z 0-9 _ -`.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(invalid(format!(
            "{what}: name must be 1 to {MAX_NAME} characters, got {}",
            name.len()
        )));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(invalid(format!(
            "{what}: name {name:?} may only contain letters, digits, '_' and '-'"
        )));
    }
    Ok(())
}

/// Parses and normalises a backend or listen address: an IP literal and a port 1..65535.
pub fn parse_address(field: &str, text: &str) -> Result<SocketAddr> {
    let addr: SocketAddr = text.trim().parse().map_err(|_| {
        invalid(format!(
            "{field}: {text:?} is not an ip:port address (IPv6 as [ip]:port; hostnames are not \
             allowed because HAProxy's runtime-added servers take IP literals)"
        ))
    })?;
    if addr.port() == 0 {
        return Err(invalid(format!("{field}: {text:?}: the port must be 1 to 65535")));
    }
    Ok(addr)
}

fn number(field: &str, v: &Json) -> Result<f64> {
    v.as_f64()
        .filter(|f| f.is_finite())
        .ok_or_else(|| invalid(format!("{field}: expected a number, got {v}")))
}

fn positive(field: &str, v: &Json, max: f64) -> Result<f64> {
    let f = number(field, v)?;
    if f <= 0.0 || f > max {
        return Err(invalid(format!(
            "{field}: must be more than 0 and at most {max}, got {f}"
        )));
    }
    Ok(f)
}

fn count(field: &str, v: &Json, min: u64, max: u64) -> Result<u64> {
    let n = v
        .as_u64()
        .or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as u64)
        })
        .ok_or_else(|| invalid(format!("{field}: expected a whole number, got {v}")))?;
    if n < min || n > max {
        return Err(invalid(format!("{field}: must be {min} to {max}, got {n}")));
    }
    Ok(n)
}

fn text(field: &str, v: &Json) -> Result<String> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| invalid(format!("{field}: expected a string, got {v}")))
}

fn object<'a>(field: &str, v: &'a Json) -> Result<&'a Map<String, Json>> {
    v.as_object()
        .ok_or_else(|| invalid(format!("{field}: expected a table, got {v}")))
}

/// A list: a JSON array, or an empty object (an empty Lua table converts to one).
fn list<'a>(field: &str, v: &'a Json) -> Result<Vec<&'a Json>> {
    match v {
        Json::Array(a) => Ok(a.iter().collect()),
        Json::Object(m) if m.is_empty() => Ok(Vec::new()),
        _ => Err(invalid(format!("{field}: expected a list, got {v}"))),
    }
}

/// One printable line without characters that would change HAProxy's parsing of the config.
fn config_word(field: &str, s: &str, allow_space: bool) -> Result<()> {
    if s.is_empty() || s.len() > 1024 {
        return Err(invalid(format!("{field}: must be 1 to 1024 characters")));
    }
    if s.chars()
        .any(|c| c.is_control() || c == '#' || (!allow_space && c.is_whitespace()))
    {
        return Err(invalid(format!(
            "{field}: {s:?} may not contain control characters, '#'{}",
            if allow_space { "" } else { " or spaces" }
        )));
    }
    Ok(())
}

fn parse_protocol(field: &str, v: &Json) -> Result<Protocol> {
    match text(field, v)?.to_ascii_lowercase().as_str() {
        "http" => Ok(Protocol::Http),
        "tcp" => Ok(Protocol::Tcp),
        other => Err(invalid(format!(
            "{field}: expected \"http\" or \"tcp\", got {other:?}"
        ))),
    }
}

impl Spec {
    /// Parses a create request (`lb.create{...}` converted to JSON). `what` prefixes errors.
    pub fn from_json(what: &str, v: &Json) -> Result<Spec> {
        let m = object(what, v)?;
        let name = text(&format!("{what}: name"), m.get("name").unwrap_or(&Json::Null))?;
        check_name(what, &name)?;
        let mut spec = Spec {
            name,
            protocol: Protocol::Http,
            listen: String::new(),
            algorithm: Algorithm::Roundrobin,
            backends: Vec::new(),
            health: Health::default_for(Protocol::Http),
            autoscale: None,
            drain: 30.0,
            maxconn: 4096,
            options: Vec::new(),
            project: None,
        };
        if let Some(p) = m.get("protocol") {
            spec.protocol = parse_protocol(&format!("{what}: protocol"), p)?;
            spec.health.protocol = spec.protocol;
        }
        if !m.contains_key("listen") {
            return Err(invalid(format!("{what}: listen is required (\"ip:port\")")));
        }
        spec.apply(what, m, true)?;
        Ok(spec)
    }

    /// Applies the fields of an update (`web.update{...}`); `name` may not change.
    pub fn updated(&self, what: &str, v: &Json) -> Result<Spec> {
        let m = object(what, v)?;
        if let Some(n) = m.get("name") {
            if n.as_str() != Some(self.name.as_str()) {
                return Err(invalid(format!(
                    "{what}: name cannot change (delete and create instead)"
                )));
            }
        }
        let mut spec = self.clone();
        spec.apply(what, m, false)?;
        Ok(spec)
    }

    fn apply(&mut self, what: &str, m: &Map<String, Json>, creating: bool) -> Result<()> {
        for (k, v) in m {
            let field = format!("{what}: {k}");
            match k.as_str() {
                "name" => {}
                "protocol" => {
                    let p = parse_protocol(&field, v)?;
                    if p != self.protocol && !m.contains_key("health") {
                        self.health.protocol = p;
                    }
                    self.protocol = p;
                }
                "listen" => {
                    let s = text(&field, v)?;
                    let a = parse_address(&field, &s)?;
                    self.listen = a.to_string();
                }
                "algorithm" => {
                    self.algorithm = match text(&field, v)?.as_str() {
                        "roundrobin" => Algorithm::Roundrobin,
                        "leastconn" => Algorithm::Leastconn,
                        other => {
                            return Err(invalid(format!(
                                "{field}: expected \"roundrobin\" or \"leastconn\", got {other:?}"
                            )))
                        }
                    }
                }
                "backends" => {
                    if !creating {
                        return Err(invalid(format!(
                            "{field}: change backends with add and remove (they apply live)"
                        )));
                    }
                    let items = list(&field, v)?;
                    if items.len() > MAX_BACKENDS {
                        return Err(invalid(format!("{field}: at most {MAX_BACKENDS} backends")));
                    }
                    for (i, item) in items.iter().enumerate() {
                        let f = format!("{field}[{}]", i + 1);
                        let addr = parse_address(&f, &text(&f, item)?)?.to_string();
                        if self.backends.iter().any(|b| b.address == addr) {
                            return Err(invalid(format!("{f}: {addr} is listed twice")));
                        }
                        self.backends.push(Backend {
                            address: addr,
                            autoscaled: false,
                        });
                    }
                }
                "health" => self.health = parse_health(&field, v, self.protocol)?,
                "autoscale" => {
                    self.autoscale = match v {
                        Json::Null | Json::Bool(false) => None,
                        _ => Some(parse_autoscale(&field, v)?),
                    }
                }
                "drain" => self.drain = positive(&field, v, 3600.0)?,
                "maxconn" => self.maxconn = count(&field, v, 1, 1_000_000)? as u32,
                "options" => {
                    let mut out = Vec::new();
                    for (i, item) in list(&field, v)?.iter().enumerate() {
                        let f = format!("{field}[{}]", i + 1);
                        let s = text(&f, item)?;
                        config_word(&f, &s, true)?;
                        out.push(s);
                    }
                    self.options = out;
                }
                "project" => {
                    let s = text(&field, v)?;
                    config_word(&field, &s, true)?;
                    self.project = Some(s);
                }
                other => {
                    return Err(invalid(format!(
                        "{what}: unknown field {other:?} (expected name, protocol, listen, algorithm, \
                         backends, health, autoscale, drain, maxconn, options, project, placement, \
                         on_change, on_failover)"
                    )))
                }
            }
        }
        if self.health.protocol == Protocol::Http && self.protocol == Protocol::Tcp {
            // An HTTP check of a TCP service is fine (HAProxy sends it on its own connection).
        }
        Ok(())
    }
}

fn parse_health(field: &str, v: &Json, protocol: Protocol) -> Result<Health> {
    let m = object(field, v)?;
    let mut h = Health::default_for(protocol);
    for (k, v) in m {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "protocol" => h.protocol = parse_protocol(&f, v)?,
            "path" => {
                let s = text(&f, v)?;
                config_word(&f, &s, false)?;
                if !s.starts_with('/') {
                    return Err(invalid(format!("{f}: must start with '/', got {s:?}")));
                }
                h.path = s;
            }
            "expect" => {
                let s = match v {
                    Json::Number(_) => count(&f, v, 100, 599)?.to_string(),
                    _ => text(&f, v)?,
                };
                let ok = !s.is_empty()
                    && s.split(',').all(|part| {
                        let mut ends = part.splitn(2, '-');
                        ends.all(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_digit()))
                    });
                if !ok {
                    return Err(invalid(format!(
                        "{f}: expected HTTP status codes like \"200\", \"200-399\" or \"200,204\", got {s:?}"
                    )));
                }
                h.expect = s;
            }
            "port" => h.port = Some(count(&f, v, 1, 65535)? as u16),
            "interval" => h.interval = positive(&f, v, 3600.0)?,
            "timeout" => h.timeout = positive(&f, v, 3600.0)?,
            "healthy" => h.healthy = count(&f, v, 1, 100)? as u32,
            "unhealthy" => h.unhealthy = count(&f, v, 1, 100)? as u32,
            other => {
                return Err(invalid(format!(
                    "{field}: unknown field {other:?} (expected protocol, path, expect, port, interval, \
                     timeout, healthy, unhealthy)"
                )))
            }
        }
    }
    if h.timeout > h.interval {
        return Err(invalid(format!(
            "{field}.timeout: must not exceed interval ({} s), got {} s",
            h.interval, h.timeout
        )));
    }
    Ok(h)
}

fn parse_autoscale(field: &str, v: &Json) -> Result<Autoscale> {
    let m = object(field, v)?;
    let mut a = Autoscale {
        min: 1,
        max: 4,
        metric: Metric::SessionsPerBackend,
        target: 50.0,
        cooldown: 30.0,
        stabilization: 300.0,
        warmup: 0.0,
        period: 1.0,
        provider: None,
    };
    let mut saw_target = false;
    for (k, v) in m {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "min" => a.min = count(&f, v, 0, MAX_BACKENDS as u64)? as usize,
            "max" => a.max = count(&f, v, 1, MAX_BACKENDS as u64)? as usize,
            "cooldown" => a.cooldown = number(&f, v).and_then(|n| nonneg(&f, n))?,
            "stabilization" => a.stabilization = number(&f, v).and_then(|n| nonneg(&f, n))?,
            "period" => a.period = positive(&f, v, 3600.0)?,
            "warmup" => a.warmup = number(&f, v).and_then(|n| nonneg(&f, n))?,
            "provider" => match v {
                Json::String(s) => a.provider = Some(s.clone()),
                // A function provider is kept by the Lua binding; it arrives here as `true`.
                Json::Bool(true) => a.provider = None,
                _ => {
                    return Err(invalid(format!(
                        "{f}: expected a function or a script name, got {v}"
                    )))
                }
            },
            "target" => {
                let t = object(&f, v)?;
                if t.len() != 1 {
                    return Err(invalid(format!(
                        "{f}: expected exactly one of sessions_per_backend, requests_per_second, queue"
                    )));
                }
                let (mk, mv) = t.iter().next().expect("one entry");
                a.metric = match mk.as_str() {
                    "sessions_per_backend" => Metric::SessionsPerBackend,
                    "requests_per_second" => Metric::RequestsPerSecond,
                    "queue" => Metric::Queue,
                    other => {
                        return Err(invalid(format!(
                            "{f}: unknown metric {other:?} (expected sessions_per_backend, \
                             requests_per_second or queue)"
                        )))
                    }
                };
                a.target = positive(&format!("{f}.{mk}"), mv, 1e9)?;
                saw_target = true;
            }
            other => {
                return Err(invalid(format!(
                    "{field}: unknown field {other:?} (expected min, max, target, cooldown, \
                     stabilization, period, warmup, provider, release)"
                )))
            }
        }
    }
    if !saw_target {
        return Err(invalid(format!(
            "{field}.target: required, e.g. {{sessions_per_backend = 50}}"
        )));
    }
    if a.min > a.max {
        return Err(invalid(format!(
            "{field}: min ({}) is more than max ({})",
            a.min, a.max
        )));
    }
    Ok(a)
}

fn nonneg(f: &str, n: f64) -> Result<f64> {
    if !(0.0..=86_400.0).contains(&n) {
        return Err(invalid(format!("{f}: must be 0 to 86400 seconds, got {n}")));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Json {
        json!({"name": "web", "listen": "127.0.0.1:8080", "backends": ["127.0.0.1:9001", "127.0.0.1:9002"]})
    }

    #[test]
    fn parses_a_full_spec() {
        let s = Spec::from_json(
            "lb.create",
            &json!({"name": "web", "protocol": "http", "listen": "127.0.0.1:8080",
                    "algorithm": "leastconn", "backends": ["127.0.0.1:9001", "[::1]:9002"],
                    "health": {"protocol": "http", "path": "/healthz", "interval": 2, "timeout": 1,
                               "healthy": 3, "unhealthy": 2, "expect": 200},
                    "autoscale": {"min": 2, "max": 8, "target": {"sessions_per_backend": 50},
                                  "cooldown": 30, "provider": "local_backend"}}),
        )
        .unwrap();
        assert_eq!(s.algorithm, Algorithm::Leastconn);
        assert_eq!(s.backends[1].address, "[::1]:9002");
        assert_eq!(
            (s.health.healthy, s.health.unhealthy, s.health.expect.as_str()),
            (3, 2, "200")
        );
        let a = s.autoscale.unwrap();
        assert_eq!(
            (a.min, a.max, a.metric, a.target),
            (2, 8, Metric::SessionsPerBackend, 50.0)
        );
        assert_eq!(a.provider.as_deref(), Some("local_backend"));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                json!({"name": "web", "listen": "127.0.0.1:8080", "colour": 1}),
                "unknown field \"colour\"",
            ),
            (json!({"name": "web"}), "listen is required"),
            (
                json!({"name": "w b", "listen": "127.0.0.1:1"}),
                "may only contain",
            ),
            (
                json!({"name": "web", "listen": "localhost:80"}),
                "lb.create: listen: \"localhost:80\" is not an ip:port",
            ),
            (
                json!({"name": "web", "listen": "127.0.0.1:1", "backends": ["127.0.0.1:9", "x"]}),
                "backends[2]",
            ),
            (
                json!({"name": "web", "listen": "127.0.0.1:1", "backends": ["127.0.0.1:0"]}),
                "the port must be",
            ),
            (
                json!({"name": "web", "listen": "127.0.0.1:1", "algorithm": "static-rr"}),
                "algorithm: expected",
            ),
            (
                json!({"name": "web", "listen": "127.0.0.1:1", "health": {"interval": 1, "timeout": 2}}),
                "health.timeout: must not exceed",
            ),
            (
                json!({"name": "web", "listen": "127.0.0.1:1", "health": {"path": "/a b"}}),
                "health.path",
            ),
            (
                json!({"name": "web", "listen": "127.0.0.1:1", "health": {"expect": "2xx"}}),
                "health.expect",
            ),
            (
                json!({"name": "web", "listen": "127.0.0.1:1", "autoscale": {"min": 3, "max": 2, "target": {"queue": 1}}}),
                "min (3) is more than max (2)",
            ),
            (
                json!({"name": "web", "listen": "127.0.0.1:1", "autoscale": {"target": {"cpu": 1}}}),
                "unknown metric \"cpu\"",
            ),
            (
                json!({"name": "web", "listen": "127.0.0.1:1", "options": ["a\nb"]}),
                "options[1]",
            ),
        ];
        for (input, want) in cases {
            let e = Spec::from_json("lb.create", &input).unwrap_err().to_string();
            assert!(e.contains(want), "{input}: {e} (wanted {want})");
        }
    }

    #[test]
    fn update_keeps_name_and_refuses_backends() {
        let s = Spec::from_json("lb.create", &base()).unwrap();
        let u = s
            .updated("web.update", &json!({"algorithm": "leastconn"}))
            .unwrap();
        assert_eq!(u.algorithm, Algorithm::Leastconn);
        assert_eq!(u.backends, s.backends);
        assert!(s.updated("web.update", &json!({"name": "x"})).is_err());
        assert!(s
            .updated("web.update", &json!({"backends": []}))
            .unwrap_err()
            .to_string()
            .contains("add and remove"));
    }
}
