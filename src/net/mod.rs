//! The broker's networking core, free of Lua: framings (`framing`), a connection's read and
//! write buffers (`conn`), endpoint URIs (`uri`), STAGE-shaped addresses (`addr`), STAGE's
//! frame encryption (`crypto`) and socket setup with SO_REUSEPORT, IPv6 and multicast
//! (`sock`). `lua/broker.rs` drives connections with these and hands frames to scripts.

pub mod addr;
pub mod conn;
pub mod crypto;
pub mod framing;
pub mod http;
pub mod sock;
pub mod tls;
pub mod uri;
pub mod ws;
