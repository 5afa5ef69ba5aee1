//! The `lb` module (docs/lb.md): thin glue over `cloud::lb`. Every call that talks to HAProxy
//! or the store is an async function whose blocking work runs on a thread of its own, so the
//! calling coroutine yields and the instance keeps serving. Hooks (`on_change`, `on_failover`,
//! the autoscaling provider) are Lua functions kept in this instance; the events reach them
//! through a task per LB, and the autoscaling loop of an LB runs in the instance that gave it
//! a provider.

use crate::cloud::lb::autoscale::Decision;
use crate::cloud::lb::controller::StoreAt;
use crate::cloud::lb::{Controller, LbError, Spec};
use crate::host::{call_callback, ctx};
use mlua::{Function, Lua, LuaSerdeExt, MultiValue, SerializeOptions, Table, Value};
use serde_json::Value as Json;
use std::time::Duration;

/// The hooks one instance keeps per LB name (a table in the Lua registry).
const HOOKS: &str = "stage.lb.hooks";
/// LB names whose event task / autoscaling loop runs in this instance.
const WATCHED: &str = "stage.lb.watched";
const SCALING: &str = "stage.lb.scaling";

pub fn open(lua: &Lua) -> mlua::Result<Table> {
    lua.set_named_registry_value(HOOKS, lua.create_table()?)?;
    lua.set_named_registry_value(WATCHED, lua.create_table()?)?;
    lua.set_named_registry_value(SCALING, lua.create_table()?)?;
    let t = lua.create_table()?;
    t.set("create", lua.create_async_function(create)?)?;
    t.set(
        "get",
        lua.create_async_function(|lua, (name, hooks): (String, Option<Table>)| async move {
            let c = controller(&lua)?;
            let remote = if c.exists(&name) {
                false
            } else {
                let (c2, n) = (c.clone(), name.clone());
                match blocking(move || c2.remote_info(&n)).await? {
                    Ok(_) => true,
                    Err(LbError::NotFound(_)) => return Ok(Value::Nil),
                    Err(e) => return Err(err(e)),
                }
            };
            if let Some(h) = hooks {
                let (_, hooks) = split_spec(&lua, "lb.get", &h)?;
                set_hooks(&lua, &name, &hooks)?;
            }
            attach(&lua, &c, &name)?;
            Ok(Value::Table(handle(&lua, &name, remote)?))
        })?,
    )?;
    t.set(
        "list",
        lua.create_async_function(|lua, ()| async move {
            let c = controller(&lua)?;
            let infos = blocking(move || {
                let mut out: Vec<Json> = c
                    .names()
                    .iter()
                    .filter_map(|n| c.refresh(n).and_then(|_| c.info(n)).ok())
                    .filter_map(|i| serde_json::to_value(i).ok())
                    .collect();
                out.extend(
                    c.remote_names()
                        .iter()
                        .filter_map(|n| c.remote_info(n).ok())
                        .filter_map(|i| serde_json::to_value(i).ok()),
                );
                out
            })
            .await?;
            to_lua(&lua, &infos)
        })?,
    )?;
    t.set(
        "info",
        lua.create_async_function(|lua, name: String| async move { info(&lua, name).await })?,
    )?;
    Ok(t)
}

fn err(e: LbError) -> mlua::Error {
    mlua::Error::runtime(e.to_string())
}

fn to_lua<T: serde::Serialize>(lua: &Lua, v: &T) -> mlua::Result<Value> {
    let opts = SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false)
        .set_array_metatable(false);
    lua.to_value_with(v, opts)
}

/// Runs blocking controller work on a thread of its own; the coroutine waits without blocking
/// the instance.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> mlua::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("lb-op".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| mlua::Error::runtime(format!("lb: cannot start a thread: {e}")))?;
    rx.await
        .map_err(|_| mlua::Error::runtime("lb: the operation's thread panicked"))
}

fn controller(lua: &Lua) -> mlua::Result<Controller> {
    let node = ctx(lua).node.clone();
    let dir = node.home.root.join("var").join("lb");
    let store = StoreAt::of(&dir, node.config.lua.odbc.get("LB")).map_err(err)?;
    let c = Controller::open(&dir, store, false)
        .map_err(err)?
        .ok_or_else(|| mlua::Error::runtime("lb: no controller"))?;
    c.enable_remote_from(node.config.vultr.as_ref());
    Ok(c)
}

/// Splits the functions (hooks) off a spec table; the rest becomes JSON for the core.
fn split_spec(lua: &Lua, what: &str, t: &Table) -> mlua::Result<(Json, Table)> {
    let plain = lua.create_table()?;
    let hooks = lua.create_table()?;
    for pair in t.pairs::<Value, Value>() {
        let (k, v) = pair?;
        let key = match &k {
            Value::String(s) => s.to_str()?.to_string(),
            _ => {
                return Err(mlua::Error::runtime(format!(
                    "{what}: field names must be strings"
                )))
            }
        };
        match (key.as_str(), &v) {
            ("on_change" | "on_failover", Value::Function(_)) => hooks.set(key, v)?,
            ("on_change" | "on_failover", _) => {
                return Err(mlua::Error::runtime(format!("{what}: {key} must be a function")))
            }
            ("autoscale", Value::Table(a)) => {
                let copy = lua.create_table()?;
                for p in a.pairs::<Value, Value>() {
                    let (ak, av) = p?;
                    let name = ak.to_string()?;
                    match (name.as_str(), &av) {
                        ("provider", Value::Function(_) | Value::Table(_)) => {
                            hooks.set("provider", av.clone())?;
                            copy.set("provider", true)?;
                        }
                        ("provider", Value::String(_)) => {
                            hooks.set("provider", av.clone())?;
                            copy.set("provider", av)?;
                        }
                        ("release", Value::Function(_)) => hooks.set("release", av)?,
                        ("release", _) => {
                            return Err(mlua::Error::runtime(format!(
                                "{what}: autoscale.release must be a function"
                            )))
                        }
                        _ => copy.set(ak, av)?,
                    }
                }
                plain.set(key, copy)?;
            }
            _ => plain.set(k, v)?,
        }
    }
    let json: Json = lua
        .from_value(Value::Table(plain))
        .map_err(|e| mlua::Error::runtime(format!("{what}: {e}")))?;
    Ok((json, hooks))
}

fn set_hooks(lua: &Lua, name: &str, hooks: &Table) -> mlua::Result<()> {
    let all: Table = lua.named_registry_value(HOOKS)?;
    let mine: Table = match all.get::<Option<Table>>(name)? {
        Some(t) => t,
        None => {
            let t = lua.create_table()?;
            all.set(name, t.clone())?;
            t
        }
    };
    for pair in hooks.pairs::<String, Value>() {
        let (k, v) = pair?;
        mine.set(k, v)?;
    }
    Ok(())
}

fn hook(lua: &Lua, name: &str, key: &str) -> Option<Value> {
    let all: Table = lua.named_registry_value(HOOKS).ok()?;
    let mine: Table = all.get::<Option<Table>>(name).ok()??;
    match mine.get::<Value>(key).ok()? {
        Value::Nil => None,
        v => Some(v),
    }
}

async fn create(lua: Lua, t: Table) -> mlua::Result<Table> {
    let (mut json, hooks) = split_spec(&lua, "lb.create", &t)?;
    if let Some(p) = json.as_object_mut().and_then(|m| m.remove("placement")) {
        return create_remote(lua, json, p, hooks).await;
    }
    let spec = Spec::from_json("lb.create", &json).map_err(err)?;
    let name = spec.name.clone();
    let c = controller(&lua)?;
    if c.is_remote(&name) {
        return Err(mlua::Error::runtime(format!(
            "lb.create: lb {name:?} exists (use lb.get to reach it, or delete it first)"
        )));
    }
    let c2 = c.clone();
    blocking(move || c2.create(spec)).await?.map_err(err)?;
    set_hooks(&lua, &name, &hooks)?;
    attach(&lua, &c, &name)?;
    handle(&lua, &name, false)
}

async fn info(lua: &Lua, name: String) -> mlua::Result<Value> {
    let c = controller(lua)?;
    let i = blocking(move || {
        if c.exists(&name) {
            c.refresh(&name)
                .and_then(|_| c.info(&name))
                .and_then(|i| serde_json::to_value(i).map_err(|e| LbError::Failed(e.to_string())))
        } else {
            c.remote_info(&name)
                .and_then(|i| serde_json::to_value(i).map_err(|e| LbError::Failed(e.to_string())))
        }
    })
    .await?
    .map_err(err)?;
    to_lua(lua, &i)
}

/// The first argument of a handle method, whether called `web.add(x)` or `web:add(x)`.
fn args(mut a: MultiValue) -> MultiValue {
    let is_handle = match a.front() {
        Some(Value::Table(t)) => matches!(t.raw_get::<Value>("add"), Ok(Value::Function(_))),
        _ => false,
    };
    if is_handle {
        a.pop_front();
    }
    a
}

fn arg_string(what: &str, a: &MultiValue) -> mlua::Result<String> {
    match a.front() {
        Some(Value::String(s)) => Ok(s.to_str()?.to_string()),
        other => Err(mlua::Error::runtime(format!(
            "{what}: expected an address string \"ip:port\", got {}",
            other.map(|v| v.type_name()).unwrap_or("nothing")
        ))),
    }
}

/// The table a script holds for one LB: `add`, `remove`, `info`, `update`, `delete`, `name`;
/// a remote LB's (`remote = true`) calls the controller's `remote_*` operations.
fn handle(lua: &Lua, name: &str, remote: bool) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("name", name)?;
    if remote {
        t.set("remote", true)?;
    }
    let n = name.to_string();
    t.set(
        "add",
        lua.create_async_function(move |lua, a: MultiValue| {
            let n = n.clone();
            async move {
                let addr = arg_string(&format!("{n}.add"), &args(a))?;
                let c = controller(&lua)?;
                blocking(move || {
                    if remote {
                        c.remote_add(&n, &addr)
                    } else {
                        c.add(&n, &addr, false)
                    }
                })
                .await?
                .map_err(err)?;
                Ok(true)
            }
        })?,
    )?;
    let n = name.to_string();
    t.set(
        "remove",
        lua.create_async_function(move |lua, a: MultiValue| {
            let n = n.clone();
            async move {
                let addr = arg_string(&format!("{n}.remove"), &args(a))?;
                let c = controller(&lua)?;
                blocking(move || {
                    if remote {
                        c.remote_remove(&n, &addr)
                    } else {
                        c.remove(&n, &addr)
                    }
                })
                .await?
                .map_err(err)?;
                Ok(true)
            }
        })?,
    )?;
    let n = name.to_string();
    t.set(
        "info",
        lua.create_async_function(move |lua, _a: MultiValue| {
            let n = n.clone();
            async move { info(&lua, n).await }
        })?,
    )?;
    let n = name.to_string();
    t.set(
        "update",
        lua.create_async_function(move |lua, a: MultiValue| {
            let n = n.clone();
            async move {
                let what = format!("{n}.update");
                let Some(Value::Table(changes)) = args(a).pop_front() else {
                    return Err(mlua::Error::runtime(format!(
                        "{what}: expected a table of changes"
                    )));
                };
                let (json, hooks) = split_spec(&lua, &what, &changes)?;
                let c = controller(&lua)?;
                let (c2, n2) = (c.clone(), n.clone());
                if remote {
                    let i = blocking(move || c2.remote_update(&n2, &json))
                        .await?
                        .map_err(err)?;
                    set_hooks(&lua, &n, &hooks)?;
                    return to_lua(&lua, &i);
                }
                let i = blocking(move || c2.update(&n2, &json)).await?.map_err(err)?;
                set_hooks(&lua, &n, &hooks)?;
                attach(&lua, &c, &n)?;
                to_lua(&lua, &i)
            }
        })?,
    )?;
    let n = name.to_string();
    t.set(
        "delete",
        lua.create_async_function(move |lua, _a: MultiValue| {
            let n = n.clone();
            async move {
                let c = controller(&lua)?;
                let n2 = n.clone();
                blocking(move || {
                    if remote {
                        c.remote_delete(&n2)
                    } else {
                        c.delete(&n2)
                    }
                })
                .await?
                .map_err(err)?;
                let all: Table = lua.named_registry_value(HOOKS)?;
                all.set(n.as_str(), Value::Nil)?;
                Ok(true)
            }
        })?,
    )?;
    Ok(t)
}

/// Starts (once per instance and LB) the task that hands events to the hooks, and the
/// autoscaling loop when this instance holds a provider for an LB with `autoscale`.
fn attach(lua: &Lua, c: &Controller, name: &str) -> mlua::Result<()> {
    let watched: Table = lua.named_registry_value(WATCHED)?;
    if !watched.get::<bool>(name).unwrap_or(false) {
        watched.set(name, true)?;
        let mut rx = c.subscribe(name);
        let lua2 = lua.clone();
        let n = name.to_string();
        tokio::task::spawn_local(async move {
            while let Some(ev) = rx.recv().await {
                let key = if ev.kind == "failover" {
                    "on_failover"
                } else {
                    "on_change"
                };
                if let Some(Value::Function(f)) = hook(&lua2, &n, key) {
                    if let Ok(v) = to_lua(&lua2, &ev) {
                        call_callback(&lua2, &format!("lb {n} {key}"), &f, v).await;
                    }
                }
            }
            if let Ok(w) = lua2.named_registry_value::<Table>(WATCHED) {
                let _ = w.set(n.as_str(), Value::Nil);
            }
        });
    }
    let scaling: Table = lua.named_registry_value(SCALING)?;
    let has_autoscale = c.spec(name).map(|s| s.autoscale.is_some()).unwrap_or(false);
    let provider = hook(lua, name, "provider").or_else(|| {
        c.spec(name)
            .ok()
            .and_then(|s| s.autoscale)
            .and_then(|a| a.provider)
            .and_then(|p| lua.create_string(p).ok())
            .map(Value::String)
    });
    if has_autoscale && provider.is_some() && !scaling.get::<bool>(name).unwrap_or(false) {
        scaling.set(name, true)?;
        let lua2 = lua.clone();
        let c2 = c.clone();
        let n = name.to_string();
        tokio::task::spawn_local(async move {
            autoscale_loop(&lua2, &c2, &n).await;
            if let Ok(s) = lua2.named_registry_value::<Table>(SCALING) {
                let _ = s.set(n.as_str(), Value::Nil);
            }
        });
    }
    Ok(())
}

/// The provider's `create` and `release` functions: a function (create only), a table with
/// `create` / `release`, or a script name whose module is such a table.
async fn provider_fns(lua: &Lua, name: &str) -> mlua::Result<(Function, Option<Function>)> {
    let release_hook = match hook(lua, name, "release") {
        Some(Value::Function(f)) => Some(f),
        _ => None,
    };
    let mut p = hook(lua, name, "provider").unwrap_or(Value::Nil);
    if p.is_nil() {
        if let Some(s) = controller(lua)?
            .spec(name)
            .ok()
            .and_then(|s| s.autoscale)
            .and_then(|a| a.provider)
        {
            p = Value::String(lua.create_string(s)?);
        }
    }
    if let Value::String(s) = &p {
        let stage: Table = lua.globals().get("stage")?;
        let load: Function = stage.get("load")?;
        p = load.call_async::<Value>(s.clone()).await?;
    }
    match p {
        Value::Function(f) => Ok((f, release_hook)),
        Value::Table(t) => {
            let create: Function = t.get("create").map_err(|_| {
                mlua::Error::runtime(format!("lb {name}: the autoscale provider has no create function"))
            })?;
            Ok((create, release_hook.or(t.get("release").ok())))
        }
        other => Err(mlua::Error::runtime(format!(
            "lb {name}: autoscale.provider must be a function, a table with create/release or a script name, got {}",
            other.type_name()
        ))),
    }
}

async fn autoscale_loop(lua: &Lua, c: &Controller, name: &str) {
    loop {
        let Ok(spec) = c.spec(name) else { return };
        let Some(cfg) = spec.autoscale else { return };
        tokio::time::sleep(Duration::from_secs_f64(cfg.period)).await;
        let (d, victim, obs) = match c.autoscale_decide(name) {
            Ok(x) => x,
            Err(_) => return,
        };
        let what = format!("lb {name} autoscale");
        match d {
            Decision::Hold => {}
            Decision::Out(n) => {
                log::info!(target: "lb", "{what}: load {:.1} over {} ready backends; adding {n}", obs.load, obs.ready);
                let mut ok = true;
                for _ in 0..n {
                    let (create, _) = match provider_fns(lua, name).await {
                        Ok(f) => f,
                        Err(e) => {
                            log::error!(target: "lb", "{what}: {e}");
                            ok = false;
                            break;
                        }
                    };
                    let info = match c.info(name) {
                        Ok(i) => to_lua(lua, &i).unwrap_or(Value::Nil),
                        Err(_) => return,
                    };
                    let addr = match call_callback(lua, &format!("{what} provider"), &create, info).await {
                        Some(mut r) => match r.pop_front() {
                            Some(Value::String(s)) => s.to_str().map(|s| s.to_string()).ok(),
                            other => {
                                log::error!(target: "lb", "{what}: the provider returned {} instead of an \"ip:port\" string",
                                    other.map(|v| v.type_name()).unwrap_or("nothing"));
                                None
                            }
                        },
                        None => None,
                    };
                    let Some(addr) = addr else {
                        ok = false;
                        break;
                    };
                    let c2 = c.clone();
                    let n2 = name.to_string();
                    let a2 = addr.clone();
                    match blocking(move || c2.add(&n2, &a2, true)).await {
                        Ok(Ok(())) => log::info!(target: "lb", "{what}: added {addr}"),
                        Ok(Err(e)) => {
                            log::error!(target: "lb", "{what}: {e}");
                            ok = false;
                            break;
                        }
                        Err(_) => return,
                    }
                }
                match c.autoscale_result(name, d, ok) {
                    Ok(delay) if !ok => {
                        log::warn!(target: "lb", "{what}: scale-out failed; retrying in {} s", delay.as_secs_f64())
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
            Decision::In => {
                let Some(addr) = victim else { continue };
                log::info!(target: "lb", "{what}: load {:.1} over {} ready backends; removing {addr}", obs.load, obs.ready);
                let c2 = c.clone();
                let n2 = name.to_string();
                let a2 = addr.clone();
                let ok = match blocking(move || c2.remove(&n2, &a2)).await {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        log::error!(target: "lb", "{what}: {e}");
                        false
                    }
                    Err(_) => return,
                };
                if ok {
                    if let Ok((_, Some(release))) = provider_fns(lua, name).await {
                        let info = c
                            .info(name)
                            .ok()
                            .and_then(|i| to_lua(lua, &i).ok())
                            .unwrap_or(Value::Nil);
                        call_callback(lua, &format!("{what} release"), &release, (info, addr.clone())).await;
                    }
                }
                let _ = c.autoscale_result(name, d, ok);
            }
        }
    }
}

/// `lb.create{ ..., placement = {provider = "vultr", ...} }`: the LB on a VM (docs/lb.md,
/// "Remote mode"). The controller supervises it; the handle has the local handle's functions.
async fn create_remote(lua: Lua, json: Json, placement: Json, hooks: Table) -> mlua::Result<Table> {
    use crate::cloud::lb::remote::Placement;
    let spec = Spec::from_json("lb.create", &json).map_err(err)?;
    let placement = Placement::from_json("lb.create: placement", &placement).map_err(err)?;
    let name = spec.name.clone();
    let c = controller(&lua)?;
    let c2 = c.clone();
    blocking(move || c2.remote_create(spec, placement))
        .await?
        .map_err(err)?;
    set_hooks(&lua, &name, &hooks)?;
    attach(&lua, &c, &name)?;
    handle(&lua, &name, true)
}
