//! `stage`: a single binary that hosts Lua scripts for game and server logic.
//!
//! The map of the code is ARCHITECTURE.md; the Lua API is documented under docs/.

pub mod admin;
pub mod check;
pub mod cloud;
pub mod cluster;
pub mod config;
pub mod db;
pub mod home;
pub mod host;
pub mod lb_cli;
pub mod locks;
pub mod logging;
pub mod lua;
pub mod metrics;
pub mod net;
pub mod random;
pub mod router;
pub mod scaffold;
pub mod send;
pub mod stages;
pub mod usage;
pub mod value;
pub mod vultr_cli;
