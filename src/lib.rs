//! `stage`: a single binary that hosts Lua scripts for game and server logic.
//!
//! The map of the code is ARCHITECTURE.md; the Lua API is documented under docs/.

pub mod check;
pub mod config;
pub mod home;
pub mod instance;
pub mod loader;
pub mod logging;
pub mod lua;
pub mod node;
pub mod random;
pub mod router;
pub mod scaffold;
pub mod script_error;
pub mod usage;
pub mod value;
