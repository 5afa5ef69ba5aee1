//! The Lua side of messages between instances: `stage.waitfor`, `stage.signal`,
//! `stage.request`, the `_WAITFOR` global, and the loop that hands an instance's queued
//! messages to its handlers. Targets, lookup order and delivery are in `router.rs`; value
//! copying in `value.rs`.

use crate::host::convert::{self, IntoLuaErr, Unit};
use crate::host::{call_callback, ctx, run_callback, InstanceCtx};
use crate::lua::value;
use crate::router::{self, Message, ReplyTo, Scope, SenderInfo, Target};
use mlua::{Function, Lua, MultiValue, Table, UserData, Value};
use std::cell::RefCell;
use std::collections::HashMap;
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
    me: Arc<SenderInfo>,
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
        // Breaks the cycle route userdata -> call -> route userdata.
        let route = call.and_then(|c| c.route.borrow_mut().take());
        drop(route);
    }
}

/// `_WAITFOR[2]`: a reply route, made the first time a handler asks for it.
struct Route(Rc<Call>);

impl UserData for Route {}

/// One handler call: what `_WAITFOR` shows while it runs, and its reply route
/// (`_WAITFOR[2]`, a `Route` userdata, used once, by the first reply). `kept` is set
/// when the script reads `_WAITFOR[2]`: a handler that then returns no values leaves the
/// reply to the script.
pub struct Call {
    hid: Rc<str>,
    id: String,
    from: Arc<SenderInfo>,
    wants_reply: bool,
    to: RefCell<Option<ReplyTo>>,
    kept: std::cell::Cell<bool>,
    /// The `Route` of this call while it is being handled (so `_WAITFOR[2]` is one value).
    route: RefCell<Option<mlua::AnyUserData>>,
}

impl Call {
    fn new(hid: Rc<str>, id: String, from: Arc<SenderInfo>, to: Option<ReplyTo>) -> Call {
        Call {
            hid,
            id,
            from,
            wants_reply: to.is_some(),
            to: RefCell::new(to),
            kept: std::cell::Cell::new(false),
            route: RefCell::new(None),
        }
    }
}

/// `_WAITFOR[k]` of call `key`: `[-1]` handler id, `[0]` message id, `[1]` sender,
/// `[2]` route.
fn call_field(lua: &Lua, (key, k): (usize, Value)) -> mlua::Result<Value> {
    let Some(c) = messages(lua).calls.borrow().get(key).cloned() else {
        return Ok(Value::Nil);
    };
    let k = match k {
        Value::Integer(i) => i,
        Value::Number(_) => match convert::as_integer(&k) {
            Some(i) => i,
            None => return Ok(Value::Nil),
        },
        _ => return Ok(Value::Nil),
    };
    Ok(match k {
        -1 => Value::String(lua.create_string(&*c.hid)?),
        0 => Value::String(lua.create_string(&c.id)?),
        1 => {
            let sender = lua.create_table_with_capacity(0, 3)?;
            sender.raw_set("node", c.from.node.as_str())?;
            sender.raw_set("stage", c.from.stage.as_str())?;
            sender.raw_set("instance", c.from.instance)?;
            Value::Table(sender)
        }
        2 if c.wants_reply => {
            c.kept.set(true);
            let cached = c.route.borrow().clone();
            let ud = match cached {
                Some(ud) => ud,
                None => {
                    let ud = lua.create_userdata(Route(c.clone()))?;
                    *c.route.borrow_mut() = Some(ud.clone());
                    ud
                }
            };
            Value::UserData(ud)
        }
        _ => Value::Nil,
    })
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

/// What `stage.signal` and `stage.request` need, captured by them once (no app data
/// lookups per message). Holds no Lua values, so capturing it makes no cycle.
struct Out {
    node: Arc<crate::host::node::NodeShared>,
    number: usize,
    me: Arc<SenderInfo>,
    targets: TargetCache,
}

impl Out {
    fn target(&self, target: &str) -> mlua::Result<Rc<Target>> {
        Ok(self.targets.get(target)?)
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
local contexts, raw_signal, sync_signal, field, xpcall, handler = ...
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
local waitfor = setmetatable({}, {
    __index = function(_, k)
        local c = contexts[running()]
        if c then return field(c, k) end
    end,
    __newindex = function() error("_WAITFOR is read-only", 2) end,
})
local function signal(target, ...)
    if type(target) == "string" and target:byte(1) == 58 then return sync_signal(target, ...) end
    return raw_signal(target, ...)
end
return run, waitfor, signal
"#;

/// Adds `waitfor`, `signal` and `request` to the `stage` table and sets `_WAITFOR`.
pub fn register(lua: &Lua, stage: &Table) -> mlua::Result<()> {
    let c = ctx(lua);
    let contexts = lua.create_table()?;
    let weak = lua.create_table()?;
    weak.set("__mode", "k")?;
    contexts.set_metatable(Some(weak))?;
    let me = Arc::new(c.node.router.sender(c.number));
    let out = Rc::new(Out {
        node: c.node.clone(),
        number: c.number,
        me: me.clone(),
        targets: TargetCache::new(&c.stage_id),
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
    let (run, waitfor_proxy, signal_fn): (Function, Table, Function) =
        lua.load(PRELUDE).set_name("=stage.messages").call((
            contexts.clone(),
            raw_signal,
            sync_signal,
            lua.create_function(call_field)?,
            crate::host::callback::raw_xpcall(lua)?,
            crate::host::callback::error_handler(lua)?,
        ))?;
    lua.set_app_data(Rc::new(Messages {
        handlers: RefCell::new(HashMap::new()),
        contexts,
        calls: RefCell::new(Slab::new()),
        run,
        me,
    }));
    lua.globals().set("_WAITFOR", waitfor_proxy)?;
    stage.set("waitfor", lua.create_function(waitfor)?)?;
    stage.set("signal", signal_fn)?;
    stage.set(
        "request",
        lua.create_async_function(move |lua, args| request(lua, out.clone(), args))?,
    )?;
    Ok(())
}

/// `stage.waitfor([id,] f, ...)`, `stage.waitfor(id, nil)`, `stage.waitfor(id)`.
fn waitfor(lua: &Lua, args: MultiValue) -> mlua::Result<MultiValue> {
    let m = messages(lua);
    let mut args = args.into_vec();
    let id = match args.first() {
        Some(Value::String(s)) => Some(s.to_str()?.to_string()),
        Some(Value::Function(_)) => None,
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
        return lua
            .create_string(&id)
            .map(|s| MultiValue::from_iter([Value::String(s)]));
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
            Ok(MultiValue::from_iter([Value::Boolean(removed)]))
        }
        Some(Value::Function(f)) => {
            let f = f.clone();
            let bound = args.split_off(2);
            m.handlers
                .borrow_mut()
                .insert(id.clone(), Handler::new(&id, f, bound));
            Ok(MultiValue::from_iter([Value::String(lua.create_string(&id)?)]))
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

/// Sends `reply` through `route` (once; later replies are dropped). Returns 1 if sent.
fn send_reply(lua: &Lua, route: &Call, reply: router::Reply) -> usize {
    let Some(to) = route.to.borrow_mut().take() else {
        return 0;
    };
    let c = ctx(lua);
    usize::from(c.node.router.reply(to, messages(lua).me.clone(), reply))
}

/// `stage.signal(target, ...)` for every target but `:msg` (see the prelude).
fn signal(lua: &Lua, out: &Out, (target, args): (Value, MultiValue)) -> mlua::Result<usize> {
    let route = match target {
        Value::String(s) => {
            let t = out.target(&s.to_str()?)?;
            return send(lua, out, &t, args, 2);
        }
        Value::UserData(ud) => ud
            .borrow::<Route>()
            .map_err(|_| rt_err("stage.signal: this userdata is not a reply route"))?
            .0
            .clone(),
        Value::Nil => match current_call(lua)? {
            Some(call) => call,
            None => {
                return Err(rt_err(
                    "stage.signal(nil, ...): no message is being handled in this coroutine",
                ))
            }
        },
        other => {
            return Err(rt_err(format!(
                "stage.signal: expected a target string, a reply route or nil, got a {}",
                other.type_name()
            )))
        }
    };
    if !route.wants_reply {
        // The sender did not ask for a reply.
        return Ok(0);
    }
    let values = value::from_lua_multi(lua, args, "arg", 2).lua_err()?;
    Ok(send_reply(lua, &route, Ok(values)))
}

/// Parses `target`, copies `args` and delivers; returns how many instances took it.
fn send(lua: &Lua, out: &Out, t: &Target, args: MultiValue, first_arg: usize) -> mlua::Result<usize> {
    let values = value::from_lua_multi(lua, args, "arg", first_arg).lua_err()?;
    let reply = t.reply.as_ref().map(|id| ReplyTo::Handler {
        instance: out.number,
        id: id.clone(),
    });
    let msg = Message {
        id: t.id.clone(),
        from: out.me.clone(),
        values,
        reply,
    };
    Ok(out.node.router.deliver(t.scope, &t.stage, msg).unwrap_or(0))
}

/// `:msg`: calls the handler of this instance in place. `None` when there is none;
/// `Some(Err(reason))` when it raised (the error is logged).
async fn sync_call(
    lua: &Lua,
    target: &str,
    args: MultiValue,
) -> mlua::Result<Option<Result<MultiValue, String>>> {
    let c = ctx(lua);
    let t = Target::parse(target, &c.stage_id)?;
    let m = messages(lua);
    let found = {
        let handlers = m.handlers.borrow();
        router::lookup(&handlers, &t.id).map(|(_, h)| h.clone())
    };
    let Some(h) = found else {
        return Ok(None);
    };
    let slot = CallSlot::new(&m, Rc::new(Call::new(h.hid.clone(), t.id, m.me.clone(), None)));
    let mut all = MultiValue::from_iter([Value::Integer(slot.key as i64), Value::Function(h.f.clone())]);
    all.extend(h.bound.iter().cloned());
    all.extend(args);
    let rets = call_callback(lua, &h.what, &m.run, all).await;
    drop(slot);
    Ok(Some(rets.ok_or_else(|| format!("error in {}", h.what))))
}

/// `stage.request(target, timeout_ms, ...)`.
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
    // 0, negative or none: no timeout.
    let wait = match timeout {
        Some(ms) if ms > 0.0 || ms.is_nan() => {
            Some(convert::delay("stage.request: timeout", ms, Unit::Millis)?)
        }
        _ => None,
    };
    let values = value::from_lua_multi(&lua, args, "arg", 3).lua_err()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let msg = Message {
        id: t.id.clone(),
        from: out.me.clone(),
        values,
        reply: Some(ReplyTo::Request(tx)),
    };
    if let Err(u) = out.node.router.deliver(t.scope, &t.stage, msg) {
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
        // The handling instance stopped with the message in hand.
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

/// Prepares the handler call for `msg`; `None` when it was answered already (no handler).
fn dispatch(
    lua: &Lua,
    m: &Rc<Messages>,
    c: &Rc<InstanceCtx>,
    runner: &Function,
    msg: Message,
) -> mlua::Result<Option<HandlerCall>> {
    let found = {
        let handlers = m.handlers.borrow();
        router::lookup(&handlers, &msg.id).map(|(_, h)| h.clone())
    };
    let router = &c.node.router;
    let Some(h) = found else {
        log::warn!(target: &c.name, "no handler for message '{}' (dropped)", msg.id);
        if let Some(to) = msg.reply {
            router.reply(to, m.me.clone(), Err(format!("no handler for '{}'", msg.id)));
        }
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
                if let Some(to) = msg.reply {
                    router.reply(
                        to,
                        m.me.clone(),
                        Err(format!("cannot receive message '{}': {e}", msg.id)),
                    );
                }
                return Err(e);
            }
        }
    }
    let route = Rc::new(Call::new(h.hid.clone(), msg.id, msg.from, msg.reply));
    let slot = CallSlot::new(m, route.clone());
    all[1] = Value::Integer(slot.key as i64);
    let (lua, m, c, runner) = (lua.clone(), m.clone(), c.clone(), runner.clone());
    Ok(Some(Box::pin(async move {
        let rets = run_callback(&lua, &h.what, &runner, all).await;
        drop(slot);
        if !route.wants_reply {
            return;
        }
        let reply = match rets {
            // The script took the route to answer later (or never).
            Some(rets) if rets.is_empty() && route.kept.get() => return,
            Some(rets) => value::from_lua_multi(&lua, rets, "return", 1).map_err(|e| {
                let msg = format!("{}: {e}", h.what);
                log::error!(target: &c.name, "{msg}");
                msg
            }),
            None => Err(format!("error in {}", h.what)),
        };
        let to = route.to.borrow_mut().take();
        if let Some(to) = to {
            c.node.router.reply(to, m.me.clone(), reply);
        }
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
            cache.get("hello").unwrap().stage,
            "me",
            "relative to the own stage"
        );
        // errors are returned each time and never cached
        assert!(cache.get("db:x=").is_err());
        assert!(cache.get("db:x=").is_err());
        assert_eq!(cache.map.borrow().len(), 2);
        for i in 0..TARGET_CACHE * 2 {
            let t = cache.get(&format!("s:m{i}")).unwrap();
            assert_eq!(t.id, format!("s:m{i}"));
            assert!(cache.map.borrow().len() <= TARGET_CACHE);
        }
    }
}
