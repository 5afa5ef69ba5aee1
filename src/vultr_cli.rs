//! `stage vultr …` (VultrMaker's create / list / listall / subdetail, plus wait, delete and
//! power actions) and `stage vultr-emulator`. Human-readable tables by default, `--json`
//! for machines; errors go to stderr with exit status 1.

use crate::cloud::vultr::{Client, CreateRequest, Instance, InstanceFilter, Settings, WaitOptions};
use crate::cloud::vultr_emulator::{EmulatorConfig, Lifecycle};
use clap::{Args, Subcommand};
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct VultrArgs {
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// API base URL. Otherwise %vultr.endpoint of --home, then env VULTR_ENDPOINT, then the real API (api.vultr.com/v2).
    #[arg(long, global = true, value_name = "URL")]
    pub endpoint: Option<String>,
    /// A stage home whose conf/stage.json %vultr section (api_key, endpoint) is used.
    #[arg(long, global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,
    #[command(subcommand)]
    pub command: VultrCommand,
}

#[derive(Subcommand, Debug)]
pub enum VultrCommand {
    /// Regions, plans and operating systems (VultrMaker listall).
    Listall,
    /// Regions (dcid in VultrMaker's terms).
    Regions,
    /// Plans (vpsplanid), optionally of one type: vc2, vhf, vhp, vdc, voc, ...
    Plans {
        #[arg(long = "type")]
        kind: Option<String>,
    },
    /// Operating systems (osid).
    Os,
    /// Create an instance: stage vultr create icn vc2-1c-1gb 1743 (VultrMaker create dcid vpsplanid osid).
    Create {
        region: String,
        plan: String,
        os_id: i64,
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        hostname: Option<String>,
        /// A tag; repeat for several.
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Every instance of the account (all pages).
    List {
        #[arg(long)]
        tag: Option<String>,
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        region: Option<String>,
    },
    /// The status of one instance (VultrMaker subdetail).
    Subdetail { id: String },
    /// Block until the instance is really ready (active, running, ok, with an IP).
    Wait {
        id: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600.0)]
        timeout: f64,
        /// Poll every this many seconds.
        #[arg(long, default_value_t = 5.0)]
        interval: f64,
    },
    /// Destroy an instance.
    Delete { id: String },
    /// Power on an instance (restarts it if it is running).
    Start { id: String },
    /// Power off an instance.
    Halt { id: String },
    /// Reboot an instance.
    Reboot { id: String },
}

#[derive(Args, Debug)]
pub struct EmulatorArgs {
    /// Port to listen on (0 picks a free one; the URL is printed on the first line).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The API key to accept (default: env VULTR_API_KEY, else EMULATOR-KEY).
    #[arg(long)]
    pub key: Option<String>,
    /// Milliseconds between lifecycle steps (pending → locked → installingbooting → ok).
    #[arg(long, default_value_t = 20_000)]
    pub step_ms: u64,
    /// Requests per second per client before 429 (0 = unlimited); the real API allows 30.
    #[arg(long, default_value_t = 30)]
    pub rate_limit: u32,
    /// Answer DELETE of a locked instance with the real API's 500.
    #[arg(long)]
    pub locked_delete_fails: bool,
}

fn settings(args: &VultrArgs) -> Result<Settings, String> {
    let section = match &args.home {
        Some(home) => {
            let cfg =
                crate::config::Config::load(&home.join("conf/stage.json")).map_err(|e| e.to_string())?;
            cfg.vultr.clone()
        }
        None => None,
    };
    let mut s = Settings::from_config(section.as_ref()).map_err(|e| e.to_string())?;
    if let Some(e) = &args.endpoint {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(format!("--endpoint {e}: expected an http:// or https:// URL"));
        }
        s.endpoint = e.clone();
    }
    Ok(s)
}

/// Runs `stage vultr …`.
pub fn run(args: VultrArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stage vultr: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run_async(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stage vultr: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_json<T: Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| "null".into())
    );
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

fn instance_rows(list: &[Instance]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            vec![
                i.id.clone(),
                i.label.clone(),
                i.region.clone(),
                i.plan.clone(),
                i.main_ip.clone(),
                format!("{}/{}/{}", i.status, i.power_status, i.server_status),
                i.word().to_string(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "LABEL",
            "REGION",
            "PLAN",
            "MAIN_IP",
            "STATUS/POWER/SERVER",
            "STATE",
        ],
        &rows,
    );
}

fn regions_table(c: &crate::cloud::vultr::Catalog) {
    let rows: Vec<Vec<String>> = c
        .regions
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.city.clone(),
                r.country.clone(),
                r.continent.clone(),
            ]
        })
        .collect();
    table(&["REGION", "CITY", "COUNTRY", "CONTINENT"], &rows);
}

fn plans_table(c: &crate::cloud::vultr::Catalog) {
    let rows: Vec<Vec<String>> = c
        .plans
        .iter()
        .map(|p| {
            vec![
                p.id.clone(),
                p.kind.clone(),
                p.vcpu_count.to_string(),
                format!("{} MB", p.ram),
                format!("{} GB", p.disk),
                format!("{} GB", p.bandwidth),
                format!("${:.2}", p.monthly_cost),
                p.locations.join(","),
            ]
        })
        .collect();
    table(
        &[
            "PLAN",
            "TYPE",
            "VCPU",
            "RAM",
            "DISK",
            "BANDWIDTH",
            "MONTHLY",
            "REGIONS",
        ],
        &rows,
    );
}

fn os_table(c: &crate::cloud::vultr::Catalog) {
    let rows: Vec<Vec<String>> =
        c.os.iter()
            .map(|o| vec![o.id.to_string(), o.name.clone(), o.family.clone(), o.arch.clone()])
            .collect();
    table(&["OS_ID", "NAME", "FAMILY", "ARCH"], &rows);
}

fn secs(s: f64, what: &str) -> Result<Duration, String> {
    crate::host::convert::timeout(&format!("--{what}"), s, crate::host::convert::Unit::Secs)
        .map_err(|e| e.to_string())
}

async fn run_async(args: &VultrArgs) -> Result<(), String> {
    let client = Client::new(settings(args)?).map_err(|e| e.to_string())?;
    let e = |e: crate::cloud::vultr::VultrError| e.to_string();
    let json = args.json;
    match &args.command {
        VultrCommand::Listall => {
            let c = client.catalog().await.map_err(e)?;
            if json {
                print_json(&c);
            } else {
                regions_table(&c);
                println!();
                plans_table(&c);
                println!();
                os_table(&c);
            }
        }
        VultrCommand::Regions => {
            let c = crate::cloud::vultr::Catalog {
                regions: client.regions().await.map_err(e)?,
                ..Default::default()
            };
            if json {
                print_json(&c.regions);
            } else {
                regions_table(&c);
            }
        }
        VultrCommand::Plans { kind } => {
            let c = crate::cloud::vultr::Catalog {
                plans: client.plans(kind.as_deref()).await.map_err(e)?,
                ..Default::default()
            };
            if json {
                print_json(&c.plans);
            } else {
                plans_table(&c);
            }
        }
        VultrCommand::Os => {
            let c = crate::cloud::vultr::Catalog {
                os: client.os().await.map_err(e)?,
                ..Default::default()
            };
            if json {
                print_json(&c.os);
            } else {
                os_table(&c);
            }
        }
        VultrCommand::Create {
            region,
            plan,
            os_id,
            label,
            hostname,
            tags,
        } => {
            let req = CreateRequest {
                region: region.clone(),
                plan: plan.clone(),
                os_id: Some(*os_id),
                label: label.clone(),
                hostname: hostname.clone(),
                tags: tags.clone(),
                ..Default::default()
            };
            let inst = client.create(&req).await.map_err(e)?;
            if json {
                print_json(&inst);
            } else {
                println!("created {} ({} {} {})", inst.id, inst.region, inst.plan, inst.os);
                println!("state: {}", inst.state_line());
                println!("follow it with: stage vultr wait {}", inst.id);
            }
        }
        VultrCommand::List { tag, label, region } => {
            let filter = InstanceFilter {
                tag: tag.clone(),
                label: label.clone(),
                region: region.clone(),
                main_ip: None,
            };
            let list = client.instances(&filter).await.map_err(e)?;
            if json {
                print_json(&list);
            } else {
                instance_rows(&list);
            }
        }
        VultrCommand::Subdetail { id } => {
            let inst = client.get(id).await.map_err(e)?;
            if json {
                print_json(&inst);
            } else {
                println!("{} {} ({})", inst.id, inst.word(), inst.state_line());
            }
        }
        VultrCommand::Wait {
            id,
            timeout,
            interval,
        } => {
            let opts = WaitOptions {
                timeout: secs(*timeout, "timeout")?,
                interval: secs(*interval, "interval")?.max(Duration::from_millis(10)),
            };
            let inst = client
                .wait(id, &opts, |i| {
                    // Progress goes to stderr so that stdout stays one JSON document with --json.
                    eprintln!("{} {}", i.id, i.state_line());
                    std::future::ready(())
                })
                .await
                .map_err(e)?;
            if json {
                print_json(&inst);
            } else {
                println!("{} ready at {}", inst.id, inst.main_ip);
            }
        }
        VultrCommand::Delete { id } => {
            client.delete(id).await.map_err(e)?;
            if json {
                print_json(&serde_json::json!({"deleted": id}));
            } else {
                println!("deleted {id}");
            }
        }
        VultrCommand::Start { id } | VultrCommand::Halt { id } | VultrCommand::Reboot { id } => {
            let action = match &args.command {
                VultrCommand::Start { .. } => "start",
                VultrCommand::Halt { .. } => "halt",
                _ => "reboot",
            };
            client.action(id, action).await.map_err(e)?;
            if json {
                print_json(&serde_json::json!({ "action": action, "id": id }));
            } else {
                println!("{action} {id}: accepted");
            }
        }
    }
    Ok(())
}

/// Runs `stage vultr-emulator` until SIGINT/SIGTERM.
pub fn run_emulator(args: EmulatorArgs) -> ExitCode {
    let key = args
        .key
        .clone()
        .or_else(|| std::env::var("VULTR_API_KEY").ok().filter(|k| !k.is_empty()))
        .unwrap_or_else(|| "EMULATOR-KEY".into());
    let cfg = EmulatorConfig {
        api_key: key,
        lifecycle: Lifecycle::scaled(Duration::from_millis(args.step_ms)),
        rate_limit: (args.rate_limit > 0).then_some(args.rate_limit),
        locked_delete_fails: args.locked_delete_fails,
        ..Default::default()
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stage vultr-emulator: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("stage vultr-emulator: cannot listen on {}:{}: {e}", args.host, args.port);
                return ExitCode::FAILURE;
            }
        };
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        println!("vultr emulator listening on http://{addr}/v2");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let stop = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
        };
        crate::cloud::vultr_emulator::serve_with(listener, cfg, stop).await;
        ExitCode::SUCCESS
    })
}
