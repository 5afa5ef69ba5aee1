//! The `densefog` library (docs/densefog.md): Lua source shipped in the binary and offered to
//! every state as `require("densefog")` through `package.preload`, so it costs nothing until
//! a script asks for it. It is plain Lua over `odbc`, `stage`, `bundle`, `broker` and `logger`.

use mlua::{Lua, Table};

/// The library's source, `src/lua/densefog.lua`.
pub const SOURCE: &str = include_str!("densefog.lua");

/// Registers `package.preload.densefog`.
pub fn preload(lua: &Lua) -> mlua::Result<()> {
    let preload: Table = lua.globals().get::<Table>("package")?.get("preload")?;
    let loader =
        lua.create_function(|lua, ()| lua.load(SOURCE).set_name("@densefog.lua").call::<mlua::Value>(()))?;
    preload.set("densefog", loader)
}
