//! The Lua modules, one file each, listed in one place. Each file has one
//! `open(lua) -> Table` entry point of thin glue over the core modules.

use crate::host::{Bindings, Inbox, LocalTask};
use mlua::{Lua, Table};

pub mod broker;
pub mod broker_http;
pub mod bson;
pub mod bundle;
pub mod cluster;
pub mod densefog;
pub mod lb;
pub mod logger;
pub mod messages;
pub mod odbc;
pub mod process;
pub mod stage;
pub mod thread;
pub mod value;
pub mod vultr;

/// A module's constructor.
type Open = fn(&Lua) -> mlua::Result<Table>;

/// Every module: its global name and its constructor.
const MODULES: &[(&str, Open)] = &[
    ("stage", stage::open),
    ("process", process::open),
    ("logger", logger::open),
    ("bundle", bundle::open),
    ("vultr", vultr::open),
    ("broker", broker::open),
    ("odbc", odbc::open),
    ("thread", thread::open),
    ("lb", lb::open),
    ("cluster", cluster::open),
];

/// Registers every module as a global and in `package.loaded`, so that both
/// `stage.load(...)` and `local stage = require("stage")` work.
pub fn register_all(lua: &Lua) -> mlua::Result<()> {
    let loaded: Table = lua.globals().get::<Table>("package")?.get("loaded")?;
    for (name, open) in MODULES {
        let module = open(lua)?;
        lua.globals().set(*name, module.clone())?;
        loaded.set(*name, module)?;
    }
    // STAGE's scripts call the logger by its log4cxx name.
    let logger: Table = lua.globals().get("logger")?;
    lua.globals().set("log4cxx", logger.clone())?;
    loaded.set("log4cxx", logger)?;
    logger::replace_print(lua)?;
    thread::install_sandbox(lua)?;
    if crate::host::ctx(lua).node.config.lua.compat {
        lua.load(include_str!("compat53.lua"))
            .set_name("=compat53")
            .exec()?;
    }
    densefog::preload(lua)?;
    Ok(())
}

/// What the host needs from the bindings: module registration and message serving.
pub fn bindings() -> Bindings {
    fn serve(lua: Lua, inbox: Inbox) -> LocalTask {
        Box::pin(messages::serve(lua, inbox))
    }
    Bindings {
        register: register_all,
        serve,
    }
}
