//! `stage lb status HOME`: every load balancer of a home, its backends and their health, read
//! from the running HAProxy processes (`show stat` over each LB's runtime API socket) and
//! their rendered configs; it works whether or not the node is running.

use crate::cloud::lb::haproxy::{self, Runtime};
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct LbArgs {
    #[command(subcommand)]
    pub command: LbCommand,
}

#[derive(clap::Subcommand)]
pub enum LbCommand {
    /// Print every LB of a home with its backends and their health.
    Status {
        #[arg(default_value = ".")]
        home: PathBuf,
    },
}

pub fn run(args: LbArgs) -> ExitCode {
    match args.command {
        LbCommand::Status { home } => {
            print!("{}", status(&home));
            ExitCode::SUCCESS
        }
    }
}

/// The status report of every LB under `HOME/var/lb`.
pub fn status(home: &Path) -> String {
    let dir = home.join("var").join("lb");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().join("haproxy.cfg").is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        return format!("no load balancers in {}\n", dir.display());
    }
    let mut out = String::new();
    for name in names {
        report(&mut out, &name, &dir.join(&name));
    }
    out
}

fn report(out: &mut String, name: &str, dir: &Path) {
    let cfg = std::fs::read_to_string(dir.join("haproxy.cfg")).unwrap_or_default();
    let word = |key: &str| {
        cfg.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    let servers: Vec<(String, String)> = cfg
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("server "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect();
    let pid = haproxy::read_pid(&dir.join("haproxy.pid"));
    let rows = Runtime::new(&dir.join("admin.sock")).stat().unwrap_or_default();
    let _ = write!(
        out,
        "{name}  {} {}  {}  ",
        word("mode "),
        word("bind "),
        word("balance ")
    );
    match pid {
        Some(p) if !rows.is_empty() => {
            let fe = rows
                .iter()
                .find(|r| r.get("svname").map(String::as_str) == Some("FRONTEND"));
            let get = |k: &str| fe.and_then(|r| r.get(k)).cloned().unwrap_or_default();
            let _ = writeln!(
                out,
                "haproxy {p} running  sessions {}  total {}  req/s {}",
                get("scur"),
                get("stot"),
                get("req_rate")
            );
        }
        Some(p) => {
            let _ = writeln!(out, "haproxy {p} NOT ANSWERING its runtime API");
        }
        None => {
            let _ = writeln!(out, "NOT RUNNING");
        }
    }
    let _ = writeln!(
        out,
        "  {:<24} {:<10} {:<8} {:>6} {:>8} {:>6} {:>6}",
        "BACKEND", "STATE", "CHECK", "SESS", "TOTAL", "RATE", "QUEUE"
    );
    // Servers that HAProxy has (runtime-added included), named by their config address.
    let be = format!("be_{name}");
    let mut shown = 0;
    for r in rows.iter().filter(|r| r.get("pxname") == Some(&be)) {
        let sv = r.get("svname").cloned().unwrap_or_default();
        if sv == "BACKEND" {
            continue;
        }
        let addr = servers
            .iter()
            .find(|(n, _)| n == &sv)
            .map(|(_, a)| a.clone())
            .or_else(|| r.get("addr").cloned())
            .unwrap_or(sv.clone());
        let g = |k: &str| r.get(k).cloned().unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<24} {:<10} {:<8} {:>6} {:>8} {:>6} {:>6}",
            addr,
            haproxy::state_word(&g("status")),
            g("check_status").trim_start_matches("* "),
            g("scur"),
            g("stot"),
            g("rate"),
            g("qcur")
        );
        shown += 1;
    }
    if shown == 0 {
        for (_, addr) in &servers {
            let _ = writeln!(out, "  {addr:<24} {:<10}", "?");
        }
    }
}
