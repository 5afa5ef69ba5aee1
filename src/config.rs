//! `conf/stage.json` → a typed [`Config`], in STAGE's format, with errors that name the JSON path.
//!
//! STAGE's keys are read as they are: `#`-keys are node settings, `%`-keys are extensions
//! of the node or of an engine section, and any other top-level key is an engine section
//! (`lua`, `lua.so`, `luajit.so`, `curl.so`, …). Engines this build does not have are
//! warned about once each and otherwise ignored, so STAGE's own sample config loads.
//! Everything else that is unknown is an error: a typo must not be silently ignored.

use serde_json::{Map, Value as Json};
use std::collections::BTreeMap;
use std::path::Path;

/// A configuration error: where in the file, and what was expected there.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}: invalid JSON: {reason}")]
    Syntax { path: String, reason: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// Names under which the Lua engine section and `#startup` entries may appear.
const LUA_ENGINES: &[&str] = &["lua", "lua.so", "luajit.so"];

/// Built-in stages served in Rust (`["=ticket+ticket"]`); the engine name is written with
/// or without STAGE's `=`/`+` prefix and `.so` suffix.
pub const BUILTIN_ENGINES: &[&str] = &["ticket", "route", "curl", "index"];

/// `=ticket`, `ticket.so`, `+ticket` → `ticket`.
pub fn engine_name(engine: &str) -> &str {
    let e = engine.trim_start_matches(['=', '+']);
    e.strip_suffix(".so").unwrap_or(e)
}

/// `"engine+stage_id"` → (engine, stage id); the engine may start with STAGE's `+`
/// (`"+index+top"`).
fn split_entry(s: &str) -> Option<(&str, &str)> {
    let skip = usize::from(s.starts_with('+'));
    let at = skip + s[skip..].find('+')?;
    Some((&s[..at], &s[at + 1..]))
}

/// A built-in stage of `#startup`: served by a Rust task, not a Lua state.
#[derive(Debug, Clone, PartialEq)]
pub struct BuiltinSpec {
    /// The engine (`ticket`), see `BUILTIN_ENGINES`.
    pub engine: String,
    /// The stage id messages are addressed to (`ticket` in `=ticket+ticket`).
    pub stage_id: String,
    /// Its settings: the top-level section named like the `#startup` entry, or null.
    pub settings: Json,
}

/// `#threads[0]` (worker threads of each blocking pool) is at most this.
pub const MAX_WORKERS: u64 = 1024;
/// `#threads[1]` (queue bound per instance and per pool) is at most this.
pub const MAX_QUEUE: u64 = 1 << 20;

/// `#`-keys that STAGE's own configurations carry and this build accepts without using.
const STAGE_IGNORED_KEYS: &[&str] = &["#license", "#index", "#logger"];

/// One stage instance to start: one Lua state on its own thread.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceSpec {
    /// The stage id messages are addressed to (`stage` in `lua+stage`).
    pub stage_id: String,
    /// The entry script name (`lua+<id>` in the engine section, `start` by default).
    pub entry: String,
}

/// The `lua` engine section.
#[derive(Debug, Clone, PartialEq)]
pub struct LuaSection {
    /// What every state runs before its entry script, STAGE's `%preload`: each entry is a
    /// directory (its `.lua` files), a `.lua` file or a `.json` list of such entries.
    pub preload: Vec<String>,
    /// The script search path, STAGE's `%package`.
    pub package: Vec<String>,
    /// Named ODBC connections: name → attributes.
    pub odbc: BTreeMap<String, Json>,
    /// Entry script per stage id.
    pub entries: BTreeMap<String, String>,
    /// `%compat` (ext): install the Lua 5.1/5.3/LuaJIT names (`unpack`, `bit32`, `bit`).
    pub compat: bool,
}

impl Default for LuaSection {
    fn default() -> Self {
        LuaSection {
            preload: vec!["preload".into()],
            package: ["package", "[0]lib", "rollback", "[0]"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            odbc: BTreeMap::new(),
            entries: BTreeMap::new(),
            compat: true,
        }
    }
}

/// `#limits` (ext): the budgets and bounds that keep one script, client or config value
/// from taking the process down (docs/limits.md).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// `memory`: bytes of Lua heap per instance state.
    pub memory: usize,
    /// `time`: ms a callback may run without yielding before it is interrupted (0 = no limit).
    pub time_ms: u64,
    /// `handlers`: message handlers in flight (started, not finished) per instance.
    pub handlers: usize,
    /// `grace`: ms that shutdown waits for in-flight work before closing.
    pub grace_ms: u64,
    /// `idle`: the default `expire` of a connection, ms (0 = none).
    pub idle_ms: u64,
    /// `in`: the largest IN a broker socket may ask for, bytes.
    pub max_in: usize,
    /// `errors`: identical errors logged per call site per 10 s before they are counted.
    pub errors: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: 256 << 20,
            time_ms: 1000,
            handlers: 1024,
            grace_ms: 5000,
            idle_ms: 300_000,
            max_in: 64 << 20,
            errors: 10,
        }
    }
}

/// The whole node configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `#services.tcp`: addresses whose ports are shared with SO_REUSEPORT.
    pub services_tcp: Vec<String>,
    /// `#services.udp`.
    pub services_udp: Vec<String>,
    /// `#router[0]`: cluster sync interval in ms.
    pub router_sync_ms: u64,
    /// `#cluster` entries, kept as written (the cluster issue interprets them).
    pub cluster: Vec<Json>,
    /// `#cluster-key`, after `env:` resolution: a string, or a list during a key rotation
    /// (the first signs, every one is accepted). Empty: no key.
    pub cluster_key: Vec<String>,
    /// `#cluster-insecure`.
    pub cluster_insecure: bool,
    /// `#threads[0]`: blocking pool size.
    pub workers: usize,
    /// `#threads[1]`: bound of each instance's message queue.
    pub queue: usize,
    /// The Lua instances of `#startup`, in order.
    pub startup: Vec<InstanceSpec>,
    /// The built-in stages of `#startup`, in order (numbered after the Lua instances).
    pub builtins: Vec<BuiltinSpec>,
    /// `#metrics`: address of the Prometheus endpoint.
    pub metrics: Option<String>,
    /// `#usage` (ext): seconds between USAGE log lines, 0 = never.
    pub usage_secs: u64,
    /// The Lua engine section.
    pub lua: LuaSection,
    /// `%vultr` (ext), as written, after `env:` resolution.
    pub vultr: Option<Json>,
    /// `#limits` (ext).
    pub limits: Limits,
    /// `%logger.env` (ext): environment names `%{NAME}` may expand although they look secret.
    pub logger_env: Vec<String>,
    /// `(NAME, value)` of every `env:` string resolved, so messages can hide the values.
    pub env_values: Vec<(String, String)>,
    /// Things that are accepted but worth telling the operator (unsupported engines).
    pub warnings: Vec<String>,
    /// The whole document after `env:` resolution, for `process["$key"]`.
    pub raw: Json,
    /// The Lua engine section in effect (every Lua engine section and the per-stage sections
    /// of `#startup`'s entries, merged as STAGE merges them): what `process["$key"]` reads.
    pub section: Json,
}

impl Default for Config {
    fn default() -> Self {
        Config::from_json(Json::Object(Map::new())).expect("the empty config is valid")
    }
}

impl Config {
    /// Reads `path`; a missing file is the default configuration (one `lua+stage` instance).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => {
                return Err(ConfigError::Read {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })
            }
        };
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Syntax { reason, .. } => ConfigError::Syntax {
                path: path.display().to_string(),
                reason,
            },
            other => other,
        })
    }

    /// Parses the text of a stage.json.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let json: Json = serde_json::from_str(text).map_err(|e| ConfigError::Syntax {
            path: "stage.json".into(),
            reason: e.to_string(),
        })?;
        Config::from_json(json)
    }

    /// Builds the typed configuration from a JSON document.
    pub fn from_json(mut json: Json) -> Result<Config, ConfigError> {
        let mut env_values = vec![];
        resolve_env(&mut json, "", &mut env_values)?;
        Config::from_resolved(json, env_values.clone()).map_err(|e| match e {
            ConfigError::Invalid { key, message } => ConfigError::Invalid {
                key,
                message: redact(&env_values, &message),
            },
            other => other,
        })
    }

    /// `text` with every value that came from an `env:` string replaced by `<env:NAME>`:
    /// configuration errors never print a secret.
    pub fn redact(&self, text: &str) -> String {
        redact(&self.env_values, text)
    }

    fn from_resolved(json: Json, env_values: Vec<(String, String)>) -> Result<Config, ConfigError> {
        let Json::Object(top) = &json else {
            return Err(invalid("$", "expected a JSON object at the top level"));
        };
        let mut cfg = Config {
            services_tcp: vec![],
            services_udp: vec![],
            router_sync_ms: 1500,
            cluster: vec![],
            cluster_key: vec![],
            cluster_insecure: false,
            workers: 4,
            queue: 1024,
            startup: vec![],
            builtins: vec![],
            metrics: None,
            usage_secs: 60,
            lua: LuaSection::default(),
            vultr: None,
            limits: Limits::default(),
            logger_env: vec![],
            env_values,
            warnings: vec![],
            raw: Json::Null,
            section: Json::Object(Map::new()),
        };
        let mut startup_raw: Option<&Json> = None;
        let mut lua_sections: Vec<(&str, &Json)> = vec![];
        let mut stage_sections: Vec<(&str, &Json)> = vec![];
        for (key, value) in top {
            match key.as_str() {
                "#services" => parse_services(&mut cfg, value)?,
                "#router" => {
                    let arr = expect_array(value, "#router")?;
                    if let Some(v) = arr.first() {
                        cfg.router_sync_ms = expect_u64(v, "#router[0]")?;
                    }
                }
                "#cluster" => cfg.cluster = expect_array(value, "#cluster")?.clone(),
                "#cluster-key" => {
                    cfg.cluster_key = match value {
                        Json::Array(keys) if !keys.is_empty() => keys
                            .iter()
                            .enumerate()
                            .map(|(i, k)| expect_str(k, &format!("#cluster-key[{i}]")).map(str::to_string))
                            .collect::<Result<_, _>>()?,
                        Json::Array(_) => {
                            return Err(invalid("#cluster-key", "an empty list (give at least one key)"))
                        }
                        _ => vec![expect_str(value, "#cluster-key")?.to_string()],
                    }
                }
                "#cluster-insecure" => {
                    cfg.cluster_insecure = value
                        .as_bool()
                        .ok_or_else(|| invalid("#cluster-insecure", "expected true or false"))?
                }
                "#threads" => {
                    let arr = expect_array(value, "#threads")?;
                    if let Some(v) = arr.first() {
                        cfg.workers = expect_range(v, "#threads[0]", 1, MAX_WORKERS, "worker threads")?;
                    }
                    if let Some(v) = arr.get(1) {
                        cfg.queue = expect_range(v, "#threads[1]", 1, MAX_QUEUE, "queued entries")?;
                    }
                }
                "#startup" => startup_raw = Some(value),
                "#metrics" => cfg.metrics = Some(expect_str(value, "#metrics")?.to_string()),
                // The admin API (docs/admin.md); read again by `admin::spawn` from `raw`.
                "#admin" => drop(parse_admin(value)?),
                "#usage" => cfg.usage_secs = expect_u64(value, "#usage")?,
                "#tls" => {
                    // The default certificate of https://, wss:// and tls:// listeners.
                    let t = expect_object(value, "#tls")?;
                    for k in ["cert", "key"] {
                        expect_str(t.get(k).unwrap_or(&Json::Null), &format!("#tls.{k}"))?;
                    }
                }
                "#limits" => cfg.limits = parse_limits(value)?,
                "%logger" => {
                    for (k, v) in expect_object(value, "%logger")? {
                        let key = format!("%logger.{k}");
                        match k.as_str() {
                            "env" => {
                                for (i, n) in expect_array(v, &key)?.iter().enumerate() {
                                    cfg.logger_env
                                        .push(expect_str(n, &format!("{key}[{i}]"))?.to_string());
                                }
                            }
                            _ => return Err(invalid(&key, "unknown key (expected env)")),
                        }
                    }
                }
                "%vultr" => {
                    expect_object(value, "%vultr")?;
                    cfg.vultr = Some(value.clone())
                }
                k if STAGE_IGNORED_KEYS.contains(&k) => {}
                k if LUA_ENGINES.contains(&k) => {
                    check_lua_section(k, value)?;
                    lua_sections.push((k, value));
                }
                // STAGE's per-stage section (`lua.so+process`): used by that #startup entry.
                k if k
                    .split_once('+')
                    .is_some_and(|(e, id)| LUA_ENGINES.contains(&e) && !id.is_empty()) =>
                {
                    check_lua_section(k, value)?;
                    stage_sections.push((k, value));
                }
                k if k.starts_with('#') || k.starts_with('%') => {
                    return Err(invalid(
                        k,
                        "unknown key (expected one of #services, #router, #cluster, #cluster-key, \
                         #cluster-insecure, #threads, #startup, #metrics, #usage, #tls, #limits, \
                         %logger, %vultr, or an engine section such as lua)",
                    ))
                }
                // The settings of a built-in stage, read with its #startup entry.
                k if split_entry(k).is_some_and(|(e, _)| BUILTIN_ENGINES.contains(&engine_name(e))) => {}
                k => cfg.warnings.push(format!(
                    "engine section \"{k}\" is not supported by this build and is ignored"
                )),
            }
        }
        let mut used = vec![];
        match startup_raw {
            Some(v) => used = parse_startup(&mut cfg, v, &json)?,
            None => cfg.startup.push(InstanceSpec {
                stage_id: "stage".into(),
                entry: "start".into(),
            }),
        }
        if lua_sections.len() > 1 {
            let names: Vec<String> = lua_sections.iter().map(|(n, _)| format!("\"{n}\"")).collect();
            cfg.warnings.push(format!(
                "the Lua engine sections {} all configure this build's one Lua (5.4); their keys are \
                 merged in that order, a later section's value winning",
                names.join(", ")
            ));
        }
        // As STAGE: an engine's configuration is its sections merged; a per-stage section
        // (`lua.so+process`) counts only when #startup starts that entry.
        let mut merged = Json::Object(Map::new());
        for (_, v) in &lua_sections {
            merge_object(&mut merged, v);
        }
        for (name, v) in &stage_sections {
            if used.iter().any(|u| u == name) {
                merge_object(&mut merged, v);
            } else {
                cfg.warnings.push(format!(
                    "section \"{name}\" is not used: no #startup entry is \"{name}\""
                ));
            }
        }
        let section_name = match (lua_sections.last(), stage_sections.last()) {
            (Some((n, _)), _) => *n,
            (None, Some((n, _))) => *n,
            (None, None) => "lua",
        };
        cfg.lua = parse_lua_section(section_name, &merged, &mut cfg.warnings)?;
        cfg.section = merged;
        for spec in &mut cfg.startup {
            if let Some(entry) = cfg.lua.entries.get(&spec.stage_id) {
                spec.entry = entry.clone();
            }
        }
        cfg.raw = json;
        Ok(cfg)
    }

    /// `process["$key"]`: as STAGE, a key of the Lua engine section (`"%cluster"`, `""` for
    /// the whole section); otherwise (an extension) a dotted path into the whole document.
    pub fn lookup(&self, path: &str) -> Option<&Json> {
        if path.is_empty() {
            return Some(&self.section);
        }
        if let Some(v) = self.section.get(path) {
            return Some(v);
        }
        lookup_path(&self.raw, path)
    }
}

/// The value at a dotted path (`"#threads"`, `"lua.%package"`, `"#threads.1"`) of `doc`.
pub fn lookup_path<'a>(doc: &'a Json, path: &str) -> Option<&'a Json> {
    if let Some(v) = doc.get(path) {
        return Some(v);
    }
    let mut cur = doc;
    for part in path.split('.') {
        cur = match cur {
            Json::Object(m) => m.get(part)?,
            Json::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// STAGE's merge of configuration objects: objects merge key by key, anything else replaces.
pub fn merge_object(into: &mut Json, from: &Json) {
    let (Json::Object(o), Json::Object(i)) = (into, from) else {
        return;
    };
    for (k, v) in i {
        match o.get_mut(k) {
            Some(cur @ Json::Object(_)) if v.is_object() => merge_object(cur, v),
            _ => {
                o.insert(k.clone(), v.clone());
            }
        }
    }
}

fn redact(env_values: &[(String, String)], text: &str) -> String {
    let mut out = text.to_string();
    for (name, value) in env_values {
        if !value.is_empty() && out.contains(value.as_str()) {
            out = out.replace(value.as_str(), &format!("<env:{name}>"));
        }
    }
    out
}

/// Replaces every string `"env:NAME"` with the environment value; a missing variable is an error.
/// Each resolution is recorded in `seen` as `(NAME, value)`.
fn resolve_env(json: &mut Json, path: &str, seen: &mut Vec<(String, String)>) -> Result<(), ConfigError> {
    match json {
        Json::String(s) => {
            if let Some(name) = s.strip_prefix("env:") {
                match std::env::var(name) {
                    Ok(v) => {
                        seen.push((name.to_string(), v.clone()));
                        *s = v
                    }
                    Err(_) => {
                        return Err(invalid(
                            if path.is_empty() { "$" } else { path },
                            format!("environment variable {name} is not set (the value is \"env:{name}\")"),
                        ))
                    }
                }
            }
        }
        Json::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                resolve_env(item, &format!("{path}[{i}]"), seen)?;
            }
        }
        Json::Object(map) => {
            for (k, v) in map.iter_mut() {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                resolve_env(v, &p, seen)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn expect_array<'a>(v: &'a Json, key: &str) -> Result<&'a Vec<Json>, ConfigError> {
    v.as_array()
        .ok_or_else(|| invalid(key, format!("expected an array, found {}", kind(v))))
}

fn expect_object<'a>(v: &'a Json, key: &str) -> Result<&'a Map<String, Json>, ConfigError> {
    v.as_object()
        .ok_or_else(|| invalid(key, format!("expected an object, found {}", kind(v))))
}

fn expect_str<'a>(v: &'a Json, key: &str) -> Result<&'a str, ConfigError> {
    v.as_str()
        .ok_or_else(|| invalid(key, format!("expected a string, found {}", kind(v))))
}

fn expect_u64(v: &Json, key: &str) -> Result<u64, ConfigError> {
    v.as_u64()
        .ok_or_else(|| invalid(key, format!("expected a non-negative integer, found {}", kind(v))))
}

/// An integer in `lo..=hi`; the error names the key, the range and what it counts.
fn expect_range(v: &Json, key: &str, lo: u64, hi: u64, what: &str) -> Result<usize, ConfigError> {
    match v.as_u64() {
        Some(n) if (lo..=hi).contains(&n) => Ok(n as usize),
        _ => Err(invalid(
            key,
            format!(
                "expected an integer from {lo} to {hi} ({what}), found {}",
                kind(v)
            ),
        )),
    }
}

/// A size in bytes: an integer or a string such as "64m", "512k".
fn expect_size(v: &Json, key: &str, lo: u64, hi: u64) -> Result<usize, ConfigError> {
    let n = match v {
        Json::Number(_) => v.as_u64(),
        Json::String(s) => crate::net::framing::parse_size(s).map(|n| n as u64),
        _ => None,
    };
    match n {
        Some(n) if (lo..=hi).contains(&n) => Ok(n as usize),
        _ => Err(invalid(
            key,
            format!(
                "expected a size from {} to {} (bytes, or a string such as \"64m\"), found {}",
                human(lo),
                human(hi),
                kind(v)
            ),
        )),
    }
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{}g", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}m", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}k", n >> 10),
        n => n.to_string(),
    }
}

/// `#admin` (ext): where the admin API listens and the token it wants (docs/admin.md).
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// `listen`: `host:port`.
    pub listen: String,
    /// `token`, after `env:` resolution; `None`: no authentication (loopback only).
    pub token: Option<String>,
    /// `packages`: the largest package bundle `PUT /packages` takes, compressed and
    /// decompressed (bytes; default 16 MiB).
    pub max_package: usize,
}

/// The default of `#admin.packages`.
pub const DEFAULT_MAX_PACKAGE: usize = 16 << 20;

/// `{"listen": "127.0.0.1:9900", "token": "env:STAGE_ADMIN_TOKEN"}`, or just the address.
pub fn parse_admin(v: &Json) -> Result<AdminConfig, ConfigError> {
    if let Some(listen) = v.as_str() {
        return Ok(AdminConfig {
            listen: listen.to_string(),
            token: None,
            max_package: DEFAULT_MAX_PACKAGE,
        });
    }
    let mut a = AdminConfig {
        listen: String::new(),
        token: None,
        max_package: DEFAULT_MAX_PACKAGE,
    };
    for (k, val) in expect_object(v, "#admin")? {
        let key = format!("#admin.{k}");
        match k.as_str() {
            "listen" => a.listen = expect_str(val, &key)?.to_string(),
            "token" => {
                let t = expect_str(val, &key)?;
                if t.len() < 16 {
                    return Err(invalid(
                        &key,
                        "a token of at least 16 characters is needed (use env:NAME)",
                    ));
                }
                a.token = Some(t.to_string());
            }
            "packages" => a.max_package = expect_size(val, &key, 1024, 1 << 30)?,
            _ => return Err(invalid(&key, "unknown key (expected listen, token, packages)")),
        }
    }
    if a.listen.is_empty() {
        return Err(invalid(
            "#admin.listen",
            "missing: the address to listen on, e.g. \"127.0.0.1:9900\"",
        ));
    }
    Ok(a)
}

fn parse_limits(v: &Json) -> Result<Limits, ConfigError> {
    let mut l = Limits::default();
    for (k, val) in expect_object(v, "#limits")? {
        let key = format!("#limits.{k}");
        let ms = |val: &Json| expect_range(val, &key, 0, 86_400_000, "milliseconds").map(|n| n as u64);
        match k.as_str() {
            "memory" => l.memory = expect_size(val, &key, 1 << 20, 1 << 40)?,
            "time" => l.time_ms = ms(val)?,
            "handlers" => l.handlers = expect_range(val, &key, 1, MAX_QUEUE, "handlers in flight")?,
            "grace" => l.grace_ms = ms(val)?,
            "idle" => l.idle_ms = ms(val)?,
            "in" => l.max_in = expect_size(val, &key, 64, 1 << 30)?,
            "errors" => l.errors = expect_range(val, &key, 1, 1_000_000, "errors per 10 s")? as u64,
            _ => {
                return Err(invalid(
                    &key,
                    "unknown key (expected memory, time, handlers, grace, idle, in or errors)",
                ))
            }
        }
    }
    Ok(l)
}

fn kind(v: &Json) -> String {
    match v {
        Json::Null => "null".into(),
        Json::Bool(b) => format!("{b}"),
        Json::Number(n) => format!("the number {n}"),
        Json::String(s) => format!("the string \"{s}\""),
        Json::Array(_) => "an array".into(),
        Json::Object(_) => "an object".into(),
    }
}

fn parse_services(cfg: &mut Config, v: &Json) -> Result<(), ConfigError> {
    for (proto, list) in expect_object(v, "#services")? {
        let key = format!("#services.{proto}");
        let mut addrs = vec![];
        for (i, a) in expect_array(list, &key)?.iter().enumerate() {
            let key = format!("{key}[{i}]");
            let s = expect_str(a, &key)?;
            crate::home::parse_host_port(s).map_err(|e| invalid(&key, e))?;
            addrs.push(s.to_string());
        }
        match proto.as_str() {
            "tcp" => cfg.services_tcp = addrs,
            "udp" => cfg.services_udp = addrs,
            _ => return Err(invalid(&key, "unknown protocol (expected \"tcp\" or \"udp\")")),
        }
    }
    Ok(())
}

/// Reads `#startup`; returns its Lua entries as written (`lua.so+stage`), which select the
/// per-stage sections.
fn parse_startup(cfg: &mut Config, v: &Json, raw: &Json) -> Result<Vec<String>, ConfigError> {
    let mut warned: Vec<String> = vec![];
    let mut used = vec![];
    for (i, entry) in expect_array(v, "#startup")?.iter().enumerate() {
        let key = format!("#startup[{i}]");
        // STAGE writes each entry as a list; a bare string is accepted as a list of one.
        let items: Vec<&Json> = match entry {
            Json::Array(a) => a.iter().collect(),
            Json::String(_) => vec![entry],
            other => {
                return Err(invalid(
                    &key,
                    format!(
                        "expected a list of \"engine+stage_id\" strings, found {}",
                        kind(other)
                    ),
                ))
            }
        };
        for (j, item) in items.iter().enumerate() {
            let key = format!("{key}[{j}]");
            let s = expect_str(item, &key)?;
            let Some((engine, id)) = split_entry(s) else {
                return Err(invalid(
                    &key,
                    format!("expected \"engine+stage_id\" such as \"lua+stage\", found \"{s}\""),
                ));
            };
            if id.is_empty() || id.contains([':', '*', '=', '+']) {
                return Err(invalid(
                    &key,
                    format!("invalid stage id \"{id}\" (it may not be empty or contain : * = +)"),
                ));
            }
            if LUA_ENGINES.contains(&engine) {
                used.push(s.to_string());
                cfg.startup.push(InstanceSpec {
                    stage_id: id.to_string(),
                    entry: "start".into(),
                });
            } else if BUILTIN_ENGINES.contains(&engine_name(engine)) {
                cfg.builtins.push(BuiltinSpec {
                    engine: engine_name(engine).to_string(),
                    stage_id: id.to_string(),
                    settings: raw.get(s).cloned().unwrap_or(Json::Null),
                });
            } else if !warned.iter().any(|w| w == engine) {
                warned.push(engine.to_string());
                cfg.warnings.push(format!(
                    "engine \"{engine}\" ({key} = \"{s}\") is not supported by this build; its instances are not started"
                ));
            }
        }
    }
    Ok(used)
}

/// Checks one Lua engine section on its own, so that an error names the section it is in.
fn check_lua_section(name: &str, v: &Json) -> Result<(), ConfigError> {
    parse_lua_section(name, v, &mut vec![]).map(|_| ())
}

fn parse_lua_section(name: &str, v: &Json, warnings: &mut Vec<String>) -> Result<LuaSection, ConfigError> {
    let mut section = LuaSection::default();
    for (k, val) in expect_object(v, name)? {
        let key = format!("{name}.{k}");
        match k.as_str() {
            "%preload" => {
                section.preload = match val {
                    Json::String(s) => vec![s.clone()],
                    Json::Array(items) => items
                        .iter()
                        .enumerate()
                        .map(|(i, p)| expect_str(p, &format!("{key}[{i}]")).map(str::to_string))
                        .collect::<Result<_, _>>()?,
                    other => {
                        return Err(invalid(
                            &key,
                            format!(
                            "expected a directory, a .lua file, a .json list or an array of them, found {}",
                            kind(other)
                        ),
                        ))
                    }
                }
            }
            "%compat" => {
                section.compat = val
                    .as_bool()
                    .ok_or_else(|| invalid(&key, format!("expected true or false, found {}", kind(val))))?
            }
            // Read by scripts through process["$%cluster"] (STAGE's cluster sample does).
            "%cluster" => {}
            "%reflush" => {
                expect_u64(val, &key)?;
                warnings.push(format!(
                    "{key}: not used by this build: a script is reloaded as soon as its file \
                     changes (the file watcher), not after a cache time"
                ));
            }
            "%package" => {
                let mut list = vec![];
                for (i, p) in expect_array(val, &key)?.iter().enumerate() {
                    let s = expect_str(p, &format!("{key}[{i}]"))?;
                    crate::home::SearchEntry::parse(s, i).map_err(|e| invalid(&format!("{key}[{i}]"), e))?;
                    list.push(s.to_string());
                }
                if list.is_empty() {
                    return Err(invalid(&key, "the search path may not be empty"));
                }
                section.package = list;
            }
            "%odbc" => {
                for (dsn, attrs) in expect_object(val, &key)? {
                    if !attrs.is_object() && !attrs.is_string() {
                        return Err(invalid(
                            &format!("{key}.{dsn}"),
                            format!(
                                "expected an object of ODBC attributes or a connection string, found {}",
                                kind(attrs)
                            ),
                        ));
                    }
                    section.odbc.insert(dsn.clone(), attrs.clone());
                }
            }
            other => {
                let engine_id = LUA_ENGINES
                    .iter()
                    .find_map(|e| other.strip_prefix(e).and_then(|r| r.strip_prefix('+')));
                match engine_id {
                    Some(id) if !id.is_empty() => {
                        section
                            .entries
                            .insert(id.to_string(), expect_str(val, &key)?.to_string());
                    }
                    _ => {
                        return Err(invalid(
                            &key,
                            "unknown key (expected %preload, %package, %odbc, %cluster, %reflush, %compat or lua+<stage_id>)",
                        ))
                    }
                }
            }
        }
    }
    Ok(section)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_packages_limit() {
        let a = parse_admin(&serde_json::json!({"listen": "127.0.0.1:1"})).unwrap();
        assert_eq!(a.max_package, DEFAULT_MAX_PACKAGE);
        let a = parse_admin(&serde_json::json!({"listen": "127.0.0.1:1", "packages": "64m"})).unwrap();
        assert_eq!(a.max_package, 64 << 20);
        let e = parse_admin(&serde_json::json!({"listen": "127.0.0.1:1", "packages": 10}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("#admin.packages"), "{e}");
    }

    #[test]
    fn empty_config_starts_one_instance() {
        let c = Config::parse("{}").unwrap();
        assert_eq!(
            c.startup,
            vec![InstanceSpec {
                stage_id: "stage".into(),
                entry: "start".into()
            }]
        );
        assert_eq!(c.lua.package[0], "package");
        assert_eq!((c.workers, c.queue), (4, 1024));
    }

    #[test]
    fn stage_sample_config_loads_with_warnings() {
        let c = Config::parse(
            r##"{
            "#license": "XXXX-XXXX",
            "#services": {"tcp": ["0.0.0.0:8801", "[::]:8802"]},
            "#router": [1500],
            "#cluster": [":eth0", 9801, "127.0.0.1:9802"],
            "#threads": [8, 100],
            "#startup": [["lua.so+stage"], ["lua.so+stage"], ["=route+route"], ["curl.so+curl"], ["index.so+index"], ["=ticket+ticket"]],
            "lua.so": {"%preload": "preload", "%package": ["package", "rollback"], "lua.so+stage": "main"},
            "curl.so": {"timeout": 10},
            "index.so": {},
            "=ticket+ticket": [1000, {"odbc": 10}]
        }"##,
        )
        .unwrap();
        assert_eq!(c.startup.len(), 2);
        assert_eq!(c.startup[0].entry, "main");
        assert_eq!(c.workers, 8);
        assert_eq!(c.queue, 100);
        assert_eq!(c.services_tcp.len(), 2);
        // the built-in stages, the ticket stage with its section
        assert_eq!(c.builtins.len(), 4);
        let engines: Vec<&str> = c.builtins.iter().map(|b| b.engine.as_str()).collect();
        assert_eq!(engines, ["route", "curl", "index", "ticket"]);
        assert_eq!(
            (c.builtins[3].engine.as_str(), c.builtins[3].stage_id.as_str()),
            ("ticket", "ticket")
        );
        assert_eq!(c.builtins[3].settings[1]["odbc"], 10);
        // one warning per unsupported section
        assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
    }

    #[test]
    fn builtin_spellings() {
        let c = Config::parse(
            r##"{"#startup": [["index.so+rank"], ["=index+board"], ["+index+top"], ["index+x"]],
                 "+index+top": {"memory": "1m"}}"##,
        )
        .unwrap();
        let got: Vec<(&str, &str)> = c
            .builtins
            .iter()
            .map(|b| (b.engine.as_str(), b.stage_id.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("index", "rank"),
                ("index", "board"),
                ("index", "top"),
                ("index", "x")
            ]
        );
        assert_eq!(c.builtins[2].settings["memory"], "1m");
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn stage_engine_sections_merge() {
        let c = Config::parse(
            r##"{
            "#startup": [["luajit.so+stage"], ["lua.so+db"]],
            "lua.so": {"%preload": "preload", "%cluster": ["a"], "%odbc": {"A": {"DRIVER": "x"}}, "lua.so+db": "dbmain"},
            "luajit.so": {"%preload": ["preload", "more.json"], "%reflush": 10, "%cluster": "b", "luajit.so+stage": "main"},
            "lua.so+db": {"%odbc": {"B": "DSN=b"}},
            "lua.so+unused": {"%preload": "x"}
        }"##,
        )
        .unwrap();
        assert_eq!(c.lua.preload, ["preload", "more.json"], "luajit.so's value wins");
        assert_eq!(c.section["%cluster"], "b");
        assert_eq!(c.startup[0].entry, "main");
        assert_eq!(c.startup[1].entry, "dbmain");
        // the per-stage section of a #startup entry is merged, objects key by key
        assert_eq!(c.lua.odbc.keys().collect::<Vec<_>>(), ["A", "B"]);
        assert_eq!(c.lookup(""), Some(&c.section));
        assert_eq!(c.lookup("%reflush"), Some(&Json::from(10)));
        let w = c.warnings.join("\n");
        assert_eq!(c.warnings.len(), 3, "{w}");
        assert!(w.contains("\"lua.so\", \"luajit.so\""), "{w}");
        assert!(w.contains("luajit.so.%reflush"), "{w}");
        assert!(w.contains("\"lua.so+unused\" is not used"), "{w}");
        // an unknown key in any Lua section is an error naming it
        let e = Config::parse(r##"{"lua.so+db": {"%clustr": 1}}"##).unwrap_err();
        assert!(e.to_string().starts_with("lua.so+db.%clustr: unknown key"), "{e}");
        let e = Config::parse(r##"{"lua": {"%preload": 3}}"##).unwrap_err();
        assert!(
            e.to_string().starts_with("lua.%preload: expected a directory"),
            "{e}"
        );
        let e = Config::parse(r##"{"lua": {"%compat": "no"}}"##).unwrap_err();
        assert!(
            e.to_string().starts_with("lua.%compat: expected true or false"),
            "{e}"
        );
        assert!(
            !Config::parse(r##"{"lua": {"%compat": false}}"##)
                .unwrap()
                .lua
                .compat
        );
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::parse(r##"{"#threads": ["four"]}"##).unwrap_err();
        assert_eq!(
            e.to_string(),
            "#threads[0]: expected an integer from 1 to 1024 (worker threads), found the string \"four\""
        );
        let e = Config::parse(r##"{"#servics": {}}"##).unwrap_err();
        assert!(e.to_string().starts_with("#servics: unknown key"), "{e}");
        let e = Config::parse(r##"{"#startup": [["lua"]]}"##).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("#startup[0][0]: expected \"engine+stage_id\""),
            "{e}"
        );
        let e = Config::parse(r##"{"lua": {"%package": ["package", 3]}}"##).unwrap_err();
        assert_eq!(
            e.to_string(),
            "lua.%package[1]: expected a string, found the number 3"
        );
        let e = Config::parse(r##"{"#services": {"tcp": ["0.0.0.0"]}}"##).unwrap_err();
        assert!(e.to_string().starts_with("#services.tcp[0]:"), "{e}");
        let e = Config::parse(r##"{"lua": {"%odbc": {"GAME": 1}}}"##).unwrap_err();
        assert!(e.to_string().starts_with("lua.%odbc.GAME:"), "{e}");
        let e = Config::parse("{\"#threads\": [1,").unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }));
    }

    #[test]
    fn env_values_are_resolved() {
        std::env::set_var("STAGE_TEST_KEY_CFG", "s3cret");
        let c = Config::parse(r##"{"#cluster-key": "env:STAGE_TEST_KEY_CFG"}"##).unwrap();
        assert_eq!(c.cluster_key, vec!["s3cret".to_string()]);
        let e = Config::parse(r##"{"%vultr": {"api_key": "env:STAGE_TEST_MISSING_VAR"}}"##).unwrap_err();
        assert_eq!(
            e.to_string(),
            "%vultr.api_key: environment variable STAGE_TEST_MISSING_VAR is not set (the value is \"env:STAGE_TEST_MISSING_VAR\")"
        );
    }

    #[test]
    fn threads_are_range_checked() {
        for (text, key) in [
            (r##"{"#threads": [4, 2305843009213693952]}"##, "#threads[1]"),
            (r##"{"#threads": [4, 1000000000]}"##, "#threads[1]"),
            (r##"{"#threads": [4, 1e9]}"##, "#threads[1]"),
            (r##"{"#threads": [100000, 16]}"##, "#threads[0]"),
            (r##"{"#threads": [0, 16]}"##, "#threads[0]"),
            (r##"{"#threads": [4, 0]}"##, "#threads[1]"),
            (r##"{"#threads": [-1]}"##, "#threads[0]"),
        ] {
            let e = Config::parse(text).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("{key}: expected an integer from 1 to ")),
                "{text}: {e}"
            );
        }
        let c = Config::parse(r##"{"#threads": [1024, 1048576]}"##).unwrap();
        assert_eq!((c.workers, c.queue), (1024, 1 << 20));
    }

    #[test]
    fn limits_parse_and_are_checked() {
        let c = Config::parse(r##"{"#limits": {"memory": "64m", "time": 250, "handlers": 8, "in": "1m"}}"##)
            .unwrap();
        assert_eq!(c.limits.memory, 64 << 20);
        assert_eq!(c.limits.time_ms, 250);
        assert_eq!(c.limits.handlers, 8);
        assert_eq!(c.limits.max_in, 1 << 20);
        assert_eq!(c.limits.grace_ms, Limits::default().grace_ms);
        let e = Config::parse(r##"{"#limits": {"memory": "10"}}"##).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("#limits.memory: expected a size from 1m to 1024g"),
            "{e}"
        );
        let e = Config::parse(r##"{"#limits": {"handler": 3}}"##).unwrap_err();
        assert!(e.to_string().starts_with("#limits.handler: unknown key"), "{e}");
    }

    #[test]
    fn errors_never_print_env_values() {
        std::env::set_var("STAGE_TEST_SECRET_CFG", "sk-very-secret-value");
        let e = Config::parse(r##"{"#threads": ["env:STAGE_TEST_SECRET_CFG"]}"##)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("sk-very-secret-value"), "{e}");
        assert!(e.starts_with("#threads[0]: expected an integer"), "{e}");
        assert!(e.contains("<env:STAGE_TEST_SECRET_CFG>"), "{e}");
        let c = Config::parse(r##"{"%vultr": {"api_key": "env:STAGE_TEST_SECRET_CFG"}}"##).unwrap();
        assert_eq!(
            c.redact("bad key sk-very-secret-value!"),
            "bad key <env:STAGE_TEST_SECRET_CFG>!"
        );
    }

    #[test]
    fn lookup_by_dotted_path() {
        let c = Config::parse(r##"{"#threads": [2, 3], "lua": {"lua+db": "dbmain"}}"##).unwrap();
        assert_eq!(c.lookup("#threads.1"), Some(&Json::from(3)));
        assert_eq!(c.lookup("lua.lua+db"), Some(&Json::from("dbmain")));
        assert_eq!(c.lookup("nope"), None);
    }
}
