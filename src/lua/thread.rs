//! The `thread` module: `thread.new(f, ...)` runs `f` on the blocking-work pool (worker
//! threads with their own, reused Lua states) and `.waitfor(cb)` receives its results in the
//! calling instance; `thread.signal(v)` inside `f` sends early values. Also `_SANDBOX`,
//! the globals shared by every instance of the process.

use crate::host::convert::IntoLuaErr;
use crate::host::workers::Pool;
use crate::host::{call_callback, ctx};
use crate::lua::value;
use crate::value::Value as Sent;
use mlua::{Function, Lua, MultiValue, Table, Value};
use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::rc::Rc;
use tokio::sync::mpsc;

/// What a running job sends back to the instance that started it.
enum Event {
    Signal(Vec<Sent>),
    Done(Result<Vec<Sent>, String>),
}

struct Job {
    code: Vec<u8>,
    args: Vec<Sent>,
    events: mpsc::Sender<Event>,
    node: std::sync::Arc<crate::host::NodeShared>,
    /// The instance that started the job: the worker's state acts for it.
    stage_id: String,
    number: usize,
    /// The caller's `*NAME` globals, declared in the worker's state too.
    shared: Vec<String>,
}

/// A worker thread's runtime and its full stage states, one per calling instance, created
/// on first use and reused for the next jobs.
struct Worker {
    rt: tokio::runtime::Runtime,
    local: tokio::task::LocalSet,
    states: std::collections::HashMap<usize, Lua>,
}

thread_local! {
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

/// The job whose function runs on this worker's state now (for `thread.signal`).
struct CurrentJob(RefCell<Option<mpsc::Sender<Event>>>);

/// Runs one `thread.new` job on the calling worker thread.
fn run_on_worker(job: Job) {
    let events = job.events.clone();
    let result = WORKER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("thread.new: cannot start a worker runtime: {e}"))?;
            *slot = Some(Worker {
                rt,
                local: tokio::task::LocalSet::new(),
                states: Default::default(),
            });
        }
        let w = slot.as_mut().expect("worker");
        let lua = match w.states.get(&job.number) {
            Some(l) => l.clone(),
            None => {
                let lua = worker_state(&job).map_err(|e| crate::host::script_error::format(&e))?;
                w.local.block_on(&w.rt, crate::host::instance::run_preloads(&lua));
                w.states.insert(job.number, lua.clone());
                lua
            }
        };
        *lua.app_data_ref::<CurrentJob>()
            .expect("worker job")
            .0
            .borrow_mut() = Some(events.clone());
        let result = w.local.block_on(&w.rt, run_job(&lua, &job));
        *lua.app_data_ref::<CurrentJob>()
            .expect("worker job")
            .0
            .borrow_mut() = None;
        result
    });
    if let Err(e) = &result {
        log::error!(target: "thread", "error in thread.new function: {e}");
    }
    let _ = events.blocking_send(Event::Done(result));
}

async fn run_job(lua: &Lua, job: &Job) -> Result<Vec<Sent>, String> {
    let fmt = |e: mlua::Error| crate::host::script_error::format(&e);
    if !job.shared.is_empty() {
        let sandbox: Table = lua.globals().get("_SANDBOX").map_err(fmt)?;
        let names: Vec<String> = job.shared.iter().map(|n| format!("*{n}")).collect();
        sandbox.set("", names).map_err(fmt)?;
    }
    let f = match value::to_lua(lua, &Sent::Function(job.code.clone())) {
        Ok(Value::Function(f)) => f,
        Ok(_) => return Err("thread.new: not a function".into()),
        Err(e) => return Err(fmt(e)),
    };
    let args = value::to_lua_multi(lua, &job.args).map_err(fmt)?;
    let rets: MultiValue = f.call_async(args).await.map_err(fmt)?;
    value::from_lua_multi(lua, rets, "return", 1).map_err(|e| e.to_string())
}

/// A worker's Lua state: a full stage state acting for the calling instance (every module,
/// the preloads), whose `thread.signal` sends to the job that runs.
fn worker_state(job: &Job) -> mlua::Result<Lua> {
    let lua = crate::host::instance::new_worker_state(
        &job.node,
        &job.stage_id,
        job.number,
        &crate::lua::bindings(),
    )?;
    lua.set_app_data(CurrentJob(RefCell::new(None)));
    let t: Table = lua.globals().get("thread")?;
    t.set(
        "signal",
        lua.create_async_function(|lua, args: MultiValue| async move {
            let values = value::from_lua_multi(&lua, args, "arg", 1).lua_err_in("thread.signal")?;
            let tx = lua
                .app_data_ref::<CurrentJob>()
                .and_then(|j| j.0.borrow().clone());
            match tx {
                // Waits while the caller's queue of early values is full.
                Some(tx) => Ok(tx.send(Event::Signal(values)).await.is_ok()),
                None => Ok(false),
            }
        })?,
    )?;
    Ok(lua)
}

/// The calling instance's side of one job: callback, and events not yet delivered.
struct Handle {
    cb: RefCell<Option<Function>>,
    pending: RefCell<VecDeque<Event>>,
    pumping: std::cell::Cell<bool>,
    /// Set by `waitfor(nil)`: the job's values are dropped.
    dropped: std::cell::Cell<bool>,
}

/// Delivers pending events to the callback, one at a time and in order.
fn pump(lua: &Lua, h: &Rc<Handle>) {
    if h.pumping.get() || h.cb.borrow().is_none() || h.pending.borrow().is_empty() {
        return;
    }
    h.pumping.set(true);
    let (lua, h) = (lua.clone(), h.clone());
    tokio::task::spawn_local(async move {
        loop {
            let Some(ev) = h.pending.borrow_mut().pop_front() else {
                break;
            };
            let Some(cb) = h.cb.borrow().clone() else { break };
            let args = match ev {
                Event::Signal(v) | Event::Done(Ok(v)) => value::to_lua_multi(&lua, &v),
                Event::Done(Err(msg)) => lua
                    .create_string(&msg)
                    .map(|s| MultiValue::from_iter([Value::Nil, Value::String(s)])),
            };
            match args {
                Ok(args) => {
                    call_callback(&lua, "thread waitfor callback", &cb, args).await;
                }
                Err(e) => log::error!(target: &ctx(&lua).name, "thread.new result: {e}"),
            }
        }
        h.pumping.set(false);
    });
}

pub fn open(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("new", lua.create_function(new)?)?;
    // STAGE's thread.id: the OS id of the thread running this state.
    t.set("id", unsafe { libc::gettid() } as i64)?;
    let meta = lua.create_table()?;
    meta.set(
        "__index",
        lua.create_function(|_, (_, k): (Table, String)| {
            Ok(match k.as_str() {
                // STAGE's thread.tick: wall-clock seconds, milliseconds as the fraction.
                "tick" => Some(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as f64 / 1000.0)
                        .unwrap_or(0.0),
                ),
                _ => None,
            })
        })?,
    )?;
    t.set_metatable(Some(meta))?;
    t.set(
        "signal",
        lua.create_function(|_, _: MultiValue| -> mlua::Result<()> {
            Err(mlua::Error::runtime(
                "thread.signal: only a function run by thread.new can signal",
            ))
        })?,
    )?;
    Ok(t)
}

/// `thread.new(f, ...)` → an object whose `.waitfor(cb)` receives `f`'s results.
fn new(lua: &Lua, (f, args): (Function, MultiValue)) -> mlua::Result<Table> {
    let c = ctx(lua);
    let Sent::Function(code) = value::from_lua(lua, &Value::Function(f), "arg 1").lua_err_in("thread.new")?
    else {
        return Err(mlua::Error::runtime("thread.new: expected a function"));
    };
    let args = value::from_lua_multi(lua, args, "arg", 2).lua_err_in("thread.new")?;
    let pool = c
        .node
        .threads
        .get_or_init(|| Pool::start("thread", c.node.config.workers, c.node.config.queue));
    let (tx, mut rx) = mpsc::channel(64);
    let shared = shared_names(lua)?;
    let job = Job {
        code,
        args,
        events: tx,
        node: c.node.clone(),
        stage_id: c.stage_id.clone(),
        number: c.number,
        shared,
    };
    pool.try_submit(Box::new(move || run_on_worker(job)))
        .lua_err_in("thread.new")?;
    let h = Rc::new(Handle {
        cb: RefCell::new(None),
        pending: RefCell::new(VecDeque::new()),
        pumping: std::cell::Cell::new(false),
        dropped: std::cell::Cell::new(false),
    });
    {
        let (lua, h) = (lua.clone(), h.clone());
        tokio::task::spawn_local(async move {
            while let Some(ev) = rx.recv().await {
                if h.dropped.get() {
                    continue;
                }
                h.pending.borrow_mut().push_back(ev);
                pump(&lua, &h);
            }
        });
    }
    let obj = lua.create_table()?;
    let h2 = h.clone();
    let this = obj.clone();
    obj.set(
        "waitfor",
        lua.create_function(move |lua, args: MultiValue| {
            // Both `obj.waitfor(cb)` and `obj:waitfor(cb)` work.
            let cb = args.iter().find_map(|v| match v {
                Value::Function(f) => Some(f.clone()),
                _ => None,
            });
            let Some(cb) = cb else {
                // `to.waitfor(nil)` (STAGE): no more callbacks; what the job sends is dropped.
                if args.iter().any(|v| !v.is_nil() && !matches!(v, Value::Table(_))) {
                    return Err(mlua::Error::runtime(
                        "waitfor: expected a callback function or nil",
                    ));
                }
                *h2.cb.borrow_mut() = None;
                h2.dropped.set(true);
                h2.pending.borrow_mut().clear();
                return Ok(this.clone());
            };
            h2.dropped.set(false);
            *h2.cb.borrow_mut() = Some(cb);
            pump(lua, &h2);
            Ok(this.clone())
        })?,
    )?;
    Ok(obj)
}

/// The `*NAME` globals declared in this state (without the `*`).
fn shared_names(lua: &Lua) -> mlua::Result<Vec<String>> {
    let Ok(sandbox) = lua.globals().get::<Table>("_SANDBOX") else {
        return Ok(vec![]);
    };
    let list: Vec<String> = sandbox.get::<Option<Vec<String>>>("")?.unwrap_or_default();
    Ok(list
        .into_iter()
        .filter_map(|n| n.strip_prefix('*').map(str::to_string))
        .collect())
}

/// Installs `_SANDBOX`: `_SANDBOX[""] = {"*NAME", ...}` makes global `NAME` shared by all
/// instances of the process. The names live in `NodeShared::sandbox`; each read of such a
/// global gets a fresh copy of the latest value, each assignment replaces it. A name without
/// `*` is STAGE's per-coroutine sandbox global: accepted and listed, and otherwise a plain
/// global (an instance's coroutines share its globals, as in plain Lua). Also installs `__`.
pub fn install_sandbox(lua: &Lua) -> mlua::Result<()> {
    let shared: Rc<RefCell<HashSet<String>>> = Rc::new(RefCell::new(HashSet::new()));
    // Every declared name as written (`NAME`, `*NAME`), in declaration order.
    let declared: Rc<RefCell<Vec<String>>> = Rc::new(RefCell::new(vec![]));
    let sandbox = lua.create_table()?;
    let meta = lua.create_table()?;
    let list = declared.clone();
    meta.set(
        "__index",
        lua.create_function(move |lua, (_, k): (Table, Value)| {
            if matches!(&k, Value::String(s) if s.as_bytes().is_empty()) {
                return Ok(Value::Table(lua.create_sequence_from(list.borrow().clone())?));
            }
            Ok(Value::Nil)
        })?,
    )?;
    let list = declared.clone();
    // `pairs(_SANDBOX)`: each declared name (`NAME` or `*NAME`) with the global's value.
    meta.set(
        "__pairs",
        lua.create_function(move |lua, _: Table| {
            let names = list.clone();
            let next = lua.create_function(move |lua, (_, k): (Value, Value)| {
                let names = names.borrow();
                let at = match &k {
                    Value::Nil => 0,
                    Value::String(s) => {
                        let s = s.to_str()?.to_string();
                        names.iter().position(|n| *n == s).map_or(names.len(), |i| i + 1)
                    }
                    _ => names.len(),
                };
                match names.get(at) {
                    Some(n) => {
                        let v: Value = lua.globals().get(n.trim_start_matches('*'))?;
                        Ok((Value::String(lua.create_string(n)?), v))
                    }
                    None => Ok((Value::Nil, Value::Nil)),
                }
            })?;
            Ok((next, Value::Nil, Value::Nil))
        })?,
    )?;
    let names = shared.clone();
    meta.set(
        "__newindex",
        lua.create_function(move |lua, (t, k, v): (Table, Value, Value)| {
            if !matches!(&k, Value::String(s) if s.as_bytes().is_empty()) {
                return t.raw_set(k, v);
            }
            let Value::Table(list) = v else {
                return Err(mlua::Error::runtime(
                    "_SANDBOX[\"\"]: expected a list of names (\"*NAME\" shared by all instances, \"NAME\" per coroutine)",
                ));
            };
            for entry in list.sequence_values::<String>() {
                let entry = entry?;
                let name = entry.strip_prefix('*').unwrap_or(&entry);
                let valid = !name.is_empty()
                    && !name.starts_with(|c: char| c.is_ascii_digit())
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    return Err(mlua::Error::runtime(format!(
                        "_SANDBOX[\"\"]: \"{entry}\" is not a global name (expected \"NAME\" or \"*NAME\")"
                    )));
                }
                if entry.starts_with('*') {
                    share_global(lua, &names, name)?;
                }
                let mut d = declared.borrow_mut();
                if !d.contains(&entry) {
                    d.push(entry.clone());
                }
            }
            Ok(())
        })?,
    )?;
    sandbox.set_metatable(Some(meta))?;
    lua.globals().set("_SANDBOX", sandbox)?;
    lua.globals().set("__", store_view(lua, String::new())?)?;
    Ok(())
}

thread_local! {
    /// Whether this thread holds the node's `__(name, f)` update lock (re-entry runs inline).
    static UPDATING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `__` (STAGE's sandbox helper) over the node-wide store of `*NAME` globals: `__.NAME`
/// reads, `__.NAME = v` writes, `__[n]` is namespace `n` of the store (`__[n] = nil` clears
/// it), and `__("NAME", function (v) return new end)` updates atomically across instances.
fn store_view(lua: &Lua, prefix: String) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    let meta = lua.create_table()?;
    let key_of = {
        let prefix = prefix.clone();
        move |k: &Value| -> mlua::Result<String> {
            match k {
                Value::String(s) => Ok(format!("{prefix}{}", s.to_str()?)),
                Value::Integer(i) => Ok(format!("{prefix}{i}")),
                other => Err(mlua::Error::runtime(format!(
                    "__: a key must be a name, got a {}",
                    other.type_name()
                ))),
            }
        }
    };
    let (k1, p1) = (key_of.clone(), prefix.clone());
    meta.set(
        "__index",
        lua.create_function(move |lua, (_, k): (Table, Value)| {
            if let (Value::Integer(n), true) = (&k, p1.is_empty()) {
                if *n <= 0 {
                    return Err(mlua::Error::runtime("__[n]: n must be a positive integer"));
                }
                return store_view(lua, format!("#{n}.")).map(Value::Table);
            }
            let key = k1(&k)?;
            let v = ctx(lua).node.sandbox.lock().expect("sandbox").get(&key).cloned();
            match v {
                Some(v) => value::to_lua(lua, &v),
                None => Ok(Value::Nil),
            }
        })?,
    )?;
    let (k2, p2) = (key_of.clone(), prefix.clone());
    meta.set(
        "__newindex",
        lua.create_function(move |lua, (_, k, v): (Table, Value, Value)| {
            let node = ctx(lua).node.clone();
            if let (Value::Integer(n), true) = (&k, p2.is_empty()) {
                if !v.is_nil() || *n <= 0 {
                    return Err(mlua::Error::runtime(
                        "__[n] = nil clears namespace n (n > 0); other values cannot be assigned to it",
                    ));
                }
                let ns = format!("#{n}.");
                node.sandbox
                    .lock()
                    .expect("sandbox")
                    .retain(|k, _| !k.starts_with(&ns));
                return Ok(());
            }
            let key = k2(&k)?;
            if v.is_nil() {
                node.sandbox.lock().expect("sandbox").remove(&key);
            } else {
                let sent = value::from_lua(lua, &v, &format!("__.{key}")).lua_err()?;
                node.sandbox.lock().expect("sandbox").insert(key, sent);
            }
            Ok(())
        })?,
    )?;
    let k3 = key_of;
    meta.set(
        "__call",
        lua.create_function(move |lua, (_, k, f): (Table, Value, Function)| {
            let key = k3(&k)?;
            let node = ctx(lua).node.clone();
            let reentered = UPDATING.with(|u| u.get());
            let _guard = if reentered {
                None
            } else {
                let g = node.sandbox_update.lock().unwrap_or_else(|e| e.into_inner());
                UPDATING.with(|u| u.set(true));
                Some(g)
            };
            let result = (|| {
                let cur = node.sandbox.lock().expect("sandbox").get(&key).cloned();
                let cur = match cur {
                    Some(v) => value::to_lua(lua, &v)?,
                    None => Value::Nil,
                };
                // Called directly: a yield inside would hold the lock, so it is an error.
                let new: Value = f.call(cur.clone())?;
                if new.is_nil() {
                    return Ok(cur);
                }
                let sent = value::from_lua(lua, &new, &format!("__.{key}")).lua_err()?;
                node.sandbox.lock().expect("sandbox").insert(key.clone(), sent);
                Ok(new)
            })();
            if !reentered {
                UPDATING.with(|u| u.set(false));
            }
            result
        })?,
    )?;
    t.set_metatable(Some(meta))?;
    Ok(t)
}

/// Makes global `name` shared: a value already set here is committed unless another
/// instance committed one first; the global then lives only in the node-wide store.
fn share_global(lua: &Lua, names: &Rc<RefCell<HashSet<String>>>, name: &str) -> mlua::Result<()> {
    let globals = lua.globals();
    let first = names.borrow().is_empty();
    if !names.borrow_mut().insert(name.to_string()) {
        return Ok(());
    }
    let node = ctx(lua).node.clone();
    let current: Value = globals.raw_get(name)?;
    if !current.is_nil() {
        let v = value::from_lua(lua, &current, &format!("global {name}")).lua_err_in("_SANDBOX")?;
        node.sandbox
            .lock()
            .expect("sandbox")
            .entry(name.to_string())
            .or_insert(v);
        globals.raw_set(name, Value::Nil)?;
    }
    if !first {
        return Ok(());
    }
    // The globals table gets (or extends) a metatable that routes shared names to the store
    // and everything else to what was there before (e.g. a strict-mode __index).
    let meta = match globals.metatable() {
        Some(m) => m,
        None => {
            let m = lua.create_table()?;
            globals.set_metatable(Some(m.clone()))?;
            m
        }
    };
    let old_index: Value = meta.raw_get("__index")?;
    let old_newindex: Value = meta.raw_get("__newindex")?;
    let (n1, node1) = (names.clone(), node.clone());
    meta.raw_set(
        "__index",
        lua.create_function(move |lua, (t, k): (Table, Value)| {
            if let Value::String(s) = &k {
                let key = s.to_str()?.to_string();
                if n1.borrow().contains(&key) {
                    let v = node1.sandbox.lock().expect("sandbox").get(&key).cloned();
                    return match v {
                        Some(v) => value::to_lua(lua, &v),
                        None => Ok(Value::Nil),
                    };
                }
            }
            match &old_index {
                Value::Function(f) => f.call::<Value>((t, k)),
                Value::Table(o) => o.get::<Value>(k),
                _ => Ok(Value::Nil),
            }
        })?,
    )?;
    let n2 = names.clone();
    meta.raw_set(
        "__newindex",
        lua.create_function(move |lua, (t, k, v): (Table, Value, Value)| {
            if let Value::String(s) = &k {
                let key = s.to_str()?.to_string();
                if n2.borrow().contains(&key) {
                    let mut store = node.sandbox.lock().expect("sandbox");
                    if v.is_nil() {
                        store.remove(&key);
                    } else {
                        let sent = value::from_lua(lua, &v, &format!("global {key}")).lua_err()?;
                        store.insert(key, sent);
                    }
                    return Ok(());
                }
            }
            match &old_newindex {
                Value::Function(f) => f.call::<()>((t, k, v)),
                Value::Table(o) => o.set(k, v),
                _ => t.raw_set(k, v),
            }
        })?,
    )?;
    Ok(())
}
