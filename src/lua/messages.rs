//! The Lua side of messages (STAGE's model): `stage.waitfor`, `stage.signal`,
//! `stage.request`, the `_WAITFOR` global, implicit replies, and the loop that hands an
//! instance's queued messages to its handlers. Targets, lookup order, delivery, replies and
//! locks are in `router.rs` / `locks.rs`; value copying in `lua/value.rs`.

use crate::host::{call_callback, ctx, run_callback, InstanceCtx};
use crate::lua::value;
use crate::router::{self, Direct, Kind, LockOp, Message, Scope, SenderInfo, Target};
use mlua::{Function, Lua, MultiValue, Table, Value};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;
use tokio::task::spawn_local;

/// A registered handler and the values bound to it by `stage.waitfor(id, f, ...)`.
struct Handler {
    /// The id it was registered under (`_WAITFOR[-1]`) and how its errors name it.
    hid: Rc<str>,
    what: String,
    f: Function,
    bound: Vec<Value>,
}

impl Handler {
    fn new(hid: &str, f: Function, bound: Vec<Value>) -> Rc<Handler> {
        Rc::new(Handler {
            hid: hid.into(),
            what: format!("handler '{hid}'"),
            f,
            bound,
        })
    }
}

/// The per-instance message state, kept as app data of the instance's Lua state.
struct Messages {
    handlers: RefCell<HashMap<String, Rc<Handler>>>,
    /// `{[coroutine] = key in calls}`, weak-keyed: the call each running handler serves.
    contexts: Table,
    /// The calls being handled. A plain integer in `contexts` rather than a userdata per
    /// message: a userdata (with its finalizer) per message cost ~10% of a message.
    calls: RefCell<Slab<Rc<Call>>>,
    /// `run(call, f, ...)`: records the call of the running coroutine, then `f(...)`.
    run: Function,
    out: Rc<Out>,
}

/// A vector with reusable slots: keys stay valid until removed.
struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Slab<T> {
    fn new() -> Slab<T> {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
        }
    }

    fn insert(&mut self, v: T) -> usize {
        match self.free.pop() {
            Some(k) => {
                self.items[k] = Some(v);
                k
            }
            None => {
                self.items.push(Some(v));
                self.items.len() - 1
            }
        }
    }

    fn get(&self, k: usize) -> Option<&T> {
        self.items.get(k)?.as_ref()
    }

    fn remove(&mut self, k: usize) -> Option<T> {
        let v = self.items.get_mut(k)?.take()?;
        self.free.push(k);
        Some(v)
    }
}

/// Removes a call from `Messages::calls` when its handler is done (or dropped).
struct CallSlot {
    m: Rc<Messages>,
    key: usize,
}

impl CallSlot {
    fn new(m: &Rc<Messages>, call: Rc<Call>) -> CallSlot {
        let key = m.calls.borrow_mut().insert(call);
        CallSlot { m: m.clone(), key }
    }
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        let call = self.m.calls.borrow_mut().remove(self.key);
        drop(call);
    }
}

/// One handler call: what `_WAITFOR` shows while it runs, and how it is answered.
struct Call {
    hid: Rc<str>,
    /// The message without its values (its id, sender and kind say where answers go).
    msg: Message,
    /// Set once the handler answered with `stage.signal(nil, ...)`: its return values are
    /// then not sent again.
    answered: Cell<bool>,
    /// The `_WAITFOR` table, made on the first read. A request handler that read it and
    /// returns nothing leaves the answer to the script (a saved `_WAITFOR` is a target).
    table: RefCell<Option<Table>>,
}

/// A handler call dropped before it finished (its instance stopped or reloaded): a request
/// it has not answered hears "shutting down" at once. The requester keeps its own end of the
/// direct channel (for answers from other nodes), so dropping the message would not tell it.
struct CutOff {
    call: Option<Rc<Call>>,
    c: Rc<InstanceCtx>,
    m: Rc<Messages>,
}

impl CutOff {
    /// The handler ran to its end: it answered, or its return values are the answer.
    fn finished(&mut self) {
        self.call = None;
    }
}

impl Drop for CutOff {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            if !call.answered.get() && matches!(call.msg.kind, Kind::Request { .. }) {
                self.c
                    .node
                    .router
                    .answer(&call.msg, &self.m.out.me, Err("shutting down".into()));
            }
        }
    }
}

impl Call {
    fn new(hid: Rc<str>, msg: Message) -> Call {
        Call {
            hid,
            msg,
            answered: Cell::new(false),
            table: RefCell::new(None),
        }
    }
}

/// `_WAITFOR` of call `key`: `{[-1] = handler id, [0] = id (with "=cb"), [1] = sender
/// address, [2] = sender's stage when the message may be answered, reply = answer id}`.
fn waitfor_table(lua: &Lua, key: usize) -> mlua::Result<Value> {
    let Some(c) = messages(lua).calls.borrow().get(key).cloned() else {
        return Ok(Value::Nil);
    };
    if let Some(t) = c.table.borrow().as_ref() {
        return Ok(Value::Table(t.clone()));
    }
    let t = lua.create_table_with_capacity(4, 1)?;
    t.raw_set(-1, &*c.hid)?;
    t.raw_set(0, c.msg.shown_id())?;
    t.raw_set(1, c.msg.from.address())?;
    if let Some(id) = c.msg.answer_id() {
        t.raw_set(2, c.msg.from.stage.as_str())?;
        t.raw_set("reply", id)?;
    }
    *c.table.borrow_mut() = Some(t.clone());
    Ok(Value::Table(t))
}

/// Parsed targets of one instance, by target string: scripts send to a few fixed targets,
/// so most sends skip parsing. Bounded: cleared when it reaches `TARGET_CACHE` entries.
struct TargetCache {
    own_stage: String,
    map: RefCell<HashMap<String, Rc<Target>>>,
}

const TARGET_CACHE: usize = 256;

impl TargetCache {
    fn new(own_stage: &str) -> TargetCache {
        TargetCache {
            own_stage: own_stage.to_string(),
            map: RefCell::new(HashMap::new()),
        }
    }

    /// `Target::parse(target, own_stage)`; errors are not cached.
    fn get(&self, target: &str) -> Result<Rc<Target>, router::TargetError> {
        if let Some(t) = self.map.borrow().get(target) {
            return Ok(t.clone());
        }
        let t = Rc::new(Target::parse(target, &self.own_stage)?);
        let mut map = self.map.borrow_mut();
        if map.len() >= TARGET_CACHE {
            map.clear();
        }
        map.insert(target.to_string(), t.clone());
        Ok(t)
    }
}

/// Prefix of the reply ids of `stage.request` (never a handler id).
const REQUEST_PREFIX: &str = "~request.";

/// What `stage.signal` and `stage.request` need, captured by them once (no app data
/// lookups per message). Holds no Lua values, so capturing it makes no cycle.
struct Out {
    node: Arc<crate::host::node::NodeShared>,
    me: Arc<SenderInfo>,
    targets: TargetCache,
    /// The requests of this instance waiting for an answer, by reply id: the answers that
    /// come as messages (from other nodes, or to a saved `_WAITFOR`) reach them here.
    pending: RefCell<HashMap<String, Direct>>,
    next_request: Cell<u64>,
    /// Targets whose failed delivery was logged (once each; bounded).
    failed: RefCell<HashSet<String>>,
}

impl Out {
    fn target(&self, target: &str) -> mlua::Result<Rc<Target>> {
        self.targets.get(target).map_err(|e| rt_err(e.to_string()))
    }

    /// Logs a message that could not be delivered once per target.
    fn log_failed(&self, target: &str, why: &str) {
        let mut failed = self.failed.borrow_mut();
        if failed.len() >= 1024 {
            failed.clear();
        }
        if failed.insert(target.to_string()) {
            log::warn!(
                target: &format!("{}#{}", self.me.stage, self.me.instance),
                "stage.signal(\"{target}\"): not delivered ({why}); its reply handler will not be called"
            );
        }
    }
}

fn messages(lua: &Lua) -> Rc<Messages> {
    lua.app_data_ref::<Rc<Messages>>()
        .expect("stage.open registers messages")
        .clone()
}

fn rt_err(msg: impl Into<String>) -> mlua::Error {
    mlua::Error::runtime(msg.into())
}

const PRELUDE: &str = r#"
-- `xpcall` is Lua's own and `handler` the host's one error handler (host::callback).
local contexts, raw_signal, sync_signal, waitfor_table, xpcall, handler = ...
local running, error, type = coroutine.running, error, type
local function finish(co, ok, ...)
    contexts[co] = nil
    if not ok then error((...), 0) end
    return ...
end
local function run(call, f, ...)
    local co = running()
    contexts[co] = call
    return finish(co, xpcall(f, handler, ...))
end
-- `_WAITFOR` is not a global: the globals' __index gives the running handler's table
-- (nil outside a handler), so that a saved `_WAITFOR` keeps its message.
local G = _G
local meta = getmetatable(G)
if not meta then meta = {}; setmetatable(G, meta) end
local old = meta.__index
meta.__index = function(t, k)
    if k == "_WAITFOR" then
        local c = contexts[running()]
        if c then return waitfor_table(c) end
        return nil
    end
    if old == nil then return nil end
    if type(old) == "function" then return old(t, k) end
    return old[k]
end
local function signal(target, ...)
    if type(target) == "string" and target:byte(1) == 58 then return sync_signal(target, ...) end
    return raw_signal(target, ...)
end
return run, signal
"#;

/// Adds `waitfor`, `signal` and `request` to the `stage` table and provides `_WAITFOR`.
pub fn register(lua: &Lua, stage: &Table) -> mlua::Result<()> {
    let c = ctx(lua);
    let contexts = lua.create_table()?;
    let weak = lua.create_table()?;
    weak.set("__mode", "k")?;
    contexts.set_metatable(Some(weak))?;
    let me = Arc::new(c.node.router.sender(c.number));
    let out = Rc::new(Out {
        node: c.node.clone(),
        me,
        targets: TargetCache::new(&c.stage_id),
        pending: RefCell::new(HashMap::new()),
        next_request: Cell::new(0),
        failed: RefCell::new(HashSet::new()),
    });
    let o = out.clone();
    let raw_signal = lua.create_function(move |lua, args| signal(lua, &o, args))?;
    let sync_signal = lua.create_async_function(|lua, (target, args): (String, MultiValue)| async move {
        let n = match sync_call(&lua, &target, args).await? {
            Some(_) => 1,
            None => 0,
        };
        Ok(n)
    })?;
    let (run, signal_fn): (Function, Function) = lua.load(PRELUDE).set_name("=stage.messages").call((
        contexts.clone(),
        raw_signal,
        sync_signal,
        lua.create_function(|lua, key: usize| waitfor_table(lua, key))?,
        crate::host::callback::raw_xpcall(lua)?,
        crate::host::callback::error_handler(lua)?,
    ))?;
    lua.set_app_data(Rc::new(Messages {
        handlers: RefCell::new(HashMap::new()),
        contexts,
        calls: RefCell::new(Slab::new()),
        run,
        out: out.clone(),
    }));
    stage.set("waitfor", lua.create_function(waitfor)?)?;
    stage.set("signal", signal_fn)?;
    stage.set(
        "request",
        lua.create_async_function(move |lua, args| request(lua, out.clone(), args))?,
    )?;
    Ok(())
}

/// A generated handler id of `len` characters, not registered yet.
fn random_id(m: &Messages, len: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ m.out.node.router.next_id().wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut rng = crate::random::Well512::from_seed(seed);
    loop {
        let id: String = (0..len)
            .map(|_| ALPHABET[rng.next_u32() as usize % ALPHABET.len()] as char)
            .collect();
        if !m.handlers.borrow().contains_key(&id) {
            return id;
        }
    }
}

/// `stage.waitfor([id | len,] f, ...)`, `stage.waitfor(id, nil)`, `stage.waitfor(id)`,
/// `stage.waitfor()`.
fn waitfor(lua: &Lua, args: MultiValue) -> mlua::Result<MultiValue> {
    let m = messages(lua);
    let mut args = args.into_vec();
    let one = |v: Value| Ok(MultiValue::from_iter([v]));
    let id = match args.first() {
        // `stage.waitfor()`: every registered id, sorted.
        None => {
            let mut ids: Vec<String> = m.handlers.borrow().keys().cloned().collect();
            ids.sort();
            return one(Value::Table(lua.create_sequence_from(ids)?));
        }
        Some(Value::String(s)) => Some(s.to_str()?.to_string()),
        Some(Value::Function(_)) => None,
        // `stage.waitfor(n, f, ...)`: a generated id of length n.
        Some(Value::Integer(_) | Value::Number(_)) if matches!(args.get(1), Some(Value::Function(_))) => {
            let n = match args[0] {
                Value::Integer(i) => i,
                Value::Number(f) => f as i64,
                _ => unreachable!(),
            };
            if !(1..=256).contains(&n) {
                return Err(rt_err(format!(
                    "stage.waitfor: a generated id has 1 to 256 characters, got {n}"
                )));
            }
            let id = random_id(&m, n as usize);
            args.remove(0);
            args.insert(0, Value::String(lua.create_string(&id)?));
            Some(id)
        }
        Some(Value::Integer(_) | Value::Number(_)) => Some(args[0].to_string()?),
        other => {
            return Err(rt_err(format!(
                "stage.waitfor: expected a message id or a function, got a {}",
                other.map_or("no value", |v| v.type_name())
            )))
        }
    };
    let Some(id) = id else {
        // Without an id: a generated one, unique in the process.
        let c = ctx(lua);
        let id = format!("{}#{}#{}", c.stage_id, c.number, c.node.router.next_id());
        let Value::Function(f) = args.remove(0) else {
            unreachable!()
        };
        m.handlers
            .borrow_mut()
            .insert(id.clone(), Handler::new(&id, f, args));
        return one(Value::String(lua.create_string(&id)?));
    };
    if id.is_empty() {
        return Err(rt_err("stage.waitfor: the message id is empty"));
    }
    match args.get(1) {
        // `stage.waitfor(id)`: the handler and its bound values.
        None => {
            let h = m.handlers.borrow().get(&id).cloned();
            Ok(match h {
                Some(h) => MultiValue::from_iter([
                    Value::Function(h.f.clone()),
                    Value::Table(lua.create_sequence_from(h.bound.iter().cloned())?),
                ]),
                None => MultiValue::from_iter([Value::Nil]),
            })
        }
        Some(Value::Nil) => {
            let removed = m.handlers.borrow_mut().remove(&id).is_some();
            one(Value::Boolean(removed))
        }
        Some(Value::Function(f)) => {
            let f = f.clone();
            let bound = args.split_off(2);
            m.handlers
                .borrow_mut()
                .insert(id.clone(), Handler::new(&id, f, bound));
            one(Value::String(lua.create_string(&id)?))
        }
        Some(other) => Err(rt_err(format!(
            "stage.waitfor: expected a function or nil for \"{id}\", got a {}",
            other.type_name()
        ))),
    }
}

/// The call being handled in the current coroutine.
fn current_call(lua: &Lua) -> mlua::Result<Option<Rc<Call>>> {
    let m = messages(lua);
    let key: Option<usize> = m.contexts.raw_get(lua.current_thread())?;
    Ok(key.and_then(|k| m.calls.borrow().get(k).cloned()))
}

/// `stage.signal(target, ...)` for every target but `:msg` (see the prelude).
fn signal(lua: &Lua, out: &Out, (target, args): (Value, MultiValue)) -> mlua::Result<usize> {
    match target {
        Value::String(s) => {
            let target = s.to_str()?;
            let t = out.target(&target)?;
            send(lua, out, &target, &t, None, args, 2)
        }
        Value::Nil => {
            let Some(call) = current_call(lua)? else {
                return Err(rt_err(
                    "stage.signal(nil, ...): no message is being handled in this coroutine",
                ));
            };
            if call.msg.answer_id().is_none() {
                // A reply, or a synchronous call: nobody to answer.
                return Ok(0);
            }
            let values = value::from_lua_multi(lua, args, "arg", 2).map_err(|e| rt_err(e.to_string()))?;
            call.answered.set(true);
            Ok(usize::from(out.node.router.answer(
                &call.msg,
                &out.me,
                Ok(values),
            )))
        }
        Value::Table(t) => signal_table(lua, out, &t, args),
        other => Err(rt_err(format!(
            "stage.signal: expected a target string, a saved _WAITFOR, {{target, address}} or nil, got a {}",
            other.type_name()
        ))),
    }
}

/// `stage.signal(saved_WAITFOR, ...)` (an answer to that message, later) or
/// `stage.signal({target, address [, timeout]}, ...)` (a message to that instance).
fn signal_table(lua: &Lua, out: &Out, t: &Table, args: MultiValue) -> mlua::Result<usize> {
    let address = |v: Value, what: &str| -> mlua::Result<Arc<SenderInfo>> {
        let s = match v {
            Value::String(s) => s.to_str()?.to_string(),
            other => {
                return Err(rt_err(format!(
                    "stage.signal: {what} must be an address string (_WAITFOR[1]), got a {}",
                    other.type_name()
                )))
            }
        };
        let (node, instance) = router::parse_address(&s)
            .ok_or_else(|| rt_err(format!("stage.signal: \"{s}\" is not an address (_WAITFOR[1])")))?;
        let stage = out.node.router.sender(instance).stage;
        Ok(Arc::new(SenderInfo {
            node: node.to_string(),
            stage,
            instance,
        }))
    };
    let id0: Value = t.raw_get(0)?;
    if let Value::String(id0) = id0 {
        // A saved `_WAITFOR`: answer that message.
        let reply: Option<String> = t.raw_get("reply")?;
        let id = match reply {
            Some(r) => r,
            None => {
                let id0 = id0.to_str()?;
                id0.split_once('=').map_or(&*id0, |(_, cb)| cb).to_string()
            }
        };
        let to = address(t.raw_get(1)?, "_WAITFOR[1]")?;
        let values = value::from_lua_multi(lua, args, "arg", 2).map_err(|e| rt_err(e.to_string()))?;
        let msg = Message {
            id,
            from: out.me.clone(),
            values,
            kind: Kind::Reply,
        };
        return Ok(usize::from(out.node.router.send_to_address(&to, msg).is_ok()));
    }
    let Value::String(target) = t.raw_get::<Value>(1)? else {
        return Err(rt_err(
            "stage.signal: a table target is a saved _WAITFOR or {target, address [, timeout]}",
        ));
    };
    let target = target.to_str()?.to_string();
    let tg = out.target(&target)?;
    let to = match t.raw_get::<Value>(2)? {
        Value::Nil => None,
        v => Some(address(v, "the address (field 2)")?),
    };
    send(lua, out, &target, &tg, to, args, 2)
}

/// Copies `args` and delivers per `t` (or to the instance at `to`); returns how many took it.
fn send(
    lua: &Lua,
    out: &Out,
    target: &str,
    t: &Target,
    to: Option<Arc<SenderInfo>>,
    args: MultiValue,
    first_arg: usize,
) -> mlua::Result<usize> {
    let router = &out.node.router;
    if let Some(op) = t.lock {
        let values = value::from_lua_multi(lua, args, "arg", first_arg).map_err(|e| rt_err(e.to_string()))?;
        router.lock(
            op,
            &t.id,
            t.reply.as_deref().unwrap_or(""),
            out.me.clone(),
            values,
        );
        return Ok(usize::from(op == LockOp::Acquire));
    }
    if t.scope == Scope::Sync {
        return Err(rt_err("stage.signal: ':msg' in a table target is not supported"));
    }
    let implicit = t.reply.is_some() || !t.own(&out.me.stage);
    let kind = Kind::Signal {
        cb: t.reply.clone(),
        implicit,
    };
    // `db:` + table: one message per string key.
    if t.id.is_empty() {
        let mut args = args.into_iter();
        let (Some(Value::Table(tbl)), None) = (args.next(), args.next()) else {
            return Err(rt_err(format!(
                "stage.signal(\"{target}\"): a target without a message id sends a table of messages (one per key), got other arguments"
            )));
        };
        let mut n = 0;
        for pair in tbl.pairs::<Value, Value>() {
            let (k, v) = pair?;
            let Value::String(k) = k else { continue };
            let key = k.to_str()?.to_string();
            let v = value::from_lua(lua, &v, &format!("arg {first_arg}.{key}"))
                .map_err(|e| rt_err(e.to_string()))?;
            let msg = Message {
                id: key,
                from: out.me.clone(),
                values: vec![v],
                kind: kind.clone(),
            };
            n += deliver(out, target, t, to.as_deref(), msg);
        }
        return Ok(n);
    }
    let values = value::from_lua_multi(lua, args, "arg", first_arg).map_err(|e| rt_err(e.to_string()))?;
    let msg = Message {
        id: t.id.clone(),
        from: out.me.clone(),
        values,
        kind,
    };
    Ok(deliver(out, target, t, to.as_deref(), msg))
}

fn deliver(out: &Out, target: &str, t: &Target, to: Option<&SenderInfo>, msg: Message) -> usize {
    let router = &out.node.router;
    let result = match to {
        Some(to) => router.send_to_address(to, msg).map(|()| 1),
        None => router.deliver_each(t.scope, &t.stages, msg),
    };
    match result {
        Ok(n) => n,
        Err(u) => {
            if t.reply.is_some() {
                out.log_failed(target, u.reason());
            }
            0
        }
    }
}

/// `:msg`: calls the handler of this instance in place. `None` when there is none;
/// `Some(Err(reason))` when it raised (the error is logged).
async fn sync_call(
    lua: &Lua,
    target: &str,
    args: MultiValue,
) -> mlua::Result<Option<Result<MultiValue, String>>> {
    let c = ctx(lua);
    let t = Target::parse(target, &c.stage_id).map_err(|e| rt_err(e.to_string()))?;
    let m = messages(lua);
    let found = {
        let handlers = m.handlers.borrow();
        router::lookup(&handlers, &t.id).map(|(_, h)| h.clone())
    };
    let Some(h) = found else {
        return Ok(None);
    };
    let msg = Message {
        id: t.id,
        from: m.out.me.clone(),
        values: vec![],
        kind: Kind::Reply,
    };
    let slot = CallSlot::new(&m, Rc::new(Call::new(h.hid.clone(), msg)));
    let mut all = MultiValue::from_iter([Value::Integer(slot.key as i64), Value::Function(h.f.clone())]);
    all.extend(h.bound.iter().cloned());
    all.extend(args);
    let rets = call_callback(lua, &h.what, &m.run, all).await;
    drop(slot);
    Ok(Some(rets.ok_or_else(|| format!("error in {}", h.what))))
}

/// Removes a pending request when its `stage.request` ends (answered, timed out, dropped).
struct Pending<'a> {
    out: &'a Out,
    id: String,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.out.pending.borrow_mut().remove(&self.id);
    }
}

/// `stage.request(target, timeout_ms, ...)`: a message whose answer comes back to this
/// coroutine: straight through the message's `Direct` channel on this node, or as an answer
/// message addressed to the pending reply id (from other nodes).
async fn request(
    lua: Lua,
    out: Rc<Out>,
    (target, timeout, args): (String, Option<f64>, MultiValue),
) -> mlua::Result<MultiValue> {
    let t = out.target(&target)?;
    let fail = |lua: &Lua, why: &str| -> mlua::Result<MultiValue> {
        Ok(MultiValue::from_iter([
            Value::Nil,
            Value::String(lua.create_string(why)?),
        ]))
    };
    if t.lock.is_some() {
        return Err(rt_err("stage.request: a lock target is sent with stage.signal"));
    }
    match t.scope {
        Scope::Sync => {
            return match sync_call(&lua, &target, args).await? {
                Some(Ok(rets)) => Ok(rets),
                Some(Err(why)) => fail(&lua, &why),
                None => fail(&lua, "no route"),
            }
        }
        Scope::All => {
            return Err(rt_err(
                "stage.request: cannot wait for the replies of a broadcast ('*')",
            ))
        }
        _ => {}
    }
    if t.reply.is_some() {
        return Err(rt_err(
            "stage.request: the reply comes back to the caller; drop '=cb' from the target",
        ));
    }
    if t.id.is_empty() || t.stages.len() != 1 {
        return Err(rt_err(
            "stage.request: expected one stage and a message id (\"stage:msg\")",
        ));
    }
    let values = value::from_lua_multi(&lua, args, "arg", 3).map_err(|e| rt_err(e.to_string()))?;
    let n = out.next_request.get() + 1;
    out.next_request.set(n);
    let cb = format!("{REQUEST_PREFIX}{n}");
    let (direct, rx) = Direct::channel();
    out.pending.borrow_mut().insert(cb.clone(), direct.clone());
    let _pending = Pending {
        out: &out,
        id: cb.clone(),
    };
    // 0, negative or none: no timeout; NaN raises, more than a year is a year.
    let wait = match timeout {
        Some(ms) if ms > 0.0 || ms.is_nan() => Some(
            crate::host::convert::delay("stage.request: timeout", ms, crate::host::convert::Unit::Millis)
                .map_err(mlua::Error::from)?,
        ),
        _ => None,
    };
    let msg = Message {
        id: t.id.clone(),
        from: out.me.clone(),
        values,
        kind: Kind::Request { cb, direct },
    };
    if let Err(u) = out.node.router.deliver(t.scope, &t.stages[0], msg) {
        return fail(&lua, u.reason());
    }
    let reply = if let Some(wait) = wait {
        match tokio::time::timeout(wait, rx).await {
            Ok(r) => r,
            Err(_) => return fail(&lua, "timeout"),
        }
    } else {
        rx.await
    };
    match reply {
        Ok(Ok(values)) => value::to_lua_multi(&lua, &values),
        Ok(Err(why)) => fail(&lua, &why),
        // The instance is stopping.
        Err(_) => fail(&lua, "shutting down"),
    }
}

// The inbox stays borrowed across awaits on purpose: this task is its only user until the
// instance's LocalSet is dropped, after which the instance drains it (`Router::drain`).
#[allow(clippy::await_holding_refcell_ref)]
pub async fn serve(lua: Lua, inbox: Rc<RefCell<router::Inbox>>) {
    let mut inbox = inbox.borrow_mut();
    // Looked up once rather than per message.
    let m = messages(&lua);
    let c = ctx(&lua);
    let runner = match crate::host::callback::xpcall_runner(&lua) {
        Ok(r) => r,
        Err(e) => {
            log::error!(target: &c.name, "cannot serve messages: {e}");
            return;
        }
    };
    // Handlers in flight are bounded (`#limits.handlers`): with every permit taken, the
    // inbox is not read, so messages wait in the bounded queue and, beyond it, `signal`
    // returns 0 and `request` gets "queue full". Memory stays flat under any flood.
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(c.node.config.limits.handlers));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Some(msg) = inbox.recv().await else { return };
        let in_flight = c.node.in_flight();
        let mut call = match dispatch(&lua, &m, &c, &runner, msg) {
            Ok(Some(call)) => call,
            Ok(None) => continue,
            Err(e) => {
                log::error!(target: &c.name, "cannot deliver a message: {e}");
                continue;
            }
        };
        // Most handlers return without yielding: run them here, in order, and give only
        // those that wait a task of their own (its first poll takes over the wake-ups).
        let finished =
            std::future::poll_fn(|cx| std::task::Poll::Ready(call.as_mut().poll(cx).is_ready())).await;
        if !finished {
            spawn_local(async move {
                call.await;
                drop((permit, in_flight));
            });
        }
    }
}

type HandlerCall = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

/// Prepares the handler call for `msg`; `None` when it needs none (an answer to a request
/// of this instance, or no handler).
fn dispatch(
    lua: &Lua,
    m: &Rc<Messages>,
    c: &Rc<InstanceCtx>,
    runner: &Function,
    mut msg: Message,
) -> mlua::Result<Option<HandlerCall>> {
    let router = &c.node.router;
    match &msg.kind {
        Kind::Reply | Kind::Failed(_) if msg.id.starts_with(REQUEST_PREFIX) => {
            // The answer to a `stage.request` of this instance (gone if it timed out).
            let waiting = m.out.pending.borrow_mut().remove(&msg.id);
            if let Some(direct) = waiting {
                let answer = match msg.kind {
                    Kind::Failed(why) => Err(why),
                    _ => Ok(msg.values),
                };
                direct.send(answer);
            }
            return Ok(None);
        }
        _ => {}
    }
    let found = {
        let handlers = m.handlers.borrow();
        router::lookup(&handlers, &msg.id).map(|(_, h)| h.clone())
    };
    let Some(h) = found else {
        match msg.kind {
            // An answer nobody waits for is dropped quietly, as in STAGE.
            Kind::Reply | Kind::Failed(_) => {
                log::debug!(target: &c.name, "no handler for reply '{}' (dropped)", msg.id)
            }
            _ => log::warn!(target: &c.name, "no handler for message '{}' (dropped)", msg.id),
        }
        router.answer(&msg, &m.out.me, Err(format!("no handler for '{}'", msg.id)));
        return Ok(None);
    };
    // `run(call, f, bound..., values...)`, built in one go.
    let mut all = MultiValue::with_capacity(3 + h.bound.len() + msg.values.len());
    all.push_back(Value::Function(m.run.clone()));
    all.push_back(Value::Nil);
    all.push_back(Value::Function(h.f.clone()));
    all.extend(h.bound.iter().cloned());
    for v in &msg.values {
        match value::to_lua(lua, v) {
            Ok(v) => all.push_back(v),
            Err(e) => {
                router.answer(
                    &msg,
                    &m.out.me,
                    Err(format!("cannot receive message '{}': {e}", msg.id)),
                );
                return Err(e);
            }
        }
    }
    msg.values = Vec::new();
    let call = Rc::new(Call::new(h.hid.clone(), msg));
    let slot = CallSlot::new(m, call.clone());
    all[1] = Value::Integer(slot.key as i64);
    let (lua, m, c, runner) = (lua.clone(), m.clone(), c.clone(), runner.clone());
    // Rc clones only (no atomic on the way of every message).
    let mut cut = CutOff {
        call: Some(call.clone()),
        c: c.clone(),
        m: m.clone(),
    };
    Ok(Some(Box::pin(async move {
        let rets = run_callback(&lua, &h.what, &runner, all).await;
        cut.finished();
        drop(slot);
        if call.answered.get() {
            return;
        }
        let (request, implicit) = match &call.msg.kind {
            Kind::Request { .. } => (true, true),
            Kind::Signal { implicit, .. } => (false, *implicit),
            _ => return,
        };
        let answer = match rets {
            // A request handler that looked at `_WAITFOR` and returns nothing answers later.
            Some(rets) if rets.is_empty() && (!request || call.table.borrow().is_some()) => return,
            Some(_) if !implicit => return,
            Some(rets) => value::from_lua_multi(&lua, rets, "return", 1).map_err(|e| {
                let msg = format!("{}: {e}", h.what);
                log::error!(target: &c.name, "{msg}");
                msg
            }),
            None => Err(format!("error in {}", h.what)),
        };
        c.node.router.answer(&call.msg, &m.out.me, answer);
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slab_reuses_removed_slots_only() {
        let mut s = Slab::new();
        let (a, b) = (s.insert("a"), s.insert("b"));
        assert_ne!(a, b);
        assert_eq!((s.get(a), s.get(b)), (Some(&"a"), Some(&"b")));
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.get(a), None);
        assert_eq!(s.remove(a), None, "a key is removed once");
        assert_eq!(s.get(99), None);
        let c = s.insert("c");
        assert_eq!(c, a, "the freed slot is reused");
        assert_eq!(s.get(b), Some(&"b"), "other keys stay valid");
        assert_eq!(s.items.len(), 2);
    }

    #[test]
    fn target_cache_parses_once_and_stays_bounded() {
        let cache = TargetCache::new("me");
        let a = cache.get("db:load_user=on_user").unwrap();
        assert_eq!(*a, Target::parse("db:load_user=on_user", "me").unwrap());
        let b = cache.get("db:load_user=on_user").unwrap();
        assert!(Rc::ptr_eq(&a, &b), "the second lookup is the cached parse");
        assert_eq!(
            cache.get("hello").unwrap().scope,
            Scope::Own,
            "relative to the own stage"
        );
        // errors are returned each time and never cached
        assert!(cache.get("db:x=").is_err());
        assert!(cache.get("db:x=").is_err());
        assert_eq!(cache.map.borrow().len(), 2);
        for i in 0..TARGET_CACHE * 2 {
            let t = cache.get(&format!("s:m{i}")).unwrap();
            assert_eq!(t.id, format!("m{i}"));
            assert!(cache.map.borrow().len() <= TARGET_CACHE);
        }
    }
}
