//! The one place that turns Lua errors into text for people: message first, then the
//! traceback, with chunk names that are file paths relative to the stage home.

use mlua::Error;

/// Formats an error raised by Lua or by a Rust callback called from Lua.
///
/// mlua wraps errors that pass through Rust callbacks in `CallbackError` (one per crossing);
/// those layers are unwrapped so the person reading the log sees the original message once,
/// followed by the innermost traceback.
pub fn format(err: &Error) -> String {
    match err {
        Error::SyntaxError { message, .. } => message.clone(),
        Error::RuntimeError(msg) => msg.clone(),
        Error::CallbackError { cause, traceback } => {
            let inner = format(cause);
            if inner.contains("stack traceback:") {
                inner
            } else {
                format!("{inner}\n{traceback}")
            }
        }
        Error::WithContext { context, cause } => format!("{context}: {}", format(cause)),
        other => other.to_string(),
    }
}

/// The message alone, without mlua's wrapping and without a traceback: what `pcall`
/// returns to a script.
pub fn message(err: &Error) -> String {
    match err {
        Error::SyntaxError { message, .. } => message.clone(),
        Error::RuntimeError(msg) => msg.clone(),
        Error::CallbackError { cause, .. } => message(cause),
        Error::WithContext { context, cause } => format!("{context}: {}", message(cause)),
        Error::ExternalError(e) => e.to_string(),
        other => other.to_string(),
    }
}

/// Extracts `(file, line)` from a message that starts with `file:line:`, as Lua writes them.
pub fn location(message: &str) -> Option<(String, usize)> {
    let first = message.lines().next()?;
    // Skip an mlua prefix such as "syntax error: " or "runtime error: ".
    let first = first
        .strip_prefix("syntax error: ")
        .or_else(|| first.strip_prefix("runtime error: "))
        .unwrap_or(first);
    let mut parts = first.splitn(3, ':');
    let file = parts.next()?.trim();
    let line = parts.next()?.trim().parse::<usize>().ok()?;
    parts.next()?;
    if file.is_empty() {
        return None;
    }
    Some((file.to_string(), line))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlua::Lua;

    #[test]
    fn syntax_error_names_file_and_line() {
        let lua = Lua::new();
        let err = lua
            .load("local x = \n x +")
            .set_name("@package/bad.lua")
            .exec()
            .unwrap_err();
        let text = format(&err);
        assert!(text.starts_with("package/bad.lua:2:"), "{text}");
        assert_eq!(location(&text), Some(("package/bad.lua".into(), 2)));
    }

    #[test]
    fn runtime_error_through_a_rust_callback_is_unwrapped_once() {
        let lua = Lua::new();
        let f = lua
            .create_function(|_, ()| -> mlua::Result<()> { Err(Error::runtime("boom")) })
            .unwrap();
        lua.globals().set("f", f).unwrap();
        let err = lua
            .load("local function g() f() end\ng()")
            .set_name("@start.lua")
            .exec()
            .unwrap_err();
        let text = format(&err);
        assert!(text.starts_with("boom"), "{text}");
        assert_eq!(text.matches("stack traceback:").count(), 1, "{text}");
        assert!(text.contains("start.lua:1"), "{text}");
    }

    #[test]
    fn error_in_lua_code_keeps_its_position() {
        let lua = Lua::new();
        let err = lua
            .load("\n\nerror('bad thing')")
            .set_name("@lib/m.lua")
            .exec()
            .unwrap_err();
        assert_eq!(location(&format(&err)), Some(("lib/m.lua".into(), 3)));
        assert_eq!(location("no location here"), None);
    }
}
