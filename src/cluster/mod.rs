//! The cluster (`#cluster`): nodes that find each other over UDP and carry STAGE's messages
//! between them. `conf` reads the configuration, `auth` seals and opens every datagram
//! (HMAC-SHA256, key id, replay window), `frag` cuts and joins messages larger than a
//! datagram, `batch` packs the messages for one node into one datagram, `wire` is the byte
//! format of messages, `engine` is one node (membership by `foca`, routing table, direction
//! rule, fail-over chain, lock owners, per-destination outboxes) and `udp` its socket.
//! `ClusterRemote` plugs a node into the router (`router::Remote`). Plain Rust, no Lua.

pub mod auth;
pub mod batch;
pub mod conf;
pub mod engine;
pub mod frag;
#[cfg(test)]
mod sim;
pub mod udp;
pub mod wire;

pub use conf::ClusterConfig;
pub use engine::{
    defer_sends, flush_deferred, AdminReply, AdminSendError, Engine, Event, Sink, StageLoad, State,
};

use crate::router::{LockOp, Message, Remote, SenderInfo};
use crate::value::Value;
use std::sync::Arc;

/// The router's way to other nodes through a cluster engine.
pub struct ClusterRemote(pub Arc<Engine>);

impl Remote for ClusterRemote {
    fn deliver_one(&self, stage: &str, msg: Message) -> Result<(), Message> {
        self.0.deliver_one(stage, msg, false)
    }
    fn deliver_all(&self, stage: &str, msg: &Message) -> usize {
        self.0.deliver_all(stage, msg)
    }
    fn deliver_to(&self, to: &SenderInfo, msg: Message) -> Result<(), Message> {
        self.0.deliver_to(to, msg)
    }
    fn deliver_host(&self, stage: &str, msg: Message) -> Result<(), Message> {
        self.0.deliver_one(stage, msg, true)
    }
    fn forward_lock(&self, op: LockOp, name: &str, cb: &str, from: &SenderInfo, values: &[Value]) -> bool {
        self.0.forward_lock(op, name, cb, from, values)
    }
}
