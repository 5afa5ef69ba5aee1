//! The `logger` module (alias `log4cxx`) and `print`, written through log4rs.

use crate::host::convert::IntoLuaErr;
use crate::host::ctx;
use crate::logging::{expand, parse_route, Caller};
use log::Level;
use mlua::{Lua, Table, Value, Variadic};

pub fn open(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    for (name, level) in [
        ("out", Level::Info),
        ("info", Level::Info),
        ("warn", Level::Warn),
        ("error", Level::Error),
        ("trace", Level::Trace),
        ("debug", Level::Debug),
    ] {
        t.set(
            name,
            lua.create_function(move |lua, (msg, route): (Value, Option<String>)| {
                write(lua, level, msg, route)
            })?,
        )?;
    }
    Ok(t)
}

fn caller(lua: &Lua) -> Caller {
    // Level 0 is the logger function itself; level 1 is the Lua code that called it.
    lua.inspect_stack(1, |d| {
        let src = d.source();
        Caller {
            file: src.short_src.as_deref().unwrap_or("?").to_string(),
            function: d
                .names()
                .name
                .as_deref()
                .unwrap_or(if src.what == "main" { "main chunk" } else { "?" })
                .to_string(),
            line: d.current_line().unwrap_or(0),
        }
    })
    .unwrap_or_default()
}

fn write(lua: &Lua, level: Level, msg: Value, route: Option<String>) -> mlua::Result<()> {
    let c = ctx(lua);
    let (target, level) = match route {
        Some(r) => {
            let (group, lvl) = parse_route(&r).lua_err()?;
            (group.unwrap_or_else(|| c.name.clone()), lvl.unwrap_or(level))
        }
        None => (c.name.clone(), level),
    };
    if !log::log_enabled!(target: &target, level) {
        return Ok(());
    }
    let text = msg.to_string()?;
    let text = if text.contains('%') {
        expand(&text, &caller(lua), |n| std::env::var(n).ok())
    } else {
        text
    };
    log::log!(target: &target, level, "{text}");
    Ok(())
}

/// `print(...)` writes to the log at info, under the instance's name.
pub fn replace_print(lua: &Lua) -> mlua::Result<()> {
    let print = lua.create_function(|lua, args: Variadic<Value>| {
        let parts = args
            .iter()
            .map(|v| v.to_string())
            .collect::<mlua::Result<Vec<_>>>()?;
        log::info!(target: &ctx(lua).name, "{}", parts.join("\t"));
        Ok(())
    })?;
    lua.globals().set("print", print)
}
