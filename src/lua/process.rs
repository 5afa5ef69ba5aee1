//! The `process` module: what this process and instance are (`id`, `tick`, `args`, `stage`,
//! `node`), configuration and environment values (`process["$key"]`, `process["%ENV"]`),
//! the process title, and `process.exit` (ext).

use crate::host::ctx;
use mlua::{Lua, LuaSerdeExt, Table, Value};

pub fn open(lua: &Lua) -> mlua::Result<Table> {
    let c = ctx(lua);
    let t = lua.create_table()?;
    t.set("id", std::process::id())?;
    // As STAGE, from index 0: [0] is the program, then the arguments after `--`.
    let args = lua.create_sequence_from(c.node.args.iter().cloned())?;
    args.raw_set(0, std::env::args().next().unwrap_or_else(|| "stage".into()))?;
    t.set("args", args)?;
    t.set("stage", c.number)?;
    t.set(
        "exit",
        lua.create_function(|lua, code: Option<i32>| {
            ctx(lua).node.request_stop(code.unwrap_or(0));
            Ok(())
        })?,
    )?;
    let meta = lua.create_table()?;
    meta.set(
        "__index",
        lua.create_function(|lua, (_, key): (Table, String)| index(lua, &key))?,
    )?;
    meta.set(
        "__newindex",
        lua.create_function(|lua, (t, key, value): (Table, String, Value)| {
            if key == "title" {
                let title = value.to_string()?;
                set_title(&title);
                *ctx(lua).node.title.lock().expect("title") = title;
                Ok(())
            } else if let Some(name) = key.strip_prefix('%') {
                set_env(name, &value)
            } else if let Some(name) = key.strip_prefix('$') {
                set_config(lua, name, &value)
            } else {
                t.raw_set(key, value)
            }
        })?,
    )?;
    t.set_metatable(Some(meta))?;
    Ok(t)
}

/// Seconds on a monotonic clock, counted from the first reading in this process
/// (`process.clock`).
pub fn clock() -> f64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_secs_f64()
}

fn index(lua: &Lua, key: &str) -> mlua::Result<Value> {
    let c = ctx(lua);
    match key {
        // As STAGE: wall-clock seconds, with the milliseconds as the fraction.
        "tick" => Ok(Value::Number(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as f64 / 1000.0)
                .unwrap_or(0.0),
        )),
        // Ext: a monotonic clock for durations (never goes back, microseconds and finer).
        "clock" => Ok(Value::Number(clock())),
        "node" => lua.create_string(&c.node.node_name).map(Value::String),
        "title" => lua
            .create_string(c.node.title.lock().expect("title").as_str())
            .map(Value::String),
        k if k.starts_with('$') => {
            let name = &k[1..];
            let json = {
                let section = c.node.section.lock().expect("section");
                if name.is_empty() {
                    Some(section.clone())
                } else {
                    section
                        .get(name)
                        .or_else(|| crate::config::lookup_path(&c.node.config.raw, name))
                        .cloned()
                }
            };
            match json {
                Some(json) => lua.to_value_with(
                    &json,
                    mlua::SerializeOptions::new()
                        .serialize_none_to_null(true)
                        .serialize_unit_to_null(true),
                ),
                None => Ok(Value::Nil),
            }
        }
        k if k.starts_with('%') => match std::env::var_os(&k[1..]) {
            Some(v) => lua.create_string(v.as_encoded_bytes()).map(Value::String),
            None => Ok(Value::Nil),
        },
        _ => Ok(Value::Nil),
    }
}

/// `process["%NAME"] = v` sets the environment variable (nil removes it), as STAGE.
fn set_env(name: &str, value: &Value) -> mlua::Result<()> {
    if name.is_empty() || name.contains(['=', '\0']) {
        return Err(mlua::Error::runtime(format!(
            "process[\"%{name}\"]: invalid environment variable name"
        )));
    }
    match value {
        Value::Nil => std::env::remove_var(name),
        Value::String(_) | Value::Integer(_) | Value::Number(_) => {
            let v = value.to_string()?;
            if v.contains('\0') {
                return Err(mlua::Error::runtime(format!(
                    "process[\"%{name}\"]: the value contains a NUL byte"
                )));
            }
            std::env::set_var(name, v)
        }
        other => {
            return Err(mlua::Error::runtime(format!(
                "process[\"%{name}\"]: expected a string, a number or nil, got a {}",
                other.type_name()
            )))
        }
    }
    Ok(())
}

/// `process["$key"] = json` sets a key of the running configuration (every instance sees
/// it); `process["$"] = json` replaces the whole engine section, as STAGE.
fn set_config(lua: &Lua, name: &str, value: &Value) -> mlua::Result<()> {
    let Value::String(text) = value else {
        return Err(mlua::Error::runtime(format!(
            "process[\"${name}\"]: expected JSON text, got a {}",
            value.type_name()
        )));
    };
    let json: serde_json::Value = serde_json::from_slice(&text.as_bytes())
        .map_err(|e| mlua::Error::runtime(format!("process[\"${name}\"]: invalid JSON: {e}")))?;
    let c = ctx(lua);
    let mut section = c.node.section.lock().expect("section");
    if name.is_empty() {
        if !json.is_object() {
            return Err(mlua::Error::runtime(
                "process[\"$\"]: expected a JSON object (the whole engine section)",
            ));
        }
        *section = json;
    } else if let serde_json::Value::Object(m) = &mut *section {
        m.insert(name.to_string(), json);
    }
    Ok(())
}

/// Sets the name `ps` shows (the kernel keeps 15 bytes of it).
fn set_title(title: &str) {
    let mut bytes: Vec<u8> = title.bytes().filter(|b| *b != 0).take(15).collect();
    bytes.push(b'\n');
    // The process's main thread is what `ps` names the process by.
    if let Err(e) = std::fs::write("/proc/self/comm", &bytes) {
        log::warn!("process.title: cannot set the process name: {e}");
    }
}
