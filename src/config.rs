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
pub const BUILTIN_ENGINES: &[&str] = &["ticket", "route", "curl"];

/// `=ticket`, `ticket.so`, `+ticket` → `ticket`.
pub fn engine_name(engine: &str) -> &str {
    let e = engine.trim_start_matches(['=', '+']);
    e.strip_suffix(".so").unwrap_or(e)
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
    /// Directory of scripts run in every state before its entry script.
    pub preload: String,
    /// The script search path, STAGE's `%package`.
    pub package: Vec<String>,
    /// Named ODBC connections: name → attributes.
    pub odbc: BTreeMap<String, Json>,
    /// Entry script per stage id.
    pub entries: BTreeMap<String, String>,
}

impl Default for LuaSection {
    fn default() -> Self {
        LuaSection {
            preload: "preload".into(),
            package: ["package", "[0]lib", "rollback", "[0]"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            odbc: BTreeMap::new(),
            entries: BTreeMap::new(),
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
    /// `#cluster-key`, after `env:` resolution.
    pub cluster_key: Option<String>,
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
    /// Things that are accepted but worth telling the operator (unsupported engines).
    pub warnings: Vec<String>,
    /// The whole document after `env:` resolution, for `process["$key"]`.
    pub raw: Json,
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
        resolve_env(&mut json, "")?;
        let Json::Object(top) = &json else {
            return Err(invalid("$", "expected a JSON object at the top level"));
        };
        let mut cfg = Config {
            services_tcp: vec![],
            services_udp: vec![],
            router_sync_ms: 1500,
            cluster: vec![],
            cluster_key: None,
            cluster_insecure: false,
            workers: 4,
            queue: 1024,
            startup: vec![],
            builtins: vec![],
            metrics: None,
            usage_secs: 60,
            lua: LuaSection::default(),
            vultr: None,
            warnings: vec![],
            raw: Json::Null,
        };
        let mut startup_raw: Option<&Json> = None;
        let mut lua_section: Option<(&str, &Json)> = None;
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
                "#cluster-key" => cfg.cluster_key = Some(expect_str(value, "#cluster-key")?.to_string()),
                "#cluster-insecure" => {
                    cfg.cluster_insecure = value
                        .as_bool()
                        .ok_or_else(|| invalid("#cluster-insecure", "expected true or false"))?
                }
                "#threads" => {
                    let arr = expect_array(value, "#threads")?;
                    if let Some(v) = arr.first() {
                        cfg.workers = expect_u64(v, "#threads[0]")?.max(1) as usize;
                    }
                    if let Some(v) = arr.get(1) {
                        cfg.queue = expect_u64(v, "#threads[1]")?.max(1) as usize;
                    }
                }
                "#startup" => startup_raw = Some(value),
                "#metrics" => cfg.metrics = Some(expect_str(value, "#metrics")?.to_string()),
                "#usage" => cfg.usage_secs = expect_u64(value, "#usage")?,
                "#tls" => {
                    // The default certificate of https://, wss:// and tls:// listeners.
                    let t = expect_object(value, "#tls")?;
                    for k in ["cert", "key"] {
                        expect_str(t.get(k).unwrap_or(&Json::Null), &format!("#tls.{k}"))?;
                    }
                }
                "%vultr" => {
                    expect_object(value, "%vultr")?;
                    cfg.vultr = Some(value.clone())
                }
                k if STAGE_IGNORED_KEYS.contains(&k) => {}
                k if LUA_ENGINES.contains(&k) => {
                    if let Some((other, _)) = lua_section {
                        return Err(invalid(
                            k,
                            format!("the lua engine section is already given as \"{other}\""),
                        ));
                    }
                    lua_section = Some((k, value));
                }
                k if k.starts_with('#') || k.starts_with('%') => {
                    return Err(invalid(
                        k,
                        "unknown key (expected one of #services, #router, #cluster, #cluster-key, \
                         #cluster-insecure, #threads, #startup, #metrics, #usage, #tls, %vultr, or an \
                         engine section such as lua)",
                    ))
                }
                // The settings of a built-in stage, read with its #startup entry.
                k if k
                    .split_once('+')
                    .is_some_and(|(e, _)| BUILTIN_ENGINES.contains(&engine_name(e))) => {}
                k => cfg.warnings.push(format!(
                    "engine section \"{k}\" is not supported by this build and is ignored"
                )),
            }
        }
        if let Some((name, section)) = lua_section {
            cfg.lua = parse_lua_section(name, section)?;
        }
        match startup_raw {
            Some(v) => parse_startup(&mut cfg, v, &json)?,
            None => cfg.startup.push(InstanceSpec {
                stage_id: "stage".into(),
                entry: "start".into(),
            }),
        }
        for spec in &mut cfg.startup {
            if let Some(entry) = cfg.lua.entries.get(&spec.stage_id) {
                spec.entry = entry.clone();
            }
        }
        cfg.raw = json;
        Ok(cfg)
    }

    /// The value at a dotted path (`"#threads"`, `"lua.%package"`), for `process["$key"]`.
    pub fn lookup(&self, path: &str) -> Option<&Json> {
        if let Some(v) = self.raw.get(path) {
            return Some(v);
        }
        let mut cur = &self.raw;
        for part in path.split('.') {
            cur = match cur {
                Json::Object(m) => m.get(part)?,
                Json::Array(a) => a.get(part.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(cur)
    }
}

/// Replaces every string `"env:NAME"` with the environment value; a missing variable is an error.
fn resolve_env(json: &mut Json, path: &str) -> Result<(), ConfigError> {
    match json {
        Json::String(s) => {
            if let Some(name) = s.strip_prefix("env:") {
                match std::env::var(name) {
                    Ok(v) => *s = v,
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
                resolve_env(item, &format!("{path}[{i}]"))?;
            }
        }
        Json::Object(map) => {
            for (k, v) in map.iter_mut() {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                resolve_env(v, &p)?;
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

fn parse_startup(cfg: &mut Config, v: &Json, raw: &Json) -> Result<(), ConfigError> {
    let mut warned: Vec<String> = vec![];
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
            let Some((engine, id)) = s.split_once('+') else {
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
    Ok(())
}

fn parse_lua_section(name: &str, v: &Json) -> Result<LuaSection, ConfigError> {
    let mut section = LuaSection::default();
    for (k, val) in expect_object(v, name)? {
        let key = format!("{name}.{k}");
        match k.as_str() {
            "%preload" => section.preload = expect_str(val, &key)?.to_string(),
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
                            "unknown key (expected %preload, %package, %odbc or lua+<stage_id>)",
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
        // the built-in ticket stage with its section
        assert_eq!(c.builtins.len(), 3);
        assert_eq!(
            (c.builtins[0].engine.as_str(), c.builtins[1].engine.as_str()),
            ("route", "curl")
        );
        assert_eq!(
            (c.builtins[2].engine.as_str(), c.builtins[2].stage_id.as_str()),
            ("ticket", "ticket")
        );
        assert_eq!(c.builtins[2].settings[1]["odbc"], 10);
        // one warning per unsupported engine in #startup and per unsupported section
        assert_eq!(c.warnings.len(), 3, "{:?}", c.warnings);
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::parse(r##"{"#threads": ["four"]}"##).unwrap_err();
        assert_eq!(
            e.to_string(),
            "#threads[0]: expected a non-negative integer, found the string \"four\""
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
        assert_eq!(c.cluster_key.as_deref(), Some("s3cret"));
        let e = Config::parse(r##"{"%vultr": {"api_key": "env:STAGE_TEST_MISSING_VAR"}}"##).unwrap_err();
        assert_eq!(
            e.to_string(),
            "%vultr.api_key: environment variable STAGE_TEST_MISSING_VAR is not set (the value is \"env:STAGE_TEST_MISSING_VAR\")"
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
