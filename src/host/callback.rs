//! The one way Lua code is run by the host: every callback (timers, sockets, messages,
//! script loads) runs as a coroutine under `xpcall` with the instance's error handler, and
//! an error is logged with its traceback and affects only that callback.

use crate::host::context::ctx;
use crate::host::script_error;
use mlua::{Function, IntoLuaMulti, Lua, MultiValue, Value};
use tokio::task::spawn_local;

const XPCALL_RUNNER: &str = "stage.xpcall";
const ERROR_HANDLER: &str = "stage.error_handler";
const RAW_XPCALL: &str = "stage.raw_xpcall";

/// `function(f, ...) return xpcall(f, error_handler, ...) end`, created once per state.
pub fn xpcall_runner(lua: &Lua) -> mlua::Result<Function> {
    lua.named_registry_value(XPCALL_RUNNER)
}

/// The message handler every callback runs under: the error as text (Rust errors
/// included) followed by the traceback, without the runner's own frames.
pub fn error_handler(lua: &Lua) -> mlua::Result<Function> {
    lua.named_registry_value(ERROR_HANDLER)
}

/// Lua's own `xpcall`, before the wrapper scripts see (which costs a closure per call);
/// for hot paths that pass `error_handler` themselves.
pub fn raw_xpcall(lua: &Lua) -> mlua::Result<Function> {
    lua.named_registry_value(RAW_XPCALL)
}

pub(crate) fn install_runner(lua: &Lua) -> mlua::Result<()> {
    // Errors raised by Rust functions reach Lua as userdata; `pcall` and `xpcall` hand
    // script authors their message as a string instead, as plain Lua would.
    let errmsg = lua.create_function(|lua, v: Value| match v {
        Value::Error(e) => lua.create_string(script_error::message(&e)).map(Value::String),
        other => Ok(other),
    })?;
    let raw_xpcall_fn = lua.globals().get::<Function>("xpcall")?;
    let (runner, handler): (Function, Function) = lua
        .load(
            r#"
            local errmsg, raw_pcall, raw_xpcall = ...
            local traceback, tostring = debug.traceback, tostring
            local function fix(ok, ...)
                if ok then return ok, ... end
                return false, errmsg((...))
            end
            pcall = function(f, ...) return fix(raw_pcall(f, ...)) end
            xpcall = function(f, h, ...)
                return raw_xpcall(f, function(e) return h(errmsg(e)) end, ...)
            end
            local function handler(e)
                local msg = tostring(errmsg(e))
                if not msg:find("stack traceback:", 1, true) then msg = traceback(msg, 2) end
                -- The frames of the runner are noise to the script author.
                return (msg:gsub("\n%s*%[C%]: in %a+ 'xpcall'.*$", ""))
            end
            return function(f, ...) return raw_xpcall(f, handler, ...) end, handler
            "#,
        )
        .set_name("=stage")
        .call((
            errmsg,
            lua.globals().get::<Function>("pcall")?,
            raw_xpcall_fn.clone(),
        ))?;
    lua.set_named_registry_value(XPCALL_RUNNER, runner)?;
    lua.set_named_registry_value(ERROR_HANDLER, handler)?;
    lua.set_named_registry_value(RAW_XPCALL, raw_xpcall_fn)
}

/// Runs `f(args)` as a coroutine; on error, logs `what` with the message and traceback
/// and returns `None`. An error never propagates: it affects only this callback.
pub async fn call_callback(
    lua: &Lua,
    what: &str,
    f: &Function,
    args: impl IntoLuaMulti,
) -> Option<MultiValue> {
    let runner = match xpcall_runner(lua) {
        Ok(runner) => runner,
        Err(e) => {
            log::error!(target: &ctx(lua).name, "error in {what}: {}", script_error::format(&e));
            return None;
        }
    };
    let mut all = args.into_lua_multi(lua).ok()?;
    all.push_front(Value::Function(f.clone()));
    run_callback(lua, what, &runner, all).await
}

/// `call_callback` for hot paths: `runner` is `xpcall_runner(lua)`, fetched once, and
/// `f_args` is the function followed by its arguments.
pub async fn run_callback(
    lua: &Lua,
    what: &str,
    runner: &Function,
    f_args: MultiValue,
) -> Option<MultiValue> {
    let result = runner.call_async::<MultiValue>(f_args).await;
    match result {
        Ok(mut rets) => match rets.pop_front() {
            Some(Value::Boolean(true)) => Some(rets),
            _ => {
                let msg = rets
                    .pop_front()
                    .and_then(|v| v.to_string().ok())
                    .unwrap_or_else(|| "unknown error".into());
                log::error!(target: &ctx(lua).name, "error in {what}: {msg}");
                None
            }
        },
        Err(e) => {
            log::error!(target: &ctx(lua).name, "error in {what}: {}", script_error::format(&e));
            None
        }
    }
}

/// Spawns `f(args)` as a callback on this instance.
pub fn spawn_callback(lua: &Lua, what: String, f: Function, args: MultiValue) {
    let lua = lua.clone();
    spawn_local(async move {
        call_callback(&lua, &what, &f, args).await;
    });
}
