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
    let (runner, handler): (Function, Function) = lua.load(HANDLER).set_name("=stage").call((
        errmsg,
        lua.globals().get::<Function>("pcall")?,
        raw_xpcall_fn.clone(),
        crate::host::budget::enter(lua)?,
        crate::host::budget::pause(lua)?,
    ))?;
    lua.set_named_registry_value(XPCALL_RUNNER, runner)?;
    lua.set_named_registry_value(ERROR_HANDLER, handler)?;
    lua.set_named_registry_value(RAW_XPCALL, raw_xpcall_fn)
}

/// The script-facing `pcall`/`xpcall` and the one error handler.
///
/// A Rust panic inside a binding reaches Lua as an error userdata whose payload mlua hands
/// back (re-panicking) the first time Rust converts it to a value; `errmsg` does that
/// conversion. So `message` reads the text with `tostring` first (mlua's `__tostring` of
/// the userdata gives a panic's message without consuming it) and runs `errmsg` only under
/// `pcall`, keeping the text when it fails. Nothing in `handler` can raise: an error in a
/// message handler would make Lua call the handler again, down to "C stack overflow".
const HANDLER: &str = r#"
local errmsg, raw_pcall, raw_xpcall, enter, pause = ...
local traceback, tostring, type, gsub = debug.traceback, tostring, type, string.gsub
-- Rust errors (mlua's error userdata) as their message, other values as they are.
-- Never raises.
local function value(e)
    if type(e) ~= "userdata" then return e end
    local ok, text = raw_pcall(tostring, e) -- a panic's message, before errmsg takes it
    local ok2, m = raw_pcall(errmsg, e)
    if ok2 and m ~= nil then return m end
    if ok and type(text) == "string" then return text end
    return "(error object is a userdata value)"
end
-- The text of any error value. Never raises.
local function message(e)
    if type(e) == "string" then return e end
    e = value(e)
    if type(e) == "string" then return e end
    local ok, text = raw_pcall(tostring, e)
    if ok and type(text) == "string" then return text end
    return "(error object is a " .. type(e) .. " value)"
end
-- `pause()` after a caught error: when it was the time budget's interruption, the callback
-- is preempted here (host/budget.rs); otherwise it returns at once.
local function fix(ok, ...)
    if ok then return ok, ... end
    pause()
    return false, value((...))
end
local function paused(ok, ...)
    if not ok then pause() end
    return ok, ...
end
pcall = function(f, ...) return fix(raw_pcall(f, ...)) end
-- When `h` itself raises, Lua calls the message handler again with the new error: that one
-- is returned as is instead of calling `h` again (plain Lua would recurse until "C stack
-- overflow").
xpcall = function(f, h, ...)
    local busy = false
    return paused(raw_xpcall(f, function(e)
        if busy then return value(e) end
        busy = true
        return h(value(e))
    end, ...))
end
-- Called by `handler` under pcall: level 4 of the traceback is the function that raised.
local function describe(e)
    local msg = message(e)
    if not msg:find("stack traceback:", 1, true) then msg = traceback(msg, 4) end
    -- The frames of the runner are noise to the script author.
    return (gsub(msg, "\n%s*%[C%]: in %a+ '[%w_]*xpcall'.*$", ""))
end
local function handler(e)
    local ok, msg = raw_pcall(describe, e)
    if ok then return msg end
    return message(e)
end
-- `enter` tells the time budget which coroutine runs the callback (host/budget.rs).
return function(f, ...) enter() return raw_xpcall(f, handler, ...) end, handler
"#;

/// Runs `f_args` (a function, then its arguments) under `runner` (`xpcall_runner(lua)`)
/// in the current coroutine: its return values, or the error's message with the script's
/// traceback. Every callback, script load and message handler of the host runs through
/// here.
pub async fn run_protected(runner: &Function, f_args: MultiValue) -> Result<MultiValue, String> {
    match crate::host::budget::timed(runner.call_async::<MultiValue>(f_args)).await {
        Ok(mut rets) => match rets.pop_front() {
            Some(Value::Boolean(true)) => Ok(rets),
            _ => Err(match rets.pop_front() {
                Some(Value::String(s)) => s.to_string_lossy(),
                Some(other) => format!("(error object is a {} value)", other.type_name()),
                None => "unknown error".into(),
            }),
        },
        Err(e) => Err(script_error::format(&e)),
    }
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
    match run_protected(runner, f_args).await {
        Ok(rets) => Some(rets),
        Err(msg) => {
            log_error(lua, what, &msg);
            None
        }
    }
}

thread_local! {
    /// The rate limit of repeated callback errors of the instance on this thread.
    static ERRORS: std::cell::RefCell<Option<crate::logging::FloodGate>> = const { std::cell::RefCell::new(None) };
}

/// Logs a callback's error, at most `#limits.errors` times per call site (the script line
/// that raised, else the message's first line) in 10 s; the rest are counted and told
/// with the next one logged.
pub fn log_error(lua: &Lua, what: &str, msg: &str) {
    let c = ctx(lua);
    c.node.metrics.handler_error(&c.name);
    let first = msg.lines().next().unwrap_or("");
    let site = match script_error::location(first) {
        Some((file, line)) => format!("{what}@{file}:{line}"),
        None => format!("{what}@{first}"),
    };
    let verdict = ERRORS.with(|g| {
        g.borrow_mut()
            .get_or_insert_with(|| {
                crate::logging::FloodGate::new(
                    std::time::Duration::from_secs(10),
                    c.node.config.limits.errors,
                )
            })
            .admit(&site, std::time::Instant::now())
    });
    match verdict {
        crate::logging::Verdict::Drop => {}
        crate::logging::Verdict::Log { suppressed: 0 } => {
            log::error!(target: &c.name, "error in {what}: {msg}")
        }
        crate::logging::Verdict::Log { suppressed } => log::error!(
            target: &c.name,
            "error in {what} (and {} more like it in the last 10 s): {msg}",
            crate::logging::thousands(suppressed)
        ),
    }
}

/// Spawns `f(args)` as a callback on this instance.
pub fn spawn_callback(lua: &Lua, what: String, f: Function, args: MultiValue) {
    let lua = lua.clone();
    spawn_local(async move {
        call_callback(&lua, &what, &f, args).await;
    });
}
