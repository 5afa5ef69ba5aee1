//! The `stage` command line: `run`, `check`, `new`, `send`, `vultr`, `vultr-emulator`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

// Messages, Lua values and coroutine stacks are allocated on one instance's thread and freed
// on another's; mimalloc handles that without the arena lock contention glibc shows
// (measured with `scripts/bench messages`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "stage",
    version,
    about = "Hosts Lua scripts for game and server logic"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a stage home and serve until SIGINT/SIGTERM.
    Run {
        /// The stage home (conf/, package/, lib/, rollback/, preload/, logs/).
        #[arg(default_value = ".")]
        home: PathBuf,
        /// Arguments for the scripts (`process.args`), after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Validate conf/stage.json and compile every script; prints file:line for each problem.
    Check {
        #[arg(default_value = ".")]
        home: PathBuf,
    },
    /// Create a new stage home from the template.
    New {
        /// Directory to create.
        name: PathBuf,
    },
    /// The cluster of a stage home: `stage cluster status HOME` asks the running node (over
    /// its UDP port, with its #cluster-key) for its members, their state, stage ids and load.
    Cluster {
        /// `status`.
        action: String,
        #[arg(default_value = ".")]
        home: PathBuf,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Vultr API v2: listall, create, list, subdetail, wait, delete (VultrMaker parity).
    Vultr(stage::vultr_cli::VultrArgs),
    /// Serve an emulator of the Vultr API v2 (for tests and trying `stage vultr` without an account).
    VultrEmulator(stage::vultr_cli::EmulatorArgs),
    /// Load balancers of a home: `stage lb status HOME`.
    Lb(stage::lb_cli::LbArgs),
    /// Send JSON requests as BSON frames to a broker port and print the replies as JSON.
    Send {
        /// `host:port`, a broker URI such as `udp://127.0.0.1:9000?bson`,
        /// `ws://127.0.0.1:8081/game?bson` (also `tls://`, `wss://`), or an `http://` URL
        /// (GET, or POST of the JSON; `-` posts each line of stdin).
        addr: String,
        /// One request as a JSON object; without it, each line of stdin is a request.
        json: Option<String>,
        /// bson (default), packet or text.
        #[arg(long)]
        framing: Option<String>,
        /// Milliseconds to wait for each reply.
        #[arg(long, default_value_t = 5000)]
        timeout: u64,
        /// A PEM file of extra trusted roots (a private CA) for tls:// and wss://.
        #[arg(long)]
        ca: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { home, args } => {
            let home = home.canonicalize().unwrap_or(home);
            match stage::logging::init(&home) {
                Ok(line) => log::info!("{line}"),
                Err(e) => {
                    eprintln!("stage: {e}");
                    return ExitCode::from(2);
                }
            }
            match run(&home, args) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    log::error!("{e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Check { home } => match stage::check::check(&home) {
            Ok(report) => {
                for line in &report.lines {
                    println!("{line}");
                }
                if report.problems == 0 {
                    println!(
                        "ok: {} script(s), {} instance(s)",
                        report.scripts, report.instances
                    );
                    ExitCode::SUCCESS
                } else {
                    println!("{} problem(s)", report.problems);
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("stage check: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Send {
            addr,
            json,
            framing,
            timeout,
            ca,
        } => {
            let opts = stage::send::SendOptions {
                addr,
                json,
                framing,
                timeout_ms: timeout,
                ca,
            };
            match stage::send::run(&opts) {
                Ok(0) => ExitCode::SUCCESS,
                Ok(_) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("stage send: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::New { name } => match stage::scaffold::new_home(&name) {
            Ok(()) => {
                println!(
                    "created stage home {}; run it with: stage run {}",
                    name.display(),
                    name.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("stage new: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Cluster { action, home, json } => match cluster_status(&action, &home, json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("stage cluster: {e:#}");
                ExitCode::from(1)
            }
        },
        Command::Vultr(args) => stage::vultr_cli::run(args),
        Command::VultrEmulator(args) => stage::vultr_cli::run_emulator(args),
        Command::Lb(args) => stage::lb_cli::run(args),
    }
}

/// `stage run`: starts the node, stops it on SIGINT/SIGTERM (or when a script asks), and
/// returns its exit status.
fn run(home: &std::path::Path, args: Vec<String>) -> anyhow::Result<i32> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Installed before the instances start, so an early signal stops the node cleanly.
    let (mut term, mut int) = {
        let _guard = rt.enter();
        (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?)
    };
    let node = stage::host::run::start(home, args, stage::lua::bindings())?;
    rt.block_on(async {
        tokio::select! {
            _ = term.recv() => log::info!("SIGTERM: stopping"),
            _ = int.recv() => log::info!("SIGINT: stopping"),
            _ = node.stopped() => log::info!("stop requested by a script"),
        }
    });
    Ok(node.join())
}

/// `stage cluster status HOME`: one line per member (node, state, stage ids with instances
/// and load), then the refused-datagram counters.
fn cluster_status(action: &str, home: &std::path::Path, json: bool) -> anyhow::Result<()> {
    if action != "status" {
        anyhow::bail!("unknown action \"{action}\" (expected: status)");
    }
    let (_, config, _) = stage::host::node::open_home(home)?;
    let c = stage::cluster::ClusterConfig::parse(
        &config.cluster,
        &config.cluster_key,
        config.cluster_insecure,
        config.router_sync_ms,
        &stage::net::sock::interfaces(),
    )?
    .ok_or_else(|| anyhow::anyhow!("{}: conf/stage.json has no #cluster port", home.display()))?;
    let to = std::net::SocketAddr::new(
        if c.advertise.is_unspecified() {
            [127, 0, 0, 1].into()
        } else {
            c.advertise
        },
        c.port,
    );
    let st = stage::cluster::udp::status(to, c.key.as_deref(), &c.accept, std::time::Duration::from_secs(2))?;
    if json {
        println!("{st}");
        return Ok(());
    }
    println!(
        "node {} ({})",
        st["node"].as_str().unwrap_or("?"),
        if st["secure"] == true {
            "authenticated"
        } else {
            "insecure"
        }
    );
    println!(
        "{:<24} {:<8} {:<6} stages (instances, load %)",
        "member", "state", "routed"
    );
    for m in st["members"].as_array().into_iter().flatten() {
        let stages: Vec<String> = m["stages"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                format!(
                    "{}({}, {}%)",
                    s["stage"].as_str().unwrap_or("?"),
                    s["instances"],
                    s["load"]
                )
            })
            .collect();
        println!(
            "{:<24} {:<8} {:<6} {}",
            m["node"].as_str().unwrap_or("?"),
            m["state"].as_str().unwrap_or("?"),
            if m["routed"] == true { "yes" } else { "no" },
            stages.join(" ")
        );
    }
    println!("refused datagrams: {}", st["rejected"]);
    Ok(())
}
