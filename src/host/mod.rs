//! The host: the runtime every Lua binding stands on. It owns the instances (thread,
//! runtime, Lua state), the one way callbacks are run, timers and keyed work, script
//! loading, the blocking-work pool, and the node that ties them together.
//!
//! The floors read `main` → `lua/` → `host/` → core (`net/`, `router`, `db/`, `cloud/`,
//! `config`, `home`, ...): nothing here imports `lua/`. What the host needs from the
//! bindings (registering the modules in a new state, serving an instance's messages) it
//! receives as `Bindings` from the caller of `run::start`.

pub mod budget;
pub mod callback;
pub mod context;
pub mod control;
pub mod convert;
pub mod instance;
pub mod loader;
pub mod node;
pub mod reload;
pub mod run;
pub mod script_error;
pub mod tasks;
pub mod workers;

pub use callback::{call_callback, run_callback, spawn_callback};
pub use context::{ctx, InstanceCtx};
pub use node::NodeShared;

use mlua::Lua;
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

/// An instance's message inbox, shared between its serving task and its final drain.
pub type Inbox = Rc<RefCell<crate::router::Inbox>>;

/// A task of an instance that runs until its `LocalSet` is dropped.
pub type LocalTask = Pin<Box<dyn Future<Output = ()>>>;

/// What the host needs from the Lua bindings, handed to it from above.
#[derive(Clone, Copy)]
pub struct Bindings {
    /// Registers every Lua module in a new instance's state.
    pub register: fn(&Lua) -> mlua::Result<()>,
    /// The task that hands an instance's queued messages to its handlers.
    pub serve: fn(Lua, Inbox) -> LocalTask,
}
