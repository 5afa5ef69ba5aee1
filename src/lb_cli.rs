//! `stage lb status HOME`: every load balancer of a home, its backends and their health, read
//! from the running HAProxy processes (`show stat` over each LB's runtime API socket) and
//! their rendered configs; it works whether or not the node is running. Remote LBs (on VMs)
//! are read from their records in the store (`stage_lb_remote`, in `HOME/var/lb/state.db` or
//! the `%odbc` connection `LB` of conf/stage.json) and, where the VM's private network is reachable, from the
//! VM's runtime API over it.

use crate::cloud::lb::controller::{has_remote_files, StoreAt};
use crate::cloud::lb::haproxy::{self, Runtime};
use crate::cloud::lb::remote::{self, Record};
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

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
    let remotes = remote_records(home, &dir);
    if names.is_empty() && matches!(&remotes, Ok(r) if r.is_empty()) {
        return format!("no load balancers in {}\n", dir.display());
    }
    let mut out = String::new();
    for name in names {
        report(&mut out, &name, &dir.join(&name));
    }
    match remotes {
        Ok(remotes) => {
            for (name, rec) in remotes {
                report_remote(&mut out, &name, rec);
            }
        }
        Err(e) => {
            let _ = writeln!(out, "remote load balancers: cannot read the store: {e}");
        }
    }
    out
}

/// A remote LB's record, or why it cannot be read.
type RecordRead = Result<Record, String>;

/// The records of every remote LB, from the store the node uses (older homes' JSON files
/// are imported into it first). No store yet: none.
fn remote_records(home: &Path, dir: &Path) -> Result<Vec<(String, RecordRead)>, String> {
    let config = crate::config::Config::load(&home.join("conf/stage.json")).map_err(|e| e.to_string())?;
    let at = StoreAt::of(dir, config.lua.odbc.get("LB")).map_err(|e| e.to_string())?;
    if matches!(&at, StoreAt::Sqlite(p) if !p.exists()) && !has_remote_files(dir) {
        return Ok(Vec::new());
    }
    let store = at.open().map_err(|e| e.to_string())?;
    store.import_remote_files(dir);
    let names = store.remote_names().map_err(|e| e.to_string())?;
    Ok(names
        .into_iter()
        .filter_map(|name| match store.load_remote(&name) {
            Ok(Some(r)) => Some((name, Ok(r))),
            Ok(None) => None,
            Err(e) => Some((name, Err(e.to_string()))),
        })
        .collect())
}

/// A remote LB: its record (placement, VM, reserved IP, supervision's last state) and, when
/// this machine is in the VM's private network, the VM's `show stat` over it.
fn report_remote(out: &mut String, name: &str, rec: RecordRead) {
    let rec = match rec {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(out, "{name}  remote  UNREADABLE RECORD: {e}");
            return;
        }
    };
    let p = &rec.placement;
    let _ = writeln!(
        out,
        "{name}  {} {}  {}  remote ({} {} {})  vm {}{}  reserved ip {}  state {}  failovers {}",
        rec.spec.protocol.word(),
        rec.spec.listen,
        rec.spec.algorithm.word(),
        p.provider,
        p.region,
        p.plan,
        rec.instance,
        if rec.internal_ip.is_empty() {
            String::new()
        } else {
            format!(" (private {})", rec.internal_ip)
        },
        p.reserved_ip.as_deref().unwrap_or("none"),
        if rec.state.is_empty() { "?" } else { &rec.state },
        rec.failovers,
    );
    if let Some(r) = &rec.replacing {
        let _ = writeln!(out, "  replacement vm {r} is being prepared");
    }
    let rows = rec
        .internal_ip
        .parse::<std::net::IpAddr>()
        .ok()
        .and_then(|ip| {
            let addr = std::net::SocketAddr::new(ip, remote::RUNTIME_PORT);
            remote::runtime_command_blocking(addr, "show stat", Duration::from_secs(1)).ok()
        })
        .map(|t| haproxy::parse_csv(&t))
        .unwrap_or_default();
    if rows.is_empty() {
        let _ = writeln!(
            out,
            "  (the vm's runtime API does not answer from here; backends as recorded)"
        );
    }
    header(out);
    let be = format!("be_{name}");
    for b in &rec.spec.backends {
        let sv = crate::cloud::lb::render::server_name(&b.address);
        match rows
            .iter()
            .find(|r| r.get("pxname") == Some(&be) && r.get("svname") == Some(&sv))
        {
            Some(r) => row(out, &b.address, r),
            None => {
                let _ = writeln!(out, "  {:<24} {:<10}", b.address, "?");
            }
        }
    }
}

fn header(out: &mut String) {
    let _ = writeln!(
        out,
        "  {:<24} {:<10} {:<8} {:>6} {:>8} {:>6} {:>6}",
        "BACKEND", "STATE", "CHECK", "SESS", "TOTAL", "RATE", "QUEUE"
    );
}

fn row(out: &mut String, addr: &str, r: &std::collections::HashMap<String, String>) {
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
    header(out);
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
        row(out, &addr, r);
        shown += 1;
    }
    if shown == 0 {
        for (_, addr) in &servers {
            let _ = writeln!(out, "  {addr:<24} {:<10}", "?");
        }
    }
}
