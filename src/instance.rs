//! One stage instance: an OS thread with a current-thread tokio runtime, a `LocalSet` and
//! one Lua state. Everything the instance's scripts register (timers, submitted work and,
//! later, sockets and message handlers) runs here, one callback at a time, each callback
//! in its own coroutine so that it may yield.

use crate::config::InstanceSpec;
use crate::loader::Loader;
use crate::node::NodeShared;
use mlua::{Function, IntoLuaMulti, Lua, LuaOptions, MultiValue, StdLib, Value};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::{spawn_local, AbortHandle, LocalSet};

/// The state of one instance that Lua modules reach through `lua.app_data_ref`.
pub struct InstanceCtx {
    pub node: Arc<NodeShared>,
    pub stage_id: String,
    /// The instance number: its index among the Lua instances of `#startup`.
    pub number: usize,
    /// `stage_id#number`, used as the log target of `print` and `logger`.
    pub name: String,
    pub loader: Loader,
    tasks: RefCell<HashMap<i64, AbortHandle>>,
    next_task: Cell<i64>,
    /// Work queued per `stage.submit` key; a key present here has a drain task running.
    submits: RefCell<HashMap<String, VecDeque<(Function, MultiValue)>>>,
}

/// The instance context of a Lua state.
pub fn ctx(lua: &Lua) -> Rc<InstanceCtx> {
    lua.app_data_ref::<Rc<InstanceCtx>>()
        .expect("every Lua state of stage has an instance context")
        .clone()
}

const XPCALL_RUNNER: &str = "stage.xpcall";
const ERROR_HANDLER: &str = "stage.error_handler";
const RAW_XPCALL: &str = "stage.raw_xpcall";

/// `function(f, ...) return xpcall(f, error_handler, ...) end`, created once per state.
pub fn xpcall_runner(lua: &Lua) -> mlua::Result<Function> {
    lua.named_registry_value(XPCALL_RUNNER)
}

/// The message handler every callback runs under: the error as text (Rust errors
/// included) followed by the traceback, without the runner's own frames.
pub fn error_handler(lua: &Lua) -> mlua::Result<Function> {
    lua.named_registry_value(ERROR_HANDLER)
}

/// Lua's own `xpcall`, before the wrapper scripts see (which costs a closure per call);
/// for hot paths that pass `error_handler` themselves.
pub fn raw_xpcall(lua: &Lua) -> mlua::Result<Function> {
    lua.named_registry_value(RAW_XPCALL)
}

fn install_runner(lua: &Lua) -> mlua::Result<()> {
    // Errors raised by Rust functions reach Lua as userdata; `pcall` and `xpcall` hand
    // script authors their message as a string instead, as plain Lua would.
    let errmsg = lua.create_function(|lua, v: Value| match v {
        Value::Error(e) => lua
            .create_string(crate::script_error::message(&e))
            .map(Value::String),
        other => Ok(other),
    })?;
    let raw_xpcall_fn = lua.globals().get::<Function>("xpcall")?;
    let (runner, handler): (Function, Function) = lua
        .load(
            r#"
            local errmsg, raw_pcall, raw_xpcall = ...
            local traceback, tostring = debug.traceback, tostring
            local function fix(ok, ...)
                if ok then return ok, ... end
                return false, errmsg((...))
            end
            pcall = function(f, ...) return fix(raw_pcall(f, ...)) end
            xpcall = function(f, h, ...)
                return raw_xpcall(f, function(e) return h(errmsg(e)) end, ...)
            end
            local function handler(e)
                local msg = tostring(errmsg(e))
                if not msg:find("stack traceback:", 1, true) then msg = traceback(msg, 2) end
                -- The frames of the runner are noise to the script author.
                return (msg:gsub("\n%s*%[C%]: in %a+ 'xpcall'.*$", ""))
            end
            return function(f, ...) return raw_xpcall(f, handler, ...) end, handler
            "#,
        )
        .set_name("=stage")
        .call((
            errmsg,
            lua.globals().get::<Function>("pcall")?,
            raw_xpcall_fn.clone(),
        ))?;
    lua.set_named_registry_value(XPCALL_RUNNER, runner)?;
    lua.set_named_registry_value(ERROR_HANDLER, handler)?;
    lua.set_named_registry_value(RAW_XPCALL, raw_xpcall_fn)
}

/// Runs `f(args)` as a coroutine; on error, logs `what` with the message and traceback
/// and returns `None`. An error never propagates: it affects only this callback.
pub async fn call_callback(
    lua: &Lua,
    what: &str,
    f: &Function,
    args: impl IntoLuaMulti,
) -> Option<MultiValue> {
    let runner = match xpcall_runner(lua) {
        Ok(runner) => runner,
        Err(e) => {
            log::error!(target: &ctx(lua).name, "error in {what}: {}", crate::script_error::format(&e));
            return None;
        }
    };
    let mut all = args.into_lua_multi(lua).ok()?;
    all.push_front(Value::Function(f.clone()));
    run_callback(lua, what, &runner, all).await
}

/// `call_callback` for hot paths: `runner` is `xpcall_runner(lua)`, fetched once, and
/// `f_args` is the function followed by its arguments.
pub async fn run_callback(
    lua: &Lua,
    what: &str,
    runner: &Function,
    f_args: MultiValue,
) -> Option<MultiValue> {
    let result = runner.call_async::<MultiValue>(f_args).await;
    match result {
        Ok(mut rets) => match rets.pop_front() {
            Some(Value::Boolean(true)) => Some(rets),
            _ => {
                let msg = rets
                    .pop_front()
                    .and_then(|v| v.to_string().ok())
                    .unwrap_or_else(|| "unknown error".into());
                log::error!(target: &ctx(lua).name, "error in {what}: {msg}");
                None
            }
        },
        Err(e) => {
            log::error!(target: &ctx(lua).name, "error in {what}: {}", crate::script_error::format(&e));
            None
        }
    }
}

/// A positive number returned by a callback: "run me again after that many ms".
pub fn rerun_after(rets: &Option<MultiValue>) -> Option<Duration> {
    let ms = match rets.as_ref()?.front()? {
        Value::Integer(i) => *i as f64,
        Value::Number(n) => *n,
        _ => return None,
    };
    (ms > 0.0).then(|| Duration::from_secs_f64(ms / 1000.0))
}

/// Spawns `f(args)` as a callback on this instance.
pub fn spawn_callback(lua: &Lua, what: String, f: Function, args: MultiValue) {
    let lua = lua.clone();
    spawn_local(async move {
        call_callback(&lua, &what, &f, args).await;
    });
}

impl InstanceCtx {
    /// `stage.addtask`: runs `f(args)` after `delay`, again while it returns a positive number.
    pub fn add_task(&self, lua: &Lua, delay: Duration, f: Function, args: MultiValue) -> i64 {
        let id = self.next_task.get() + 1;
        self.next_task.set(id);
        let lua2 = lua.clone();
        let handle = spawn_local(async move {
            let mut delay = delay;
            loop {
                tokio::time::sleep(delay).await;
                let rets = call_callback(&lua2, "task", &f, args.clone()).await;
                match rerun_after(&rets) {
                    Some(d) => delay = d,
                    None => break,
                }
            }
            ctx(&lua2).tasks.borrow_mut().remove(&id);
        });
        self.tasks.borrow_mut().insert(id, handle.abort_handle());
        id
    }

    /// Cancels a task; returns whether it was still pending.
    pub fn cancel_task(&self, id: i64) -> bool {
        match self.tasks.borrow_mut().remove(&id) {
            Some(h) => {
                h.abort();
                true
            }
            None => false,
        }
    }

    /// `stage.submit`: calls with the same non-empty key run one after the other, in order.
    pub fn submit(&self, lua: &Lua, key: Option<String>, f: Function, args: MultiValue) {
        let Some(key) = key else {
            spawn_callback(lua, "submit".into(), f, args);
            return;
        };
        {
            let mut submits = self.submits.borrow_mut();
            if let Some(queue) = submits.get_mut(&key) {
                queue.push_back((f, args));
                return;
            }
            submits.insert(key.clone(), VecDeque::new());
        }
        let lua = lua.clone();
        spawn_local(async move {
            let (mut f, mut args) = (f, args);
            loop {
                let rets = call_callback(&lua, "submit", &f, args.clone()).await;
                if let Some(d) = rerun_after(&rets) {
                    tokio::time::sleep(d).await;
                    continue;
                }
                let next = {
                    let ctx = ctx(&lua);
                    let mut submits = ctx.submits.borrow_mut();
                    let next = submits.get_mut(&key).and_then(|q| q.pop_front());
                    if next.is_none() {
                        submits.remove(&key);
                    }
                    next
                };
                match next {
                    Some((nf, na)) => (f, args) = (nf, na),
                    None => break,
                }
            }
        });
    }
}

/// Finished coroutines kept for reuse per instance.
const THREAD_POOL: usize = 128;

/// Creates the Lua state of an instance with every stage module registered.
fn new_state(node: &Arc<NodeShared>, spec: &InstanceSpec, number: usize) -> mlua::Result<Lua> {
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
    let ctx = Rc::new(InstanceCtx {
        node: node.clone(),
        stage_id: spec.stage_id.clone(),
        number,
        name: format!("{}#{}", spec.stage_id, number),
        loader: Loader::new(node.home.clone(), node.generation.clone()),
        tasks: RefCell::new(HashMap::new()),
        next_task: Cell::new(0),
        submits: RefCell::new(HashMap::new()),
    });
    lua.set_app_data(ctx);
    install_runner(&lua)?;
    crate::lua::register_all(&lua)?;
    let package: mlua::Table = lua.globals().get("package")?;
    package.set("path", node.home.lua_package_path())?;
    package.set("cpath", "")?;
    Ok(lua)
}

/// Runs the preload scripts in name order, then the entry script; an entry script that
/// returns a function makes it the idle function.
async fn boot(lua: Lua, entry: String) {
    let c = ctx(&lua);
    let preload_dir = c.node.home.root.join(&c.node.config.lua.preload);
    let mut preloads: Vec<_> = std::fs::read_dir(&preload_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "lua"))
                .collect()
        })
        .unwrap_or_default();
    preloads.sort();
    for p in preloads {
        match c.loader.compile(&lua, &p) {
            Ok(f) => {
                call_callback(&lua, &format!("preload {}", c.loader.display_path(&p)), &f, ()).await;
            }
            Err(e) => log::error!(target: &c.name, "preload script failed to compile: {e}"),
        }
    }
    let loaded = match c.loader.load(&lua, &entry, true).await {
        Ok(l) => l,
        Err(e) => {
            log::warn!(target: &c.name, "entry script: {e}");
            return;
        }
    };
    log::info!(target: &c.name, "started {} (entry {})", c.name, c.loader.display_path(&loaded.path));
    if let Value::Function(idle) = loaded.value {
        loop {
            let rets = call_callback(&lua, "idle function", &idle, ()).await;
            match rerun_after(&rets) {
                Some(d) => tokio::time::sleep(d).await,
                None => break,
            }
        }
    }
}

/// Starts an instance on its own thread; it runs until the node's shutdown signal.
pub fn spawn(
    node: Arc<NodeShared>,
    spec: InstanceSpec,
    number: usize,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let name = format!("{}#{}", spec.stage_id, number);
    std::thread::Builder::new().name(name.clone()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                log::error!("{name}: cannot start its runtime: {e}");
                return;
            }
        };
        let mut shutdown = node.shutdown.subscribe();
        let inbox = node.router.take_inbox(number).map(|i| Rc::new(RefCell::new(i)));
        let local = LocalSet::new();
        local.block_on(&rt, async {
            let lua = match new_state(&node, &spec, number) {
                Ok(lua) => lua,
                Err(e) => {
                    log::error!(
                        "{name}: cannot create its Lua state: {}",
                        crate::script_error::format(&e)
                    );
                    return;
                }
            };
            spawn_local(boot(lua.clone(), spec.entry.clone()));
            // Spawned after boot, messages are served once boot has run up to its first
            // yield: handlers registered at the top of the entry script are in place.
            if let Some(inbox) = inbox.clone() {
                spawn_local(crate::lua::messages::serve(lua, inbox));
            }
            let _ = shutdown.wait_for(|stop| *stop).await;
            log::debug!("{name}: stopping");
        });
        // Dropping the LocalSet here drops every pending timer and coroutine of the instance.
        drop(local);
        // The serving task is gone with the LocalSet: answer what is still queued.
        if let Some(inbox) = inbox {
            node.router.drain(&mut inbox.borrow_mut(), number);
        }
    })
}
