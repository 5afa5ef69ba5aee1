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
    t.set("submit", lua.create_async_function(submit)?)?;
    t.set(
        "exit",
        lua.create_function(|lua, ()| {
            // STAGE's stage.exit() stops the whole process (SIGQUIT to its group).
            ctx(lua).node.request_stop(0);
            Ok(())
        })?,
    )?;
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

/// STAGE's info `{position, path, mtime}` (an array), with the same values also named.
fn info_table(lua: &Lua, loaded: &Loaded) -> mlua::Result<Table> {
    let info = lua.create_table()?;
    let path = ctx(lua).loader.display_path(&loaded.path);
    let mtime = loaded
        .mtime
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    info.raw_set(1, loaded.position)?;
    info.raw_set(2, path.clone())?;
    info.raw_set(3, mtime)?;
    info.set("position", loaded.position)?;
    info.set("path", path)?;
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
            // STAGE's failure info `{file, id}` (an array), also named, with the reason.
            let info = lua.create_table()?;
            info.raw_set(1, file)?;
            info.raw_set(2, id)?;
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

/// A function named like `stage.load`'s argument (`script+fn`).
async fn named_function(lua: &Lua, what: &str, name: &str) -> mlua::Result<Function> {
    let (file, id) = split_name(name);
    let loaded = ctx(lua).loader.load(lua, file, true).await?;
    match pick(lua, &loaded, id)? {
        Value::Function(f) => Ok(f),
        other => Err(mlua::Error::runtime(format!(
            "{what}: script \"{name}\" gave a {}, not a function",
            other.type_name()
        ))),
    }
}

/// Pushes `v` onto `out`, a table spread into its values as STAGE's `stage.call` does
/// (the sequence in order, then the other values).
fn spread(v: Value, out: &mut Vec<Value>) -> mlua::Result<()> {
    match v {
        Value::Table(t) => {
            let n = t.raw_len();
            for i in 1..=n {
                out.push(t.raw_get(i)?);
            }
            for pair in t.pairs::<Value, Value>() {
                let (k, v) = pair?;
                let in_seq = match k {
                    Value::Integer(i) => i >= 1 && (i as usize) <= n,
                    _ => false,
                };
                if !in_seq {
                    out.push(v);
                }
            }
            Ok(())
        }
        other => {
            out.push(other);
            Ok(())
        }
    }
}

/// `stage.call(f, ...)`: `f` is a function, a script name as in `stage.load`, or a table
/// `{f, a, b}`; every table argument is spread into its values (STAGE).
async fn call(lua: Lua, (f, rest): (Value, Variadic<Value>)) -> mlua::Result<MultiValue> {
    let mut all: Vec<Value> = vec![];
    let func = match f {
        Value::Function(f) => f,
        Value::String(s) => {
            let name = s.to_str()?.to_string();
            named_function(&lua, "stage.call", &name).await?
        }
        Value::Table(t) => {
            let mut items = vec![];
            spread(Value::Table(t), &mut items)?;
            let mut items = items.into_iter();
            let f = match items.next() {
                Some(Value::Function(f)) => f,
                Some(Value::String(s)) => {
                    let name = s.to_str()?.to_string();
                    named_function(&lua, "stage.call", &name).await?
                }
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "stage.call({{f, ...}}): expected a function first in the table, got {}",
                        other.map_or("nothing", |v| v.type_name())
                    )))
                }
            };
            all.extend(items);
            f
        }
        other => {
            return Err(mlua::Error::runtime(format!(
                "stage.call: expected a function, a script name or {{f, ...}}, got a {}",
                other.type_name()
            )))
        }
    };
    for v in rest {
        spread(v, &mut all)?;
    }
    func.call_async(MultiValue::from_iter(all)).await
}

/// `stage.addtask(ms, f, ...)` and `stage.addtask(f, ...)` (no delay) → handle;
/// `stage.addtask(handle, nil)` cancels; `stage.addtask(handle, ms [, f])` moves the next
/// run to `ms` from now (and replaces the function), as STAGE.
fn addtask(lua: &Lua, args: MultiValue) -> mlua::Result<Value> {
    let c = ctx(lua);
    let mut args = args.into_iter();
    let first = args.next().unwrap_or(Value::Nil);
    if let Value::Function(f) = first {
        return Ok(Value::Integer(c.add_task(
            lua,
            std::time::Duration::ZERO,
            f,
            args.collect(),
        )));
    }
    let second = args.next().unwrap_or(Value::Nil);
    match second {
        Value::Function(f) => {
            let ms = match first {
                Value::Integer(i) => i as f64,
                Value::Number(n) => n,
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "stage.addtask: expected milliseconds or a function, got a {}",
                        other.type_name()
                    )))
                }
            };
            let delay = convert::delay("stage.addtask(ms, f)", ms, Unit::Millis)?;
            Ok(Value::Integer(c.add_task(lua, delay, f, args.collect())))
        }
        Value::Nil => {
            let handle = convert::integer("stage.addtask(handle, nil): handle", &first)?;
            Ok(Value::Boolean(c.cancel_task(handle)))
        }
        Value::Integer(_) | Value::Number(_) => {
            let handle = convert::integer("stage.addtask(handle, ms): handle", &first)?;
            let ms = match second {
                Value::Integer(i) => i as f64,
                Value::Number(n) => n,
                _ => unreachable!(),
            };
            let delay = convert::delay("stage.addtask(handle, ms)", ms, Unit::Millis)?;
            let f = match args.next() {
                None | Some(Value::Nil) => None,
                Some(Value::Function(f)) => Some(f),
                Some(other) => {
                    return Err(mlua::Error::runtime(format!(
                        "stage.addtask(handle, ms, f): f must be a function, got a {}",
                        other.type_name()
                    )))
                }
            };
            Ok(Value::Boolean(c.reschedule_task(handle, delay, f)))
        }
        other => Err(mlua::Error::runtime(format!(
            "stage.addtask: expected (ms, f, ...), (f, ...), (handle, nil) or (handle, ms [, f]), \
             got a {} as argument 2",
            other.type_name()
        ))),
    }
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

/// `stage.submit(key, f, ...)`, `stage.submit(f, ...)` (no key) and
/// `stage.submit(key, "script+fn", ...)`.
async fn submit(lua: Lua, args: MultiValue) -> mlua::Result<()> {
    let mut args = args.into_iter();
    let first = args.next().unwrap_or(Value::Nil);
    let (key, f) = match first {
        Value::Function(f) => (None, f),
        key => {
            let key = submit_key(&key)?;
            let f = match args.next().unwrap_or(Value::Nil) {
                Value::Function(f) => f,
                Value::String(s) => {
                    let name = s.to_str()?.to_string();
                    named_function(&lua, "stage.submit", &name).await?
                }
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "stage.submit: expected a function or a script name (\"script+fn\") after the key, got a {}",
                        other.type_name()
                    )))
                }
            };
            (key, f)
        }
    };
    ctx(&lua).submit(&lua, key, f, args.collect());
    Ok(())
}
