//! The `process` module: what this process and instance are (`id`, `tick`, `args`, `stage`,
//! `node`), configuration and environment values (`process["$key"]`, `process["%ENV"]`),
//! the process title, and `process.exit` (ext).

use crate::host::ctx;
use mlua::{Lua, LuaSerdeExt, Table, Value};

pub fn open(lua: &Lua) -> mlua::Result<Table> {
    let c = ctx(lua);
    let t = lua.create_table()?;
    t.set("id", std::process::id())?;
    t.set("args", lua.create_sequence_from(c.node.args.iter().cloned())?)?;
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
            } else {
                t.raw_set(key, value)
            }
        })?,
    )?;
    t.set_metatable(Some(meta))?;
    Ok(t)
}

fn index(lua: &Lua, key: &str) -> mlua::Result<Value> {
    let c = ctx(lua);
    match key {
        "tick" => Ok(Value::Number(c.node.started.elapsed().as_secs_f64())),
        "node" => lua.create_string(&c.node.node_name).map(Value::String),
        "title" => lua
            .create_string(c.node.title.lock().expect("title").as_str())
            .map(Value::String),
        k if k.starts_with('$') => match c.node.config.lookup(&k[1..]) {
            Some(json) => lua.to_value_with(
                json,
                mlua::SerializeOptions::new()
                    .serialize_none_to_null(true)
                    .serialize_unit_to_null(true),
            ),
            None => Ok(Value::Nil),
        },
        k if k.starts_with('%') => match std::env::var_os(&k[1..]) {
            Some(v) => lua.create_string(v.as_encoded_bytes()).map(Value::String),
            None => Ok(Value::Nil),
        },
        _ => Ok(Value::Nil),
    }
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
