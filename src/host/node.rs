//! `NodeShared`: what every instance of one `stage run` process shares (configuration,
//! home, hot-reload generation, router, worker pool, shutdown signal), and the home's
//! opening and watching.

use crate::config::Config;
use crate::home::Home;
use notify::Watcher;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What every instance of the process shares.
pub struct NodeShared {
    pub config: Arc<Config>,
    pub home: Arc<Home>,
    /// Moves whenever a `.lua` file in the home changes (the hot-reload trigger).
    pub generation: Arc<AtomicU64>,
    /// Keys seen by `stage.once`, process-wide.
    pub once: Mutex<HashSet<String>>,
    pub exit_code: AtomicI32,
    /// `true` once the node is stopping; every instance waits on it.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// `true` once the node drains before stopping (SIGTERM): listeners stop accepting,
    /// what is in flight is answered within `#limits.grace`.
    pub draining: tokio::sync::watch::Sender<bool>,
    /// Client requests and messages being handled now, in every instance.
    pub inflight: std::sync::atomic::AtomicUsize,
    pub args: Vec<String>,
    pub started: Instant,
    /// This node's name (`process.node`): the host name until the cluster names it.
    pub node_name: String,
    /// `process.title`, as last set.
    pub title: Mutex<String>,
    /// The mailboxes of every instance (`stage.signal`, `stage.request`).
    pub router: Arc<crate::router::Router>,
    /// This node in the cluster (`#cluster`), if it has one.
    pub cluster: Option<crate::cluster::udp::Node>,
    /// The blocking-work pool of `thread.new`, started on first use.
    pub threads: std::sync::OnceLock<crate::host::workers::Pool>,
    /// Globals shared by `_SANDBOX[""] = {"*NAME"}`: the last committed value of each.
    pub sandbox: Mutex<std::collections::HashMap<String, crate::value::Value>>,
    /// The Lua engine section as scripts see and change it (`process["$key"]`, STAGE's
    /// running configuration); starts as `Config::section`.
    pub section: Mutex<serde_json::Value>,
    /// Held while a `__("NAME", f)` update runs, so updates from all instances are atomic.
    pub sandbox_update: Mutex<()>,
    /// The node's Prometheus instruments (`#metrics` serves them).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The reload check of a deploy: every instance reloads its scripts when asked.
    pub reloads: crate::host::reload::Reloads,
    /// Its Lua instances, and the way to start, stop and reload them at run time (set by
    /// `run::start`).
    pub control: std::sync::OnceLock<crate::host::control::Control>,
}

impl NodeShared {
    /// The shared state of a node; with `#cluster`, its cluster node is started (a bad
    /// `#cluster` or a taken port is an error naming it).
    pub fn new(config: Config, home: Home, args: Vec<String>) -> anyhow::Result<Arc<NodeShared>> {
        let section = config.section.clone();
        let (shutdown, _) = tokio::sync::watch::channel(false);
        let (draining, _) = tokio::sync::watch::channel(false);
        let cluster = match crate::cluster::ClusterConfig::parse(
            &config.cluster,
            &config.cluster_key,
            config.cluster_insecure,
            config.router_sync_ms,
            &crate::net::sock::interfaces(),
        )? {
            Some(c) => Some(crate::cluster::udp::Node::start(c)?),
            None => None,
        };
        let node_name = cluster
            .as_ref()
            .map_or_else(hostname, |c| c.engine.name().to_string());
        // Lua instances first (their numbers are `process.stage`), then the built-in stages.
        let stages: Vec<String> = config
            .startup
            .iter()
            .map(|s| s.stage_id.clone())
            .chain(config.builtins.iter().map(|b| b.stage_id.clone()))
            .collect();
        let remote: Box<dyn crate::router::Remote> = match &cluster {
            Some(c) => Box::new(crate::cluster::ClusterRemote(c.engine.clone())),
            None => Box::new(crate::router::NoRemote),
        };
        let router = Arc::new(crate::router::Router::new(
            &node_name,
            &stages,
            config.queue,
            remote,
        ));
        let node = Arc::new(NodeShared {
            config: Arc::new(config),
            home: Arc::new(home),
            generation: Arc::new(AtomicU64::new(0)),
            once: Mutex::new(HashSet::new()),
            exit_code: AtomicI32::new(0),
            shutdown,
            draining,
            inflight: std::sync::atomic::AtomicUsize::new(0),
            args,
            started: Instant::now(),
            node_name,
            title: Mutex::new("stage".into()),
            router,
            cluster,
            threads: std::sync::OnceLock::new(),
            sandbox: Mutex::new(std::collections::HashMap::new()),
            section: Mutex::new(section),
            sandbox_update: Mutex::new(()),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            reloads: Default::default(),
            control: std::sync::OnceLock::new(),
        });
        let weak = Arc::downgrade(&node);
        node.metrics.set_sampler(Box::new(move || {
            weak.upgrade().map_or_else(Vec::new, |n| n.sampled())
        }));
        if let Some(c) = &node.cluster {
            c.engine.set_sink(Arc::new(RouterSink(Arc::downgrade(&node))));
        }
        Ok(node)
    }

    /// Counts one request or message as in flight until the guard is dropped.
    pub fn in_flight(self: &Arc<Self>) -> InFlight {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Whether the node is draining or stopping (listeners stop accepting).
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow() || *self.shutdown.borrow()
    }

    /// Asks the whole node to stop with `code` as the process's exit status.
    pub fn request_stop(&self, code: i32) {
        self.exit_code.store(code, Ordering::SeqCst);
        self.shutdown.send_replace(true);
    }
}

impl NodeShared {
    /// The values the metrics read at scrape time: queues, drops, requests in flight,
    /// uptime and the cluster's members (docs/metrics.md).
    fn sampled(&self) -> Vec<crate::metrics::Sampled> {
        use crate::metrics::{Sample, Sampled, SampledKind};
        let queues = self.router.queues();
        let per_instance = |f: &dyn Fn(&crate::router::QueueStat) -> f64| -> Vec<Sample> {
            queues
                .iter()
                .map(|q| Sample {
                    labels: vec![("instance", format!("{}#{}", q.stage, q.instance))],
                    value: f(q),
                })
                .collect()
        };
        let one = |value: f64| {
            vec![Sample {
                labels: vec![],
                value,
            }]
        };
        let mut out = vec![
            Sampled {
                name: "queue_depth",
                help: "Messages waiting in each instance's queue",
                kind: SampledKind::Gauge,
                samples: per_instance(&|q| q.depth as f64),
            },
            Sampled {
                name: "queue_capacity",
                help: "The bound of each instance's queue (#threads[1])",
                kind: SampledKind::Gauge,
                samples: per_instance(&|q| q.capacity as f64),
            },
            Sampled {
                name: "messages_dropped",
                help: "Messages refused because the instance's queue was full",
                kind: SampledKind::Counter,
                samples: per_instance(&|q| q.dropped as f64),
            },
            Sampled {
                name: "requests_in_flight",
                help: "Client requests and messages being handled now",
                kind: SampledKind::Gauge,
                samples: one(self.inflight.load(Ordering::Relaxed) as f64),
            },
            Sampled {
                name: "uptime_seconds",
                help: "Seconds since the node started",
                kind: SampledKind::Gauge,
                samples: one(self.started.elapsed().as_secs_f64()),
            },
            Sampled {
                name: "script_generation",
                help: "Changes of .lua files seen in the home (the hot-reload generation)",
                kind: SampledKind::Counter,
                samples: one(self.generation.load(Ordering::Relaxed) as f64),
            },
        ];
        if let Some(c) = &self.cluster {
            let members = c.engine.members();
            let count = |st: crate::cluster::State| members.iter().filter(|m| m.1 == st).count() as f64;
            out.push(Sampled {
                name: "cluster_members",
                help: "Cluster members this node knows, itself included, by state",
                kind: SampledKind::Gauge,
                samples: [
                    crate::cluster::State::Alive,
                    crate::cluster::State::Suspect,
                    crate::cluster::State::Down,
                ]
                .into_iter()
                .map(|st| Sample {
                    labels: vec![("state", st.name().to_string())],
                    value: count(st),
                })
                .collect(),
            });
            out.push(Sampled {
                name: "cluster_datagrams_rejected",
                help: "Cluster datagrams refused, by reason",
                kind: SampledKind::Counter,
                samples: crate::cluster::auth::Reject::ALL
                    .iter()
                    .map(|r| Sample {
                        labels: vec![("reason", r.name().to_string())],
                        value: c.engine.rejected(*r) as f64,
                    })
                    .collect(),
            });
        }
        out
    }
}

/// One request or message in flight (`NodeShared::in_flight`).
pub struct InFlight(Arc<NodeShared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The cluster's way into this node's router: messages other nodes routed here are
/// delivered to local instances only (never forwarded again).
struct RouterSink(std::sync::Weak<NodeShared>);

impl crate::cluster::Sink for RouterSink {
    fn one(&self, stage: &str, msg: crate::router::Message) -> Result<(), crate::router::Message> {
        match self.0.upgrade() {
            Some(n) => n.router.deliver_here(stage, msg).map_err(|u| u.into_message()),
            None => Err(msg),
        }
    }
    fn all(&self, stage: &str, msg: &crate::router::Message) -> usize {
        self.0
            .upgrade()
            .map_or(0, |n| n.router.deliver_here_all(stage, msg))
    }
    fn to(&self, instance: usize, msg: crate::router::Message) -> Result<(), crate::router::Message> {
        match self.0.upgrade() {
            Some(n) => n.router.send_to(instance, msg).map_err(|u| u.into_message()),
            None => Err(msg),
        }
    }
    fn lock(
        &self,
        op: crate::router::LockOp,
        name: &str,
        cb: &str,
        from: Arc<crate::router::SenderInfo>,
        values: Vec<crate::value::Value>,
    ) {
        if let Some(n) = self.0.upgrade() {
            n.router.lock_here(op, name, cb, from, values);
        }
    }
    fn admin(&self, from: &str, body: Vec<u8>, reply: crate::cluster::AdminReply) {
        let Some(n) = self.0.upgrade() else { return };
        let from = from.to_string();
        // A stop waits for the instance's thread: not on the cluster's socket thread.
        let spawned = std::thread::Builder::new()
            .name("admin-remote".into())
            .spawn(move || {
                let (status, body) = match serde_json::from_slice::<serde_json::Value>(&body) {
                    Ok(req) => crate::admin::instances::run_op(&n, &req, &format!("member {from}")),
                    Err(e) => (
                        400,
                        serde_json::json!({"error": format!("admin request is not JSON: {e}")}),
                    ),
                };
                reply(
                    serde_json::json!({"status": status, "body": body})
                        .to_string()
                        .into_bytes(),
                );
            });
        if let Err(e) = spawned {
            log::warn!("cluster: cannot serve an admin request: {e}");
        }
    }
    fn local(&self) -> Vec<crate::cluster::StageLoad> {
        self.0.upgrade().map_or_else(Vec::new, |n| {
            n.router
                .load()
                .into_iter()
                .map(|(stage, instances, load)| crate::cluster::StageLoad {
                    stage,
                    instances: instances as u32,
                    load,
                })
                .collect()
        })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Watches the home for changed `.lua` files and moves `generation` on each change.
pub(crate) fn watch(root: &Path, generation: Arc<AtomicU64>) -> notify::Result<notify::RecommendedWatcher> {
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if ev.paths.iter().any(|p| p.extension().is_some_and(|e| e == "lua")) {
                generation.fetch_add(1, Ordering::AcqRel);
            }
        }
    })?;
    w.watch(root, notify::RecursiveMode::Recursive)?;
    Ok(w)
}

/// Loads the home's configuration and search path; errors are for people.
pub fn open_home(root: &Path) -> anyhow::Result<(PathBuf, Config, Home)> {
    let root = root
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("stage home {}: {e}", root.display()))?;
    let config =
        Config::load(&root.join("conf/stage.json")).map_err(|e| anyhow::anyhow!("conf/stage.json: {e}"))?;
    let home = Home::new(&root, &config.lua.package)
        .map_err(|e| anyhow::anyhow!("conf/stage.json: lua.%package: {e}"))?;
    // Sections that belong to a client are checked here too, so a mistake stops the node at
    // start with the key named, instead of failing every instance's Lua state.
    crate::cloud::vultr::Settings::from_config(config.vultr.as_ref())
        .map_err(|e| anyhow::anyhow!("conf/stage.json: {}", config.redact(&e.to_string())))?;
    crate::cluster::ClusterConfig::parse(
        &config.cluster,
        &config.cluster_key,
        config.cluster_insecure,
        config.router_sync_ms,
        &crate::net::sock::interfaces(),
    )
    .map_err(|e| anyhow::anyhow!("conf/stage.json: {}", config.redact(&e.to_string())))?;
    for b in &config.builtins {
        crate::stages::new(b).map_err(|e| anyhow::anyhow!("conf/stage.json: {e}"))?;
    }
    Ok((root, config, home))
}
