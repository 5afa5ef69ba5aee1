//! Built-in stages of `#startup` (STAGE's engines), served in plain Rust without a Lua
//! state: each has a mailbox in the router like a Lua instance and speaks STAGE's message
//! protocol for its engine. `ticket.rs`: a bounded number of concurrent holders per
//! category with a FIFO wait queue; `route.rs`: subscriptions by id; `curl.rs`: HTTP
//! requests answered as messages; `index.rs`: ranked score tables.

pub mod curl;
pub mod index;
pub mod route;
pub mod ticket;

use crate::config::BuiltinSpec;
use crate::router::{Inbox, Kind, Message, Router, SenderInfo};
use crate::value::Value;
use std::sync::Arc;
use std::time::Instant;

/// Where a built-in stage sends its messages from (cheap to clone into tasks).
#[derive(Clone)]
pub struct Out {
    pub router: Arc<Router>,
    pub me: Arc<SenderInfo>,
}

impl Out {
    /// Sends message `id` to the instance at `to`; returns whether it got there.
    pub fn send(&self, to: &SenderInfo, id: String, values: Vec<Value>, kind: Kind) -> bool {
        let msg = Message {
            id,
            from: self.me.clone(),
            values,
            kind,
        };
        self.router.send_to_address(to, msg).is_ok()
    }
}

/// One built-in stage: a state machine fed with messages and the clock.
pub trait Builtin: Send {
    /// Handles one message addressed to the stage.
    fn handle(&mut self, msg: Message, out: &Out, now: Instant);
    /// Ends what timed out by `now`.
    fn expire(&mut self, out: &Out, now: Instant);
    /// When `expire` has work next.
    fn next_deadline(&self) -> Option<Instant>;
}

/// The built-in stage of `spec`, or why its settings are wrong.
pub fn new(spec: &BuiltinSpec) -> Result<Box<dyn Builtin>, String> {
    match spec.engine.as_str() {
        "ticket" => Ok(Box::new(ticket::Ticket::from_settings(
            &spec.stage_id,
            &spec.settings,
        )?)),
        "route" => Ok(Box::new(route::Route::new())),
        "curl" => Ok(Box::new(curl::Curl::from_settings(
            &spec.stage_id,
            &spec.settings,
        )?)),
        "index" => Ok(Box::new(index::Index::from_settings(
            &spec.stage_id,
            &spec.settings,
        )?)),
        other => Err(format!("engine \"{other}\" is not a built-in stage")),
    }
}

/// Serves `stage` (router member `number`) until `stop` turns true or its inbox closes.
pub async fn serve(
    router: Arc<Router>,
    number: usize,
    mut inbox: Inbox,
    mut stage: Box<dyn Builtin>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let out = Out {
        me: Arc::new(router.sender(number)),
        router: router.clone(),
    };
    loop {
        let deadline = stage.next_deadline();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = inbox.recv() => match msg {
                Some(msg) => stage.handle(msg, &out, Instant::now()),
                None => break,
            },
            () = sleep => stage.expire(&out, Instant::now()),
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    router.drain(&mut inbox, number);
}
