//! Starting and stopping a node in-process: `start` boots the instances of `#startup` and
//! returns a `NodeHandle`; `stop(code)` asks every instance to stop and `join()` waits for
//! them. Signals are the caller's business (`main.rs`), so tests and benchmarks can run a
//! whole node without a process of its own.

use crate::host::node::{open_home, watch, NodeShared};
use crate::host::Bindings;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long `join` waits for the instance threads once they were told to stop (a callback
/// interrupted by the time budget ends within `#limits.time`).
const STOP_GRACE: Duration = Duration::from_secs(4);

/// The exit status of a node that stopped without answering everything in flight.
pub const EXIT_NOT_DRAINED: i32 = 3;

/// A running node: its shared state, instance threads and home watcher.
pub struct NodeHandle {
    node: Arc<NodeShared>,
    threads: Vec<JoinHandle<()>>,
    _watcher: Option<notify::RecommendedWatcher>,
    /// The `#metrics` endpoint, stopped with the node.
    metrics: Option<crate::net::http::ServerThread>,
    /// The `#admin` API, stopped with the node.
    admin: Option<crate::net::http::ServerThread>,
}

/// Opens the home at `root`, makes it the working directory, and starts every instance of
/// `#startup` with `bindings` registered in its Lua state.
pub fn start(root: &Path, args: Vec<String>, bindings: Bindings) -> anyhow::Result<NodeHandle> {
    let (root, config, home) = open_home(root)?;
    std::env::set_current_dir(&root)?;
    raise_open_files_limit();
    crate::db::use_home_odbcinst(&root);
    for w in &config.warnings {
        log::warn!("{w}");
    }
    let node = NodeShared::new(config, home, args)?;
    // Bound before the instances start: a taken `#metrics` port stops the node at once.
    let metrics = match &node.config.metrics {
        Some(addr) => Some(crate::metrics::serve::spawn(addr, node.metrics.clone())?),
        None => None,
    };
    let admin = crate::admin::spawn(&node, crate::host::loader::syntax_check)?;
    // A home with load balancers gets them back (restored and supervised) before any
    // script asks; `lb` in a script finds this controller.
    match crate::cloud::lb::Controller::of_home(&node.home.root, node.config.lua.odbc.get("LB")) {
        Ok(Some(c)) => c.enable_remote_from(node.config.vultr.as_ref()),
        Ok(None) => {}
        Err(e) => log::error!(target: "lb", "cannot restore the load balancers: {e}"),
    }
    let watcher = match watch(&root, node.generation.clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            log::warn!("hot reload is off: cannot watch {}: {e}", root.display());
            None
        }
    };
    let mut threads = vec![];
    let control = node
        .control
        .get_or_init(|| crate::host::control::Control::new(bindings));
    for (number, spec) in node.config.startup.iter().enumerate() {
        control.spawn(&node, spec.clone(), number)?;
    }
    let lua_instances = node.config.startup.len();
    for (k, spec) in node.config.builtins.iter().enumerate() {
        threads.push(spawn_builtin(node.clone(), spec.clone(), lua_instances + k)?);
    }
    spawn_usage(&node);
    log::info!(
        "READY {}: {} instance(s) in {}",
        std::process::id(),
        node.config.startup.len() + threads.len(),
        root.display()
    );
    Ok(NodeHandle {
        node,
        threads,
        _watcher: watcher,
        metrics,
        admin,
    })
}

/// Starts built-in stage `spec` (router member `number`) on its own thread.
fn spawn_builtin(
    node: Arc<NodeShared>,
    spec: crate::config::BuiltinSpec,
    number: usize,
) -> anyhow::Result<JoinHandle<()>> {
    let stage = crate::stages::new(&spec).map_err(|e| anyhow::anyhow!("conf/stage.json: {e}"))?;
    let name = format!("{}#{number}", spec.stage_id);
    let inbox = node
        .router
        .take_inbox(number)
        .ok_or_else(|| anyhow::anyhow!("{name}: no mailbox"))?;
    Ok(std::thread::Builder::new().name(name.clone()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                log::error!("{name}: cannot start its runtime: {e}");
                return;
            }
        };
        log::info!("started {name} (built-in {})", spec.engine);
        let stop = node.shutdown.subscribe();
        rt.block_on(crate::stages::serve(
            node.router.clone(),
            number,
            inbox,
            stage,
            stop,
        ));
    })?)
}

/// Raises the soft limit of open files to the hard limit: every client is a descriptor, and
/// the soft default (often 1024) is far below what a node serves. Returns (before, after).
pub fn raise_open_files_limit() -> Option<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            log::info!("open files limit raised from {before} to {}", lim.rlim_max);
            return Some((before, lim.rlim_max));
        }
        log::warn!(
            "open files limit stays at {before}: cannot raise it to {}: {}",
            lim.rlim_max,
            std::io::Error::last_os_error()
        );
    }
    Some((before, before))
}

/// Logs the USAGE line every `#usage` seconds until the node stops.
fn spawn_usage(node: &Arc<NodeShared>) {
    let every = node.config.usage_secs;
    if every == 0 {
        return;
    }
    let mut stop = node.shutdown.subscribe();
    let spawned = std::thread::Builder::new().name("usage".into()).spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let mut tick = tokio::time::interval(Duration::from_secs(every));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => log::warn!("{}", crate::usage::line()),
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        });
    });
    if let Err(e) = spawned {
        log::warn!("USAGE line is off: cannot start its thread: {e}");
    }
}

impl NodeHandle {
    /// What the instances share.
    pub fn node(&self) -> &Arc<NodeShared> {
        &self.node
    }

    /// Asks every instance to stop, with `code` as the node's exit status.
    pub fn stop(&self, code: i32) {
        self.node.request_stop(code);
    }

    /// Waits until something asks the node to stop (`stop`, `process.exit`, a signal
    /// handler calling `NodeShared::shutdown`).
    pub async fn stopped(&self) {
        let mut rx = self.node.shutdown.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Drains the node (unless a script already stopped it): listeners stop accepting and
    /// what is in flight is answered, for at most `#limits.grace`. Then stops the
    /// instances, waits for them (at most `STOP_GRACE`), and returns the exit status:
    /// the script's code, or `EXIT_NOT_DRAINED` when requests were still in flight or an
    /// instance did not stop.
    pub fn join(mut self) -> i32 {
        let mut clean = true;
        if !*self.node.shutdown.borrow() {
            self.node.draining.send_replace(true);
            let grace = Duration::from_millis(self.node.config.limits.grace_ms);
            let deadline = Instant::now() + grace;
            while self.node.inflight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let left = self.node.inflight.load(Ordering::Acquire);
            if left > 0 {
                clean = false;
                log::warn!(
                    "{left} request(s) still in flight after the grace of {} ms (#limits.grace); closing them",
                    grace.as_millis()
                );
            }
        }
        self.node.shutdown.send_replace(true);
        for mut t in [self.metrics.take(), self.admin.take()].into_iter().flatten() {
            t.stop();
        }
        // Others see this node leave at once instead of after failure detection.
        if let Some(c) = &self.node.cluster {
            c.engine.leave();
        }
        let deadline = Instant::now() + STOP_GRACE;
        let lua = self
            .node
            .control
            .get()
            .map(|c| c.take_threads())
            .unwrap_or_default();
        for t in lua.into_iter().chain(self.threads) {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                clean = false;
                log::warn!(
                    "an instance did not stop within {} s; exiting anyway",
                    STOP_GRACE.as_secs()
                );
            }
        }
        match self.node.exit_code.load(Ordering::SeqCst) {
            0 if !clean => EXIT_NOT_DRAINED,
            code => code,
        }
    }
}
