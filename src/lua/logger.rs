//! The `logger` module (alias `log4cxx`) and `print`, written through log4rs.

use crate::host::convert::IntoLuaErr;
use crate::host::ctx;
use crate::logging::{expand, log_env, parse_route, take_routes, Caller};
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
            lua.create_function(move |lua, args: Variadic<Value>| write(lua, level, args))?,
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

/// Whether a logger argument is a route (`%{=group}`, `%{=group:level}`) rather than a value.
fn is_route(v: &Value) -> bool {
    match v {
        Value::String(s) => {
            let b = s.as_bytes();
            b.starts_with(b"%{=") && b.ends_with(b"}")
        }
        _ => false,
    }
}

/// `logger.X(format, ...)`: the first argument is the format, whose escapes are expanded;
/// the other arguments are values written after it, tab-separated, as they are (never
/// expanded: a client's text passed as a value cannot pull the environment into the log).
/// The route `%{=group[:level]}` is found anywhere in the format, or as a whole argument
/// after it.
fn write(lua: &Lua, level: Level, args: Variadic<Value>) -> mlua::Result<()> {
    let c = ctx(lua);
    let mut args = args.into_iter();
    let msg = args.next().unwrap_or(Value::Nil);
    let mut text = msg.to_string()?;
    let mut route = None;
    if text.contains("%{=") {
        let (t, r) = take_routes(&text);
        text = t;
        route = r;
    }
    let mut values = vec![];
    for v in args {
        if is_route(&v) {
            route = Some(v.to_string()?);
        } else {
            values.push(v);
        }
    }
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
    let mut text = if text.contains('%') {
        let allowed = &c.node.config.logger_env;
        expand(&text, &caller(lua), |n| log_env(n, allowed))
    } else {
        text
    };
    for v in values {
        text.push('\t');
        text.push_str(&v.to_string()?);
    }
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
