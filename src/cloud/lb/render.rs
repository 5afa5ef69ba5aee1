//! Renders an LB's desired state into a complete `haproxy.cfg` (master-worker, an admin-level
//! runtime API socket at a private path, a server state file across reloads, checks from the
//! health criteria), and names servers so that the config, the state file and the runtime API
//! agree on them.

use super::{Protocol, Spec};
use std::fmt::Write;
use std::path::Path;

/// Where an LB's process keeps its files (all under its private directory).
#[derive(Debug, Clone, PartialEq)]
pub struct Paths {
    pub config: std::path::PathBuf,
    pub socket: std::path::PathBuf,
    pub pidfile: std::path::PathBuf,
    pub state: std::path::PathBuf,
    pub log: std::path::PathBuf,
}

impl Paths {
    pub fn new(dir: &Path) -> Paths {
        Paths {
            config: dir.join("haproxy.cfg"),
            socket: dir.join("admin.sock"),
            pidfile: dir.join("haproxy.pid"),
            state: dir.join("server-state"),
            log: dir.join("haproxy.log"),
        }
    }
}

/// The backend (proxy) name of an LB.
pub fn backend_name(lb: &str) -> String {
    format!("be_{lb}")
}

/// The server name of a backend address: `s` and the address with every other character
/// turned into `_` (`127.0.0.1:9001` → `s127_0_0_1_9001`), unique per address.
pub fn server_name(address: &str) -> String {
    let mut s = String::with_capacity(address.len() + 1);
    s.push('s');
    for c in address.chars() {
        s.push(if c.is_ascii_alphanumeric() { c } else { '_' });
    }
    s
}

fn ms(seconds: f64) -> u64 {
    (seconds * 1000.0).round().max(1.0) as u64
}

/// The check keywords of a server line (also used by runtime `add server`, which does not
/// inherit `default-server`). An `autoscaled` server gets `slowstart` when the policy has a
/// warm-up: its weight ramps up from 0 once it is UP (also after `enable server`).
pub fn server_args(spec: &Spec, autoscaled: bool) -> String {
    let h = &spec.health;
    let mut s = format!(
        "check inter {}ms fall {} rise {}",
        ms(h.interval),
        h.unhealthy,
        h.healthy
    );
    if let Some(p) = h.port {
        let _ = write!(s, " port {p}");
    }
    if let Some(a) = spec.autoscale.as_ref().filter(|a| autoscaled && a.warmup > 0.0) {
        let _ = write!(s, " slowstart {}ms", ms(a.warmup));
    }
    s
}

/// The whole configuration for `spec`, its files under `paths`. `draining` servers are written
/// with `disabled`, so that a reload or a restart does not send them new traffic.
pub fn render(spec: &Spec, paths: &Paths, draining: &[String]) -> String {
    let mut c = String::with_capacity(2048);
    let be = backend_name(&spec.name);
    let h = &spec.health;
    let _ = writeln!(
        c,
        "# Rendered by stage's lb controller for {:?}; edits are overwritten.",
        spec.name
    );
    c.push_str("global\n");
    c.push_str("    master-worker\n");
    let _ = writeln!(
        c,
        "    stats socket {} mode 600 level admin",
        paths.socket.display()
    );
    c.push_str("    stats timeout 30s\n");
    let _ = writeln!(c, "    server-state-file {}", paths.state.display());
    c.push_str("    hard-stop-after 30s\n");
    let _ = writeln!(c, "    maxconn {}", spec.maxconn);
    c.push('\n');
    c.push_str("defaults\n");
    let _ = writeln!(c, "    mode {}", spec.protocol.word());
    c.push_str("    timeout connect 2s\n");
    c.push_str("    timeout client 60s\n");
    c.push_str("    timeout server 60s\n");
    c.push_str("    timeout queue 10s\n");
    let _ = writeln!(c, "    timeout check {}ms", ms(h.timeout));
    c.push_str("    retries 3\n");
    c.push_str("    option redispatch\n");
    c.push_str("    load-server-state-from-file global\n");
    c.push('\n');
    let _ = writeln!(c, "frontend fe_{}", spec.name);
    let _ = writeln!(c, "    bind {}", spec.listen);
    let _ = writeln!(c, "    maxconn {}", spec.maxconn);
    let _ = writeln!(c, "    default_backend {be}");
    c.push('\n');
    let _ = writeln!(c, "backend {be}");
    let _ = writeln!(c, "    balance {}", spec.algorithm.word());
    if h.protocol == Protocol::Http {
        c.push_str("    option httpchk\n");
        let _ = writeln!(c, "    http-check send meth GET uri {} ver HTTP/1.0", h.path);
        let _ = writeln!(c, "    http-check expect status {}", h.expect);
    }
    for line in &spec.options {
        let _ = writeln!(c, "    {line}");
    }
    for b in &spec.backends {
        let args = server_args(spec, b.autoscaled);
        let disabled = if draining.contains(&b.address) {
            " disabled"
        } else {
            ""
        };
        let _ = writeln!(
            c,
            "    server {} {} {args}{disabled}",
            server_name(&b.address),
            b.address
        );
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_checks_from_the_criteria() {
        let spec = Spec::from_json(
            "t",
            &json!({"name": "web", "listen": "127.0.0.1:8080", "backends": ["127.0.0.1:9001", "[::1]:9002"],
                    "health": {"path": "/healthz", "interval": 2, "timeout": 0.5, "healthy": 3, "unhealthy": 4}}),
        )
        .unwrap();
        let cfg = render(&spec, &Paths::new(Path::new("/x")), &["[::1]:9002".into()]);
        assert!(
            cfg.contains("stats socket /x/admin.sock mode 600 level admin"),
            "{cfg}"
        );
        assert!(cfg.contains("timeout check 500ms"));
        assert!(cfg.contains("http-check send meth GET uri /healthz"));
        assert!(cfg.contains("server s127_0_0_1_9001 127.0.0.1:9001 check inter 2000ms fall 4 rise 3\n"));
        assert!(cfg.contains("server s___1__9002 [::1]:9002 check inter 2000ms fall 4 rise 3 disabled\n"));
        assert!(cfg.contains("load-server-state-from-file global"));
    }

    #[test]
    fn autoscaled_servers_warm_up() {
        let mut spec = Spec::from_json(
            "t",
            &json!({"name": "web", "listen": "127.0.0.1:8080", "backends": ["127.0.0.1:9001"],
                    "autoscale": {"min": 1, "max": 3, "target": {"queue": 5}, "warmup": 20}}),
        )
        .unwrap();
        spec.backends.push(crate::cloud::lb::Backend {
            address: "127.0.0.1:9002".into(),
            autoscaled: true,
        });
        let cfg = render(&spec, &Paths::new(Path::new("/x")), &[]);
        assert!(
            cfg.contains("server s127_0_0_1_9001 127.0.0.1:9001 check inter 2000ms fall 2 rise 2\n"),
            "{cfg}"
        );
        assert!(
            cfg.contains(
                "server s127_0_0_1_9002 127.0.0.1:9002 check inter 2000ms fall 2 rise 2 slowstart 20000ms\n"
            ),
            "{cfg}"
        );
        assert!(!server_args(&spec, false).contains("slowstart"));
    }

    #[test]
    fn tcp_mode_has_connect_checks() {
        let spec = Spec::from_json(
            "t",
            &json!({"name": "db", "protocol": "tcp", "listen": "127.0.0.1:5432", "algorithm": "leastconn"}),
        )
        .unwrap();
        let cfg = render(&spec, &Paths::new(Path::new("/x")), &[]);
        assert!(cfg.contains("mode tcp") && cfg.contains("balance leastconn"));
        assert!(!cfg.contains("httpchk"));
    }
}
