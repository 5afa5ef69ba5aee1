//! The `stage` module: script loading (`load`, `require`, `call`), `once`, timers
//! (`addtask`, `sleep`) and keyed work (`submit`).

use crate::home::split_name;
use crate::host::convert::{self, Unit};
use crate::host::ctx;
use crate::host::loader::{LoadError, Loaded};
use mlua::{Function, Lua, MultiValue, Table, Value, Variadic};

pub fn open(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("once", lua.create_async_function(once)?)?;
    t.set(
        "load",
        lua.create_async_function(|lua, (name, f): (String, Option<Function>)| async move {
            load(lua, name, f, true).await
        })?,
    )?;
    t.set(
        "require",
        lua.create_async_function(|lua, (name, f): (String, Option<Function>)| async move {
            load(lua, name, f, false).await
        })?,
    )?;
    t.set("call", lua.create_async_function(call)?)?;
    t.set("addtask", lua.create_function(addtask)?)?;
    t.set("submit", lua.create_function(submit)?)?;
    t.set(
        "sleep",
        lua.create_async_function(|_, ms: f64| async move {
            tokio::time::sleep(convert::delay("stage.sleep(ms)", ms, Unit::Millis)?).await;
            Ok(())
        })?,
    )?;
    crate::lua::messages::register(lua, &t)?;
    if std::env::var_os(TEST_HOOKS).is_some_and(|v| v == "1") {
        t.set("_panic", lua.create_function(test_panic)?)?;
    }
    Ok(t)
}

/// With this variable set to `1`, `stage._panic(msg)` exists: a binding that panics, so
/// tests can check that a Rust panic in a binding stays one clear error (tests/lua/stage).
pub const TEST_HOOKS: &str = "STAGE_TEST_HOOKS";

fn test_panic(_: &Lua, msg: String) -> mlua::Result<()> {
    panic!("{msg}")
}

/// `stage.once(key, f)`: runs `f` only the first time `key` is seen in this process.
async fn once(lua: Lua, (key, f): (String, Option<Function>)) -> mlua::Result<MultiValue> {
    let node = ctx(&lua).node.clone();
    let Some(f) = f else {
        node.once.lock().expect("once set").remove(&key);
        return Ok(MultiValue::new());
    };
    let first = node.once.lock().expect("once set").insert(key);
    if first {
        f.call_async(()).await
    } else {
        Ok(MultiValue::new())
    }
}

/// The value of `name` (`file` or `file+id`) from a loaded script.
fn pick(lua: &Lua, loaded: &Loaded, id: Option<&str>) -> mlua::Result<Value> {
    match id {
        None => Ok(loaded.value.clone()),
        Some(id) => match &loaded.value {
            Value::Table(t) => t.get(id),
            other => Err(mlua::Error::runtime(format!(
                "script {} returned a {}, not a table with field \"{id}\"",
                ctx(lua).loader.display_path(&loaded.path),
                other.type_name()
            ))),
        },
    }
}

fn info_table(lua: &Lua, loaded: &Loaded) -> mlua::Result<Table> {
    let info = lua.create_table()?;
    info.set("position", loaded.position)?;
    info.set("path", ctx(lua).loader.display_path(&loaded.path))?;
    let mtime = loaded
        .mtime
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    info.set("mtime", mtime)?;
    Ok(info)
}

/// `stage.load(name [, f])` and `stage.require(name [, f])`.
async fn load(lua: Lua, name: String, f: Option<Function>, reload: bool) -> mlua::Result<MultiValue> {
    let (file, id) = split_name(&name);
    let c = ctx(&lua);
    let result = c.loader.load(&lua, file, reload).await;
    let (value, info) = match result {
        Ok(loaded) => (pick(&lua, &loaded, id)?, info_table(&lua, &loaded)?),
        Err(e) if f.is_none() => return Err(e.into()),
        Err(e) => {
            let info = lua.create_table()?;
            info.set("file", file)?;
            info.set("id", id)?;
            info.set(
                "error",
                match e {
                    LoadError::NotFound(..) => "not found".to_string(),
                    other => other.to_string(),
                },
            )?;
            (Value::Nil, info)
        }
    };
    match f {
        Some(f) => f.call_async((value, info)).await,
        None => Ok(MultiValue::from_iter([value, Value::Table(info)])),
    }
}

/// `stage.call(f, args, ...)`: `f` is a function or a script name as in `stage.load`.
async fn call(
    lua: Lua,
    (f, args, rest): (Value, Option<Table>, Variadic<Value>),
) -> mlua::Result<MultiValue> {
    let func = match f {
        Value::Function(f) => f,
        Value::String(s) => {
            let name = s.to_str()?.to_string();
            let (file, id) = split_name(&name);
            let loaded = ctx(&lua).loader.load(&lua, file, true).await?;
            match pick(&lua, &loaded, id)? {
                Value::Function(f) => f,
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "stage.call: script \"{name}\" gave a {}, not a function",
                        other.type_name()
                    )))
                }
            }
        }
        other => {
            return Err(mlua::Error::runtime(format!(
                "stage.call: expected a function or a script name, got a {}",
                other.type_name()
            )))
        }
    };
    let mut all: Vec<Value> = match args {
        Some(t) => t.sequence_values::<Value>().collect::<mlua::Result<_>>()?,
        None => vec![],
    };
    all.extend(rest);
    func.call_async(MultiValue::from_iter(all)).await
}

/// `stage.addtask(ms, f, ...)` → handle; `stage.addtask(handle, nil)` cancels.
fn addtask(lua: &Lua, (first, f, args): (Value, Option<Function>, MultiValue)) -> mlua::Result<Value> {
    let c = ctx(lua);
    let Some(f) = f else {
        let handle = convert::integer("stage.addtask(handle, nil): handle", &first)?;
        return Ok(Value::Boolean(c.cancel_task(handle)));
    };
    let ms = match first {
        Value::Integer(i) => i as f64,
        Value::Number(n) => n,
        other => {
            return Err(mlua::Error::runtime(format!(
                "stage.addtask: expected milliseconds, got a {}",
                other.type_name()
            )))
        }
    };
    let delay = convert::delay("stage.addtask(ms, f)", ms, Unit::Millis)?;
    Ok(Value::Integer(c.add_task(lua, delay, f, args)))
}

/// A `submit` key: `0`/nil/false mean "no restriction".
pub fn submit_key(v: &Value) -> mlua::Result<Option<String>> {
    Ok(match v {
        Value::Nil | Value::Boolean(false) => None,
        Value::Integer(0) => None,
        Value::Number(n) if *n == 0.0 => None,
        Value::Integer(i) => Some(i.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(format!("s:{}", s.to_str()?)),
        other => {
            return Err(mlua::Error::runtime(format!(
                "stage.submit: key must be a number or a string, got a {}",
                other.type_name()
            )))
        }
    })
}

/// `stage.submit(key, f, ...)`.
fn submit(lua: &Lua, (key, f, args): (Value, Function, MultiValue)) -> mlua::Result<()> {
    let key = submit_key(&key)?;
    ctx(lua).submit(lua, key, f, args);
    Ok(())
}
