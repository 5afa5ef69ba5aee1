//! Logging: log4rs set up from `conf/log4rs.yaml` or a console default, and the
//! expansion of STAGE's logger escapes (`%l %F %M %L %{ENV}`, `%{=group:level}`).

use log::LevelFilter;
use std::path::Path;

/// The console pattern used when the home has no `conf/log4rs.yaml`.
pub const DEFAULT_PATTERN: &str = "{d(%Y-%m-%d %H:%M:%S%.3f)} [{l:<5}] {t}: {m}{n}";

/// Sets up log4rs for a home. Returns a line saying which configuration is in use.
pub fn init(root: &Path) -> anyhow::Result<String> {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let file = root.join("conf/log4rs.yaml");
    if file.is_file() {
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

/// Where a logger call came from, as Lua's debug info tells.
#[derive(Debug, Default, Clone)]
pub struct Caller {
    pub file: String,
    pub function: String,
    pub line: usize,
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
            Some('{') => match msg[i + 2..].find('}') {
                Some(end) => {
                    let name = &msg[i + 2..i + 2 + end];
                    out.push_str(&env(name).unwrap_or_default());
                    // Skip "{name}".
                    for _ in 0..name.chars().count() + 2 {
                        chars.next();
                    }
                }
                None => out.push('%'),
            },
            _ => out.push('%'),
        }
    }
    out
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
