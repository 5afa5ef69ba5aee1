//! One stage instance: an OS thread with a current-thread tokio runtime, a `LocalSet` and
//! one Lua state. Everything the instance's scripts register (timers, submitted work,
//! sockets and message handlers) runs here, one callback at a time, each callback
//! in its own coroutine so that it may yield.

use crate::config::InstanceSpec;
use crate::host::callback::{call_callback, install_runner};
use crate::host::context::{ctx, InstanceCtx};
use crate::host::node::NodeShared;
use crate::host::script_error;
use crate::host::tasks::rerun_after;
use crate::host::Bindings;
use mlua::{Lua, LuaOptions, StdLib, Value};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use tokio::task::{spawn_local, LocalSet};

/// Finished coroutines kept for reuse per instance.
const THREAD_POOL: usize = 128;

/// Creates the Lua state of an instance with every stage module registered.
fn new_state(
    node: &Arc<NodeShared>,
    spec: &InstanceSpec,
    number: usize,
    bindings: &Bindings,
) -> mlua::Result<Lua> {
    let time = std::time::Duration::from_millis(node.config.limits.time_ms);
    state_with(node, &spec.stage_id, number, bindings, time)
}

/// A full stage state for a `thread.new` worker acting for instance `number`: every module,
/// the memory budget, no time slice (a thread body is there to do long, blocking work).
/// The caller runs the preloads (`run_preloads`) inside its runtime.
pub fn new_worker_state(
    node: &Arc<NodeShared>,
    stage_id: &str,
    number: usize,
    bindings: &Bindings,
) -> mlua::Result<Lua> {
    state_with(node, stage_id, number, bindings, std::time::Duration::ZERO)
}

fn state_with(
    node: &Arc<NodeShared>,
    stage_id: &str,
    number: usize,
    bindings: &Bindings,
    time: std::time::Duration,
) -> mlua::Result<Lua> {
    // The debug library is loaded on purpose: tracebacks and tools such as StackTracePlus need it.
    // Coroutines of finished callbacks (message handlers, `stage.submit`, ...) are reset
    // and reused instead of being created and collected per call (`scripts/bench messages`).
    let options = LuaOptions::new().thread_pool_size(THREAD_POOL);
    let lua = unsafe { Lua::unsafe_new_with(StdLib::ALL, options) };
    // Every async call (stage.request, stage.sleep, ...) leaves a small userdata with a
    // finalizer that owns its Rust future. The default incremental collector falls behind
    // such garbage under load (hundreds of MB after 10^5 requests, `scripts/bench messages`);
    // the generational one keeps memory flat. Served frames leave short-lived tables that
    // young collections reclaim cheaply too (`scripts/bench echo`: ~10% less CPU per message).
    lua.gc_gen(0, 0);
    let limits = &node.config.limits;
    crate::host::budget::install(&lua, limits.memory, time)?;
    let ctx = Rc::new(InstanceCtx::new(node, stage_id, number));
    lua.set_app_data(ctx);
    install_runner(&lua)?;
    (bindings.register)(&lua)?;
    let package: mlua::Table = lua.globals().get("package")?;
    package.set("path", node.home.lua_package_path())?;
    package.set("cpath", "")?;
    Ok(lua)
}

/// Runs the preload scripts (`%preload`, see `home::preload_files`) in order.
pub async fn run_preloads(lua: &Lua) {
    let c = ctx(lua);
    let (preloads, problems) = crate::home::preload_files(&c.node.home.root, &c.node.config.lua.preload);
    for p in problems {
        log::error!(target: &c.name, "{p}");
    }
    for p in preloads {
        match c.loader.compile(lua, &p) {
            Ok(f) => {
                call_callback(lua, &format!("preload {}", c.loader.display_path(&p)), &f, ()).await;
            }
            Err(e) => log::error!(target: &c.name, "preload script failed to compile: {e}"),
        }
    }
}

/// Runs the preload scripts, then the entry script; an entry script that
/// returns a function makes it the idle function.
async fn boot(lua: Lua, entry: String) {
    run_preloads(&lua).await;
    let c = ctx(&lua);
    let loaded = match c.loader.load(&lua, &entry, true).await {
        Ok(l) => l,
        Err(e) => {
            log::warn!(target: &c.name, "entry script: {e}");
            return;
        }
    };
    log::info!(target: &c.name, "started {} (entry {})", c.name, c.loader.display_path(&loaded.path));
    if let Value::Table(t) = &loaded.value {
        // As in STAGE: every function of a table returned by the entry script handles the
        // message named by its key.
        if let Err(e) = register_handlers(&lua, t) {
            log::error!(target: &c.name, "entry script: {}", script_error::format(&e));
        }
    }
    if let Value::Function(idle) = loaded.value {
        loop {
            let rets = call_callback(&lua, "idle function", &idle, ()).await;
            match rerun_after(&lua, "idle function", &rets) {
                Some(d) => tokio::time::sleep(d).await,
                None => break,
            }
        }
    }
}

/// Reloads the instance's scripts whenever a deploy asks (`host::reload`) and answers
/// with the failures; the instance stops taking part when its thread ends.
async fn reload_when_asked(lua: Lua, entry: String) {
    struct Leave(Arc<NodeShared>, String);
    impl Drop for Leave {
        fn drop(&mut self) {
            self.0.reloads.leave(&self.1);
        }
    }
    let c = ctx(&lua);
    let mut asked = c.node.reloads.join(&c.name);
    let _leave = Leave(c.node.clone(), c.name.clone());
    while asked.changed().await.is_ok() {
        let seq = *asked.borrow_and_update();
        let errors = c.loader.reload_all(&lua, &entry).await;
        c.node.reloads.report(&c.name, seq, errors);
    }
}

/// `stage.waitfor(key, f)` for every string key of `t` whose value is a function.
fn register_handlers(lua: &Lua, t: &mlua::Table) -> mlua::Result<()> {
    let waitfor: mlua::Function = lua.globals().get::<mlua::Table>("stage")?.get("waitfor")?;
    for pair in t.pairs::<Value, Value>() {
        if let (Value::String(k), Value::Function(f)) = pair? {
            waitfor.call::<()>((k, f))?;
        }
    }
    Ok(())
}

/// What ends one Lua state of an instance thread.
enum Next {
    /// A new state on the same mailbox; the sender hears once it runs.
    Reload(std::sync::mpsc::Sender<()>),
    /// The thread ends (the node stops, a stop command with its answer, or no state).
    Stop(Option<std::sync::mpsc::Sender<crate::router::Drained>>),
}

/// Starts an instance on its own thread; it runs until the node's shutdown signal or a
/// `Stop` command, and boots a new Lua state on each `Reload` command (`host::control`).
pub fn spawn(
    node: Arc<NodeShared>,
    spec: InstanceSpec,
    number: usize,
    bindings: Bindings,
    mut commands: crate::host::control::Commands,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    use crate::host::control::Cmd;
    let name = format!("{}#{}", spec.stage_id, number);
    std::thread::Builder::new().name(name.clone()).spawn(move || {
        // Messages to other nodes wait for the thread to go idle and leave in one datagram
        // per node (docs/cluster.md, batching).
        crate::cluster::defer_sends();
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(crate::cluster::flush_deferred)
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                log::error!("{name}: cannot start its runtime: {e}");
                return;
            }
        };
        let mut shutdown = node.shutdown.subscribe();
        let me = node.router.sender(number);
        let inbox = node.router.take_inbox(number).map(|i| Rc::new(RefCell::new(i)));
        let mut reloaded: Option<std::sync::mpsc::Sender<()>> = None;
        let done = loop {
            let local = LocalSet::new();
            let next = local.block_on(&rt, async {
                let lua = match new_state(&node, &spec, number, &bindings) {
                    Ok(lua) => lua,
                    Err(e) => {
                        log::error!(
                            "{name}: cannot create its Lua state: {}",
                            script_error::format(&e)
                        );
                        return Next::Stop(None);
                    }
                };
                spawn_local(boot(lua.clone(), spec.entry.clone()));
                spawn_local(reload_when_asked(lua.clone(), spec.entry.clone()));
                // Spawned after boot, messages are served once boot has run up to its first
                // yield: handlers registered at the top of the entry script are in place.
                if let Some(inbox) = inbox.clone() {
                    spawn_local((bindings.serve)(lua, inbox));
                }
                if let Some(ack) = reloaded.take() {
                    tokio::task::yield_now().await;
                    let _ = ack.send(());
                }
                tokio::select! {
                    _ = shutdown.wait_for(|stop| *stop) => Next::Stop(None),
                    cmd = commands.recv() => match cmd {
                        Some(Cmd::Reload(ack)) => Next::Reload(ack),
                        Some(Cmd::Stop(ack)) => Next::Stop(Some(ack)),
                        None => Next::Stop(None),
                    },
                }
            });
            // Dropping the LocalSet drops every pending timer and coroutine of the instance,
            // and with them its Lua state.
            drop(local);
            match next {
                Next::Reload(ack) => {
                    log::info!("{name}: reloading: a new Lua state runs the entry script again");
                    reloaded = Some(ack);
                }
                Next::Stop(ack) => break ack,
            }
        };
        log::debug!("{name}: stopping");
        // The serving task is gone with the LocalSet: answer what is still queued.
        let drained = match inbox {
            Some(inbox) => node.router.drain_as(&mut inbox.borrow_mut(), &me),
            None => crate::router::Drained::default(),
        };
        if let Some(ack) = done {
            let _ = ack.send(drained);
        }
    })
}
