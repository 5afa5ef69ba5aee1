//! Logging: log4rs set up from `conf/log4rs.yaml` or a console default, and the
//! expansion of STAGE's logger escapes (`%l %F %M %L %{ENV}`, `%{=group:level}`).

use log::LevelFilter;
use std::path::Path;

/// The console pattern used when the home has no `conf/log4rs.yaml`.
pub const DEFAULT_PATTERN: &str = "{d(%Y-%m-%d %H:%M:%S%.3f)} [{l:<5}] {t}: {m}{n}";

/// Checks a log4rs configuration file strictly: the YAML, every appender (its `kind` and
/// fields, its filters and encoder), and that the root and every logger name appenders that
/// exist. log4rs itself skips a broken appender with a line on stderr and runs on, which
/// leaves a node with no logging at all; `stage check` and `stage run` call this first.
pub fn check_file(file: &Path) -> Result<(), String> {
    use log4rs::append::AppenderConfig;
    use log4rs::config::{Deserializers, RawConfig};
    let text = std::fs::read_to_string(file).map_err(|e| e.to_string())?;
    let raw: RawConfig = serde_yaml::from_str(&text).map_err(|e| e.to_string())?;
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| e.to_string())?;
    let deserializers = Deserializers::default();
    let mut names = vec![];
    if let Some(appenders) = yaml.get("appenders").and_then(|a| a.as_mapping()) {
        for (name, body) in appenders {
            let name = name.as_str().unwrap_or("?").to_string();
            let cfg: AppenderConfig =
                serde_yaml::from_value(body.clone()).map_err(|e| format!("appender \"{name}\": {e}"))?;
            for f in &cfg.filters {
                deserializers
                    .deserialize::<dyn log4rs::filter::Filter>(&f.kind, f.config.clone())
                    .map_err(|e| format!("appender \"{name}\": filter: {e}"))?;
            }
            deserializers
                .deserialize::<dyn log4rs::append::Append>(&cfg.kind, cfg.config.clone())
                .map_err(|e| format!("appender \"{name}\": {e}"))?;
            names.push(name);
        }
    }
    // The appenders are valid; the config built from them must reference only those.
    let (appenders, errors) = raw.appenders_lossy(&deserializers);
    if !errors.is_empty() {
        return Err(errors.to_string());
    }
    log4rs::config::Config::builder()
        .appenders(appenders)
        .loggers(raw.loggers())
        .build(raw.root())
        .map_err(|e| e.to_string())?;
    if raw.root().appenders().is_empty() && raw.loggers().iter().all(|l| l.appenders().is_empty()) {
        return Err(
            "no appender is used: the root and every logger have no appenders, nothing would be logged"
                .into(),
        );
    }
    Ok(())
}

/// Sets up log4rs for a home. Returns a line saying which configuration is in use.
/// A broken `conf/log4rs.yaml` is an error: the node does not start without its logs.
pub fn init(root: &Path) -> anyhow::Result<String> {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let file = root.join("conf/log4rs.yaml");
    if file.is_file() {
        check_file(&file).map_err(|e| anyhow::anyhow!("conf/log4rs.yaml: {e}"))?;
        // Paths in the file (logs/...) are relative to the home, which is the working directory.
        let _ = std::env::set_current_dir(&root);
        log4rs::init_file(&file, Default::default()).map_err(|e| anyhow::anyhow!("conf/log4rs.yaml: {e}"))?;
        return Ok("logging configured by conf/log4rs.yaml".into());
    }
    init_console(LevelFilter::Info)?;
    Ok("logging to the console (no conf/log4rs.yaml)".into())
}

/// Console logging only (used by commands other than `run` and when no file is given).
pub fn init_console(level: LevelFilter) -> anyhow::Result<()> {
    use log4rs::append::console::{ConsoleAppender, Target};
    use log4rs::config::{Appender, Config, Logger, Root};
    use log4rs::encode::pattern::PatternEncoder;
    let level = std::env::var("STAGE_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(level);
    let console = ConsoleAppender::builder()
        .target(Target::Stderr)
        .encoder(Box::new(PatternEncoder::new(DEFAULT_PATTERN)))
        .build();
    let config = Config::builder()
        .appender(Appender::builder().build("console", Box::new(console)))
        // odbc-api logs every driver diagnostic (notices included) as a warning; stage
        // raises the ones that matter as Lua errors with SQLSTATE, so keep only errors.
        .logger(Logger::builder().build("odbc_api", LevelFilter::Error))
        .build(Root::builder().appender("console").build(level))?;
    log4rs::init_config(config)?;
    Ok(())
}

/// Rate limit of repeated errors: per call site, the first `per_window` errors of each
/// window are logged; the rest are counted, and the count is told with the next error
/// logged from that site ("and 16,998 more like it in the last 10 s").
pub struct FloodGate {
    window: std::time::Duration,
    per_window: u64,
    sites: std::collections::HashMap<String, Site>,
}

struct Site {
    start: std::time::Instant,
    logged: u64,
    suppressed: u64,
}

/// What to do with one error.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Log it; `suppressed` errors of the same site were dropped in the window before.
    Log { suppressed: u64 },
    /// Count it, do not log it.
    Drop,
}

/// Sites remembered at most; beyond, sites whose window is over are forgotten.
const MAX_SITES: usize = 4096;

impl FloodGate {
    pub fn new(window: std::time::Duration, per_window: u64) -> FloodGate {
        FloodGate {
            window,
            per_window: per_window.max(1),
            sites: std::collections::HashMap::new(),
        }
    }

    /// Decides about one error from `site` (its script location, or its first line).
    pub fn admit(&mut self, site: &str, now: std::time::Instant) -> Verdict {
        if !self.sites.contains_key(site) && self.sites.len() >= MAX_SITES {
            let window = self.window;
            self.sites.retain(|_, s| now.duration_since(s.start) < window);
            if self.sites.len() >= MAX_SITES {
                return Verdict::Drop;
            }
        }
        let s = self.sites.entry(site.to_string()).or_insert(Site {
            start: now,
            logged: 0,
            suppressed: 0,
        });
        if now.duration_since(s.start) >= self.window {
            let suppressed = std::mem::take(&mut s.suppressed);
            s.start = now;
            s.logged = 1;
            return Verdict::Log { suppressed };
        }
        if s.logged < self.per_window {
            s.logged += 1;
            Verdict::Log { suppressed: 0 }
        } else {
            s.suppressed += 1;
            Verdict::Drop
        }
    }

    /// The window, for messages.
    pub fn window(&self) -> std::time::Duration {
        self.window
    }
}

/// `16998` → `16,998`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Where a logger call came from, as Lua's debug info tells.
#[derive(Debug, Default, Clone)]
pub struct Caller {
    pub file: String,
    pub function: String,
    pub line: usize,
}

/// Words of an environment variable's name that make it a secret: `%{NAME}` never expands
/// such a name in a log line unless `%logger.env` in stage.json allows it.
const SECRET_WORDS: &[&str] = &[
    "KEY",
    "APIKEY",
    "TOKEN",
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "PASS",
    "CREDENTIAL",
    "CREDENTIALS",
    "AUTH",
    "PRIVATE",
    "SESSION",
    "COOKIE",
    "SIGNATURE",
    "CERT",
];

/// Whether an environment variable's name looks like it holds a secret
/// (`VULTR_API_KEY`, `DB_PASSWORD`, `GITHUB_TOKEN`, `AWS_SECRET_ACCESS_KEY`, ...).
pub fn looks_secret(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    upper
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|w| SECRET_WORDS.contains(&w))
        || ["KEY", "TOKEN", "SECRET", "PASSWORD"]
            .iter()
            .any(|w| upper.ends_with(w))
}

/// What `%{NAME}` becomes in a log line: the variable, unless its name looks secret and is
/// not in `allowed`; then the text `[hidden]`.
pub fn log_env(name: &str, allowed: &[String]) -> Option<String> {
    if looks_secret(name) && !allowed.iter().any(|a| a == name) {
        return Some("[hidden]".into());
    }
    std::env::var(name).ok()
}

/// Expands `%l` (= `%F [%M:%L]`), `%F`, `%M`, `%L`, `%{NAME}` (environment) and `%%`.
pub fn expand(msg: &str, caller: &Caller, env: impl Fn(&str) -> Option<String>) -> String {
    if !msg.contains('%') {
        return msg.to_string();
    }
    let mut out = String::with_capacity(msg.len() + 32);
    let mut chars = msg.char_indices().peekable();
    while let Some((i, ch)) = chars.next() {
        if ch != '%' {
            out.push(ch);
            continue;
        }
        match chars.peek().map(|(_, c)| *c) {
            Some('l') => {
                chars.next();
                out.push_str(&format!("{} [{}:{}]", caller.file, caller.function, caller.line));
            }
            Some('F') => {
                chars.next();
                out.push_str(&caller.file);
            }
            Some('M') => {
                chars.next();
                out.push_str(&caller.function);
            }
            Some('L') => {
                chars.next();
                out.push_str(&caller.line.to_string());
            }
            Some('%') => {
                chars.next();
                out.push('%');
            }
            Some(c) if c == '{' || c.is_ascii_digit() => {
                // `%{NAME}` or STAGE's `%N{NAME}`: at most N characters, right-aligned.
                let rest = &msg[i + 1..];
                let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
                let after = &rest[digits..];
                match after.strip_prefix('{').and_then(|a| a.find('}').map(|e| &a[..e])) {
                    Some(name) => {
                        let value = env(name).unwrap_or_default();
                        match rest[..digits].parse::<usize>() {
                            Ok(width) => {
                                let n = value.chars().count();
                                if n > width {
                                    out.extend(value.chars().take(width));
                                } else {
                                    out.extend(std::iter::repeat_n(' ', width - n));
                                    out.push_str(&value);
                                }
                            }
                            Err(_) => out.push_str(&value),
                        }
                        // Skip "N{name}".
                        for _ in 0..digits + name.chars().count() + 2 {
                            chars.next();
                        }
                    }
                    None => out.push('%'),
                }
            }
            _ => out.push('%'),
        }
    }
    out
}

/// Takes every `%{=group[:level]}` out of a logger format (STAGE finds them anywhere in
/// the message); returns the text without them and the last one found.
pub fn take_routes(msg: &str) -> (String, Option<String>) {
    let mut out = String::with_capacity(msg.len());
    let mut route = None;
    let mut rest = msg;
    while let Some(start) = rest.find("%{=") {
        let Some(len) = rest[start..].find('}') else { break };
        out.push_str(&rest[..start]);
        route = Some(rest[start..start + len + 1].to_string());
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    (out, route)
}

/// Parses the optional second argument of a logger call: `%{=group}` or `%{=group:level}`
/// selects the log target (`group`) and, optionally, overrides the level.
pub fn parse_route(spec: &str) -> Result<(Option<String>, Option<log::Level>), String> {
    let Some(start) = spec.find("%{=") else {
        return Err(format!(
            "expected \"%{{=group}}\" or \"%{{=group:level}}\", got \"{spec}\""
        ));
    };
    let rest = &spec[start + 3..];
    let end = rest
        .find('}')
        .ok_or_else(|| format!("unclosed \"%{{=\" in \"{spec}\""))?;
    let inner = &rest[..end];
    let (group, level) = match inner.split_once(':') {
        Some((g, l)) => {
            let level = match l.to_ascii_lowercase().as_str() {
                "trace" => log::Level::Trace,
                "debug" => log::Level::Debug,
                "info" => log::Level::Info,
                "warn" | "warning" => log::Level::Warn,
                "error" | "fatal" => log::Level::Error,
                other => return Err(format!("unknown log level \"{other}\" in \"{spec}\"")),
            };
            (g, Some(level))
        }
        None => (inner, None),
    };
    Ok(((!group.is_empty()).then(|| group.to_string()), level))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_widths_and_inline_routes() {
        let env = |n: &str| (n == "W").then(|| "word".to_string());
        assert_eq!(
            expand("[%8{W}][%3{W}][%0{W}][%{W}][%2{NONE}]", &caller(), env),
            "[    word][wor][][word][  ]"
        );
        assert_eq!(expand("100%5 done", &caller(), env), "100%5 done");
        assert_eq!(
            take_routes("a %{=bot:warn}b%{=x}"),
            ("a b".to_string(), Some("%{=x}".to_string()))
        );
        assert_eq!(take_routes("plain"), ("plain".to_string(), None));
        assert_eq!(take_routes("open %{=bot"), ("open %{=bot".to_string(), None));
    }

    fn caller() -> Caller {
        Caller {
            file: "package/start.lua".into(),
            function: "login".into(),
            line: 12,
        }
    }

    #[test]
    fn escapes_expand() {
        let env = |n: &str| (n == "USER").then(|| "kim".to_string());
        assert_eq!(expand("plain", &caller(), env), "plain");
        assert_eq!(
            expand("%l hello %{USER}", &caller(), env),
            "package/start.lua [login:12] hello kim"
        );
        assert_eq!(
            expand("%F:%L in %M", &caller(), env),
            "package/start.lua:12 in login"
        );
        assert_eq!(expand("100%% %{NOPE}!", &caller(), env), "100% !");
        assert_eq!(expand("50% done %{", &caller(), env), "50% done %{");
    }

    #[test]
    fn log4rs_config_is_checked_strictly() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("log4rs.yaml");
        let good =
            "appenders:\n  console:\n    kind: console\nroot:\n  level: info\n  appenders: [console]\n";
        std::fs::write(&file, good).unwrap();
        check_file(&file).unwrap();
        for (bad, expect) in [
            (
                good.replace("kind: console", "kind: consol"),
                "appender \"console\": no appender deserializer for kind `consol`",
            ),
            (
                good.replace("appenders: [console]", "appenders: [consol]"),
                "consol",
            ),
            (good.replace("level: info", "level: loud"), "loud"),
            (
                good.replace("    kind: console\n", "    kind: console\n    target: stdrr\n"),
                "appender \"console\"",
            ),
            ("root:\n  level: info\n".to_string(), "no appender is used"),
            ("appenders: [\n".to_string(), ""),
        ] {
            std::fs::write(&file, &bad).unwrap();
            let e = check_file(&file).expect_err(&bad);
            assert!(e.contains(expect), "{bad}: {e}");
        }
    }

    #[test]
    fn secret_names_are_not_expanded() {
        for n in [
            "VULTR_API_KEY",
            "GITHUB_TOKEN",
            "DB_PASSWORD",
            "AWS_SECRET_ACCESS_KEY",
            "apikey",
            "MY_PASS",
        ] {
            assert!(looks_secret(n), "{n}");
        }
        for n in ["HOME", "USER", "PWD", "HOSTNAME", "KEYBOARD_LAYOUT", "MONKEYS"] {
            assert!(!looks_secret(n), "{n}");
        }
        std::env::set_var("STAGE_TEST_LOG_TOKEN", "t0ken");
        assert_eq!(log_env("STAGE_TEST_LOG_TOKEN", &[]).as_deref(), Some("[hidden]"));
        assert_eq!(
            log_env("STAGE_TEST_LOG_TOKEN", &["STAGE_TEST_LOG_TOKEN".into()]).as_deref(),
            Some("t0ken")
        );
    }

    #[test]
    fn repeated_errors_are_counted_not_logged() {
        use std::time::{Duration, Instant};
        let mut g = FloodGate::new(Duration::from_secs(10), 3);
        let t = Instant::now();
        let logged = (0..17_001)
            .filter(|i| g.admit("package/start.lua:5", t + Duration::from_micros(*i)) != Verdict::Drop)
            .count();
        assert_eq!(logged, 3);
        // Another site is not affected.
        assert_eq!(g.admit("package/start.lua:9", t), Verdict::Log { suppressed: 0 });
        // After the window, the next one is logged with the count of the dropped ones.
        assert_eq!(
            g.admit("package/start.lua:5", t + Duration::from_secs(11)),
            Verdict::Log { suppressed: 16_998 }
        );
        assert_eq!(thousands(16_998), "16,998");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000_000), "1,000,000");
    }

    #[test]
    fn routes_parse() {
        assert_eq!(parse_route("%{=db}").unwrap(), (Some("db".into()), None));
        assert_eq!(
            parse_route("%{=db:warn}").unwrap(),
            (Some("db".into()), Some(log::Level::Warn))
        );
        assert!(parse_route("%{=db:loud}").is_err());
        assert!(parse_route("db").is_err());
    }
}
