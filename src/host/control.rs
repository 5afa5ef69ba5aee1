//! Lua instances started, stopped and reloaded while the node runs (the admin API's
//! `POST /stages/{stage}/instances`, `DELETE /instances/{id}`, `PUT /instances/{id}`, also
//! asked by other members through the cluster). Every Lua instance of the node, the
//! `#startup` ones included, is started here and keeps a command channel: `Reload` makes
//! its thread drop the Lua state and boot a new one on the same mailbox, `Stop` makes it
//! drop the state and answer what is still queued (`Router::drain_as`).
//!
//! A stop takes the instance out of the router first, so nothing new reaches it; what was
//! queued before is then answered "shutting down" (requests) or dropped and counted
//! (signals). Numbers are never reused (`Router::add`): an answer addressed to a stopped
//! instance finds no route and is dropped.

use crate::config::InstanceSpec;
use crate::host::node::NodeShared;
use crate::host::Bindings;
use crate::router::Drained;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Instances started in one request at most.
pub const MAX_COUNT: usize = 64;

/// What an instance's thread is asked to do.
pub enum Cmd {
    /// Drop the Lua state and boot a new one (entry script and preloads run again) on the
    /// same mailbox; the sender hears once the new state runs.
    Reload(std::sync::mpsc::Sender<()>),
    /// Drop the Lua state, answer the queue and end the thread; the sender hears what was
    /// drained.
    Stop(std::sync::mpsc::Sender<Drained>),
}

/// The command channel an instance's thread listens on.
pub type Commands = UnboundedReceiver<Cmd>;

/// Why an instance could not be started, stopped or reloaded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ControlError {
    #[error("no Lua stage \"{0}\" in this node's #startup (its Lua stages: {1}); only those can be started at run time")]
    UnknownStage(String, String),
    #[error("\"{0}\" is a built-in stage ({1}); only Lua stages of #startup can be started at run time")]
    BuiltinStage(String, String),
    #[error("no instance {0} on this node (GET /instances lists them)")]
    UnknownInstance(usize),
    #[error("instance {0} is the built-in stage \"{1}\"; only Lua instances can be stopped or reloaded at run time")]
    BuiltinInstance(usize, String),
    #[error("the node is stopping")]
    Stopping,
    #[error("instance {0} did not {1} within {2} s")]
    Timeout(usize, &'static str, u64),
    #[error("cannot start an instance thread: {0}")]
    Spawn(String),
}

impl ControlError {
    /// The HTTP status that goes with it.
    pub fn status(&self) -> u16 {
        match self {
            ControlError::UnknownStage(..) | ControlError::UnknownInstance(_) => 404,
            ControlError::BuiltinStage(..) | ControlError::BuiltinInstance(..) => 400,
            ControlError::Stopping => 503,
            ControlError::Timeout(..) => 504,
            ControlError::Spawn(_) => 500,
        }
    }
}

struct Running {
    stage: String,
    ctl: UnboundedSender<Cmd>,
    thread: Option<JoinHandle<()>>,
}

/// The Lua instances of a node and the way to start more.
pub struct Control {
    bindings: Bindings,
    running: Mutex<HashMap<usize, Running>>,
}

impl Control {
    pub fn new(bindings: Bindings) -> Control {
        Control {
            bindings,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Starts Lua instance `number` (already in the router) with `spec`.
    pub fn spawn(&self, node: &Arc<NodeShared>, spec: InstanceSpec, number: usize) -> std::io::Result<()> {
        let (tx, rx) = unbounded_channel();
        let stage = spec.stage_id.clone();
        let thread = crate::host::instance::spawn(node.clone(), spec, number, self.bindings, rx)?;
        self.running.lock().expect("instances").insert(
            number,
            Running {
                stage,
                ctl: tx,
                thread: Some(thread),
            },
        );
        Ok(())
    }

    /// Starts `count` more instances of Lua stage `stage` (as `#startup` declares it);
    /// returns their numbers.
    pub fn start(
        &self,
        node: &Arc<NodeShared>,
        stage: &str,
        count: usize,
    ) -> Result<Vec<usize>, ControlError> {
        if node.is_draining() {
            return Err(ControlError::Stopping);
        }
        let Some(spec) = node.config.startup.iter().find(|s| s.stage_id == stage).cloned() else {
            if let Some(b) = node.config.builtins.iter().find(|b| b.stage_id == stage) {
                return Err(ControlError::BuiltinStage(stage.to_string(), b.engine.clone()));
            }
            let mut known: Vec<&str> = vec![];
            for s in &node.config.startup {
                if !known.contains(&s.stage_id.as_str()) {
                    known.push(&s.stage_id);
                }
            }
            return Err(ControlError::UnknownStage(stage.to_string(), known.join(", ")));
        };
        let mut ids = vec![];
        for _ in 0..count.clamp(1, MAX_COUNT) {
            let id = node.router.add(stage);
            if let Err(e) = self.spawn(node, spec.clone(), id) {
                node.router.remove(id);
                log::error!("cannot start an instance of {stage}: {e}");
                if ids.is_empty() {
                    return Err(ControlError::Spawn(e.to_string()));
                }
                break;
            }
            ids.push(id);
        }
        Ok(ids)
    }

    fn command(&self, node: &NodeShared, number: usize, cmd: Cmd) -> Result<String, ControlError> {
        let running = self.running.lock().expect("instances");
        let Some(r) = running.get(&number) else {
            let lua = node.config.startup.len();
            if let Some(b) = number.checked_sub(lua).and_then(|k| node.config.builtins.get(k)) {
                return Err(ControlError::BuiltinInstance(number, b.stage_id.clone()));
            }
            return Err(ControlError::UnknownInstance(number));
        };
        if matches!(cmd, Cmd::Stop(_)) {
            // Out of the router first: nothing new reaches it from here on.
            node.router.remove(number);
        }
        // A thread that has ended (the node is stopping) drops the command: the caller's
        // receiver then hears nothing.
        let _ = r.ctl.send(cmd);
        Ok(r.stage.clone())
    }

    /// How long a stop or reload may take: the thread ends its current callback (at most
    /// `#limits.time`) and drops the state.
    fn patience(node: &NodeShared) -> Duration {
        Duration::from_millis(node.config.limits.time_ms).max(Duration::from_secs(1)) + Duration::from_secs(4)
    }

    /// Stops Lua instance `number`; returns its stage id and what its queue held.
    pub fn stop(&self, node: &NodeShared, number: usize) -> Result<(String, Drained), ControlError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stage = self.command(node, number, Cmd::Stop(tx))?;
        let wait = Self::patience(node);
        let drained = match rx.recv_timeout(wait) {
            Ok(d) => d,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return Err(ControlError::Timeout(number, "stop", wait.as_secs()))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Drained::default(),
        };
        let r = self.running.lock().expect("instances").remove(&number);
        if let Some(t) = r.and_then(|r| r.thread) {
            let _ = t.join();
        }
        node.metrics.forget_instance(&format!("{stage}#{number}"));
        log::info!("{stage}#{number}: stopped at run time");
        Ok((stage, drained))
    }

    /// Reloads Lua instance `number`: a new Lua state runs its preloads and entry script
    /// again, on the same mailbox (queued messages wait for it). Returns its stage id.
    pub fn reload(&self, node: &NodeShared, number: usize) -> Result<String, ControlError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stage = self.command(node, number, Cmd::Reload(tx))?;
        let wait = Self::patience(node);
        match rx.recv_timeout(wait) {
            Ok(()) => Ok(stage),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                Err(ControlError::Timeout(number, "reload", wait.as_secs()))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(ControlError::Stopping),
        }
    }

    /// The threads of every instance still running (the node joins them when it stops).
    pub fn take_threads(&self) -> Vec<JoinHandle<()>> {
        self.running
            .lock()
            .expect("instances")
            .values_mut()
            .filter_map(|r| r.thread.take())
            .collect()
    }
}
