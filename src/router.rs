//! The message router of one node: message targets (`stage:msg=cb`, `*msg`, ...), the
//! handler lookup order, and delivery to the bounded queue (mailbox) of each stage
//! instance with round-robin that skips full queues. Plain Rust: the Lua side lives in
//! `lua/messages.rs`. Other nodes are reached through the `Remote` seam, which the cluster
//! plugs into; until then `NoRemote` delivers nowhere.

use crate::value::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// Who sent a message (`_WAITFOR[1]`).
#[derive(Debug, Clone, PartialEq)]
pub struct SenderInfo {
    pub node: String,
    pub stage: String,
    pub instance: usize,
}

/// The answer to a request: the handler's return values or a reason.
pub type Reply = Result<Vec<Value>, String>;

/// Where a handler's return values go.
#[derive(Debug)]
pub enum ReplyTo {
    /// A `stage.request` waiting in some instance.
    Request(oneshot::Sender<Reply>),
    /// `target=cb`: delivered as message `id` to one instance.
    Handler { instance: usize, id: String },
}

impl ReplyTo {
    /// A copy for one more receiver of a broadcast (only handler routes can be shared).
    fn share(&self) -> Option<ReplyTo> {
        match self {
            ReplyTo::Request(_) => None,
            ReplyTo::Handler { instance, id } => Some(ReplyTo::Handler {
                instance: *instance,
                id: id.clone(),
            }),
        }
    }
}

/// One message in flight.
#[derive(Debug)]
pub struct Message {
    /// The id handlers are looked up by (`stage:msg`, or `msg` within a stage).
    pub id: String,
    pub from: Arc<SenderInfo>,
    pub values: Vec<Value>,
    pub reply: Option<ReplyTo>,
}

/// How a target reaches instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `:msg`: the calling instance, synchronously.
    Sync,
    /// `stage:msg` / `msg`: one instance; local first, then other nodes.
    One,
    /// `=stage:msg`: one instance in this process.
    Local,
    /// `+stage:msg`: one instance on another node.
    Remote,
    /// `*stage:msg` / `*msg`: every instance, on every node.
    All,
}

/// A parsed `stage.signal` / `stage.request` target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub scope: Scope,
    /// The stage id the message goes to.
    pub stage: String,
    /// The message id delivered (what handlers are looked up by).
    pub id: String,
    /// `=cb`: the handler in the sender that receives the return values.
    pub reply: Option<String>,
}

/// Why a target string is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid message target \"{target}\": {reason}")]
pub struct TargetError {
    pub target: String,
    pub reason: &'static str,
}

impl Target {
    /// Parses `target` as sent by an instance of `own_stage` (API.md §4).
    pub fn parse(target: &str, own_stage: &str) -> Result<Target, TargetError> {
        let err = |reason| TargetError {
            target: target.to_string(),
            reason,
        };
        let (scope, rest) = match target.as_bytes().first() {
            Some(b':') => (Scope::Sync, &target[1..]),
            Some(b'*') => (Scope::All, &target[1..]),
            Some(b'=') => (Scope::Local, &target[1..]),
            Some(b'+') => (Scope::Remote, &target[1..]),
            Some(_) => (Scope::One, target),
            None => return Err(err("empty")),
        };
        let (body, reply) = match rest.split_once('=') {
            Some((_, "")) => return Err(err("empty reply handler after '='")),
            Some((b, cb)) => (b, Some(cb.to_string())),
            None => (rest, None),
        };
        let (stage, id) = if let Some((stage, msg)) = body.split_once(':') {
            if stage.is_empty() {
                return Err(err("empty stage id before ':'"));
            }
            (stage.to_string(), format!("{stage}:{msg}"))
        } else if let Some((stage, msg)) = body.split_once('+') {
            // `stage+msg` is delivered as the sender's own id `<sender_stage>:msg`.
            if stage.is_empty() {
                return Err(err("empty stage id before '+'"));
            }
            (stage.to_string(), format!("{own_stage}:{msg}"))
        } else {
            (own_stage.to_string(), body.to_string())
        };
        if id.is_empty() {
            return Err(err("empty message id"));
        }
        if scope == Scope::Sync && body.contains(':') {
            return Err(err("':msg' names a handler of the calling instance, not a stage"));
        }
        Ok(Target {
            scope,
            stage,
            id,
            reply,
        })
    }
}

/// The handler ids tried for message `id`, in order: `a:b.c.d`, `a:b.c.`, `a:b.`, `a:`.
pub fn lookup_order(id: &str) -> Vec<&str> {
    let mut out = vec![id];
    let start = id.find(':').map_or(0, |i| i + 1);
    // Prefixes ending at each '.' after the stage part, longest first.
    let tail = &id[start..];
    let body = tail.strip_suffix('.').unwrap_or(tail);
    for (i, _) in body.rmatch_indices('.') {
        out.push(&id[..start + i + 1]);
    }
    if start > 0 && id.len() > start {
        out.push(&id[..start]);
    }
    out
}

/// Finds the first registered handler for message `id` in lookup order.
pub fn lookup<'m, H>(handlers: &'m HashMap<String, H>, id: &str) -> Option<(&'m str, &'m H)> {
    // The exact id is the common case: found without building the list.
    if let Some((k, h)) = handlers.get_key_value(id) {
        return Some((k.as_str(), h));
    }
    lookup_order(id)
        .into_iter()
        .skip(1)
        .find_map(|k| handlers.get_key_value(k).map(|(k, h)| (k.as_str(), h)))
}

/// The seam for other nodes: the cluster implements it; `NoRemote` until then.
pub trait Remote: Send + Sync {
    /// Delivers to one instance of `stage` on another node, or gives the message back.
    fn deliver_one(&self, stage: &str, msg: Message) -> Result<(), Message>;
    /// Delivers a copy to every instance of `stage` on other nodes; returns how many.
    fn deliver_all(&self, stage: &str, msg: &Message) -> usize;
}

/// No other nodes: nothing is delivered.
pub struct NoRemote;

impl Remote for NoRemote {
    fn deliver_one(&self, _stage: &str, msg: Message) -> Result<(), Message> {
        Err(msg)
    }
    fn deliver_all(&self, _stage: &str, _msg: &Message) -> usize {
        0
    }
}

/// Why a message was not delivered; the message comes back so its reply route can be told.
#[derive(Debug)]
pub enum Undelivered {
    /// No instance (here or, for remote scopes, elsewhere) has the stage id.
    NoRoute(Message),
    /// Every instance's queue is full.
    Full(Message),
}

impl Undelivered {
    pub fn reason(&self) -> &'static str {
        match self {
            Undelivered::NoRoute(_) => "no route",
            Undelivered::Full(_) => "queue full",
        }
    }
    pub fn into_message(self) -> Message {
        match self {
            Undelivered::NoRoute(m) | Undelivered::Full(m) => m,
        }
    }
}

/// The instances of one stage id and its round-robin cursor.
struct Group {
    members: Vec<usize>,
    next: AtomicUsize,
}

/// The receiving end of an instance's mailbox.
pub type Inbox = mpsc::Receiver<Message>;

/// Every instance of this node, its mailbox and the way to other nodes.
pub struct Router {
    node: String,
    mailboxes: Vec<mpsc::Sender<Message>>,
    stages: Vec<String>,
    groups: HashMap<String, Group>,
    /// Each instance takes its inbox once, when it starts.
    inboxes: Mutex<Vec<Option<Inbox>>>,
    remote: Box<dyn Remote>,
    next_id: AtomicU64,
    started: Instant,
    /// Seconds since `started` at which "queue full" was last logged (rate limit).
    full_logged: AtomicU64,
}

impl Router {
    /// A router for instances `0..stages.len()` (instance `i` has stage id `stages[i]`),
    /// each with a queue of `queue` messages.
    pub fn new(node: &str, stages: &[String], queue: usize, remote: Box<dyn Remote>) -> Router {
        let mut groups: HashMap<String, Group> = HashMap::new();
        let mut mailboxes = vec![];
        let mut inboxes = vec![];
        for (i, s) in stages.iter().enumerate() {
            let (tx, rx) = mpsc::channel(queue.max(1));
            mailboxes.push(tx);
            inboxes.push(Some(rx));
            groups
                .entry(s.clone())
                .or_insert_with(|| Group {
                    members: vec![],
                    next: AtomicUsize::new(0),
                })
                .members
                .push(i);
        }
        Router {
            node: node.to_string(),
            mailboxes,
            stages: stages.to_vec(),
            groups,
            inboxes: Mutex::new(inboxes),
            remote,
            next_id: AtomicU64::new(0),
            started: Instant::now(),
            full_logged: AtomicU64::new(u64::MAX),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The sender info of instance `number`.
    pub fn sender(&self, number: usize) -> SenderInfo {
        SenderInfo {
            node: self.node.clone(),
            stage: self.stages.get(number).cloned().unwrap_or_default(),
            instance: number,
        }
    }

    /// The inbox of instance `number`; `None` if already taken.
    pub fn take_inbox(&self, number: usize) -> Option<Inbox> {
        self.inboxes.lock().expect("inboxes").get_mut(number)?.take()
    }

    /// A process-unique number (generated handler ids).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Sends to one instance's queue without waiting.
    pub fn send_to(&self, instance: usize, msg: Message) -> Result<(), Undelivered> {
        let Some(tx) = self.mailboxes.get(instance) else {
            return Err(Undelivered::NoRoute(msg));
        };
        tx.try_send(msg).map_err(|e| match e {
            mpsc::error::TrySendError::Full(m) => {
                self.log_full(&self.stages[instance]);
                Undelivered::Full(m)
            }
            mpsc::error::TrySendError::Closed(m) => Undelivered::NoRoute(m),
        })
    }

    /// Delivers `msg` per `scope` to instances of `stage`; returns how many took it.
    /// `Scope::Sync` is handled by the caller (it never leaves the instance).
    pub fn deliver(&self, scope: Scope, stage: &str, msg: Message) -> Result<usize, Undelivered> {
        match scope {
            Scope::All => {
                let mut n = 0;
                if let Some(g) = self.groups.get(stage) {
                    for &i in &g.members {
                        let copy = Message {
                            id: msg.id.clone(),
                            from: msg.from.clone(),
                            values: msg.values.clone(),
                            reply: msg.reply.as_ref().and_then(ReplyTo::share),
                        };
                        if self.send_to(i, copy).is_ok() {
                            n += 1;
                        }
                    }
                }
                n += self.remote.deliver_all(stage, &msg);
                Ok(n)
            }
            Scope::Remote => self
                .remote
                .deliver_one(stage, msg)
                .map(|()| 1)
                .map_err(Undelivered::NoRoute),
            Scope::One | Scope::Local | Scope::Sync => {
                let msg = match self.deliver_local(stage, msg) {
                    Ok(()) => return Ok(1),
                    Err(u) if scope == Scope::Local => return Err(u),
                    Err(u) => u,
                };
                // Local instances could not take it: other nodes (then the fail-over node).
                match msg {
                    Undelivered::NoRoute(m) => self
                        .remote
                        .deliver_one(stage, m)
                        .map(|()| 1)
                        .map_err(Undelivered::NoRoute),
                    Undelivered::Full(m) => self
                        .remote
                        .deliver_one(stage, m)
                        .map(|()| 1)
                        .map_err(Undelivered::Full),
                }
            }
        }
    }

    /// Round-robin over the local instances of `stage`, skipping full queues.
    fn deliver_local(&self, stage: &str, mut msg: Message) -> Result<(), Undelivered> {
        let Some(g) = self.groups.get(stage) else {
            return Err(Undelivered::NoRoute(msg));
        };
        let n = g.members.len();
        let start = g.next.fetch_add(1, Ordering::Relaxed);
        let mut any_open = false;
        for k in 0..n {
            let i = g.members[(start + k) % n];
            match self.mailboxes[i].try_send(msg) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(m)) => {
                    any_open = true;
                    msg = m;
                }
                Err(mpsc::error::TrySendError::Closed(m)) => msg = m,
            }
        }
        if any_open {
            self.log_full(stage);
            Err(Undelivered::Full(msg))
        } else {
            Err(Undelivered::NoRoute(msg))
        }
    }

    /// Sends `reply` along its route; returns whether it got there. A handler route gets
    /// `nil, reason` in place of values when the reply is an error.
    pub fn reply(&self, to: ReplyTo, from: Arc<SenderInfo>, reply: Reply) -> bool {
        match to {
            ReplyTo::Request(tx) => tx.send(reply).is_ok(),
            ReplyTo::Handler { instance, id } => {
                let values = reply.unwrap_or_else(|why| vec![Value::Nil, Value::Str(why.into_bytes())]);
                let msg = Message {
                    id,
                    from,
                    values,
                    reply: None,
                };
                self.send_to(instance, msg).is_ok()
            }
        }
    }

    /// Closes instance `number`'s inbox and answers every queued message that wants a reply
    /// with `nil, "shutting down"`, so that no requester waits forever. Returns how many.
    pub fn drain(&self, inbox: &mut Inbox, number: usize) -> usize {
        inbox.close();
        let from = Arc::new(self.sender(number));
        let mut n = 0;
        while let Ok(msg) = inbox.try_recv() {
            if let Some(to) = msg.reply {
                self.reply(to, from.clone(), Err("shutting down".into()));
                n += 1;
            }
        }
        if n > 0 {
            log::info!(
                "{}#{number}: answered {n} queued message(s) with \"shutting down\"",
                self.stages[number]
            );
        }
        n
    }

    /// Logs a full queue at most once per second, so an overload does not flood the log.
    fn log_full(&self, stage: &str) {
        let now = self.started.elapsed().as_secs();
        let last = self.full_logged.load(Ordering::Relaxed);
        if last != now
            && self
                .full_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log::warn!("message queue full: no instance of stage '{stage}' can take a message (dropped)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Target {
        Target::parse(s, "me").unwrap()
    }

    #[test]
    fn target_forms() {
        assert_eq!(
            t("msg"),
            Target {
                scope: Scope::One,
                stage: "me".into(),
                id: "msg".into(),
                reply: None
            }
        );
        assert_eq!(t(":msg").scope, Scope::Sync);
        assert_eq!(t(":msg").id, "msg");
        let x = t("db:load_user");
        assert_eq!(
            (x.scope, x.stage.as_str(), x.id.as_str()),
            (Scope::One, "db", "db:load_user")
        );
        let x = t("*stage:notice");
        assert_eq!(
            (x.scope, x.stage.as_str(), x.id.as_str()),
            (Scope::All, "stage", "stage:notice")
        );
        let x = t("*notice");
        assert_eq!(
            (x.scope, x.stage.as_str(), x.id.as_str()),
            (Scope::All, "me", "notice")
        );
        assert_eq!(t("=db:x").scope, Scope::Local);
        assert_eq!(t("+db:x").scope, Scope::Remote);
        let x = t("db:load_user=on_user");
        assert_eq!(
            (x.id.as_str(), x.reply.as_deref()),
            ("db:load_user", Some("on_user"))
        );
        let x = t("db+hello");
        assert_eq!((x.stage.as_str(), x.id.as_str()), ("db", "me:hello"));
        for bad in ["", "db:x=", ":db:x", ":", "*", "=:x"] {
            assert!(Target::parse(bad, "me").is_err(), "{bad}");
        }
        assert_eq!(
            Target::parse("db:x=", "me").unwrap_err().to_string(),
            "invalid message target \"db:x=\": empty reply handler after '='"
        );
    }

    #[test]
    fn lookup_order_walks_up_the_dots() {
        assert_eq!(lookup_order("a:b.c.d"), ["a:b.c.d", "a:b.c.", "a:b.", "a:"]);
        assert_eq!(lookup_order("a:b"), ["a:b", "a:"]);
        assert_eq!(lookup_order("a:b.c."), ["a:b.c.", "a:b.", "a:"]);
        assert_eq!(lookup_order("x.y"), ["x.y", "x."]);
        assert_eq!(lookup_order("x"), ["x"]);
        let mut h = HashMap::new();
        h.insert("a:".to_string(), 1);
        h.insert("a:b.".to_string(), 2);
        assert_eq!(lookup(&h, "a:b.c.d"), Some(("a:b.", &2)));
        assert_eq!(lookup(&h, "a:z"), Some(("a:", &1)));
        assert_eq!(lookup(&h, "q:z"), None);
    }

    fn msg(id: &str, v: i64) -> Message {
        Message {
            id: id.into(),
            from: Arc::new(SenderInfo {
                node: "n".into(),
                stage: "me".into(),
                instance: 0,
            }),
            values: vec![Value::Int(v)],
            reply: None,
        }
    }

    fn router(queue: usize) -> Router {
        let stages: Vec<String> = ["a", "b", "b", "b"].iter().map(|s| s.to_string()).collect();
        Router::new("n", &stages, queue, Box::new(NoRemote))
    }

    #[test]
    fn round_robin_skips_full_queues_and_never_blocks() {
        let r = router(2);
        let mut inboxes: Vec<_> = (0..4).map(|i| r.take_inbox(i).unwrap()).collect();
        for v in 0..6 {
            assert_eq!(r.deliver(Scope::One, "b", msg("b:x", v)).unwrap(), 1);
        }
        // 6 messages over 3 instances of 2 slots: every queue is full now.
        let u = r.deliver(Scope::One, "b", msg("b:x", 9)).unwrap_err();
        assert_eq!(u.reason(), "queue full");
        // Drain instance 2: it alone takes the next two.
        let got: Vec<_> = std::iter::from_fn(|| inboxes[2].try_recv().ok()).collect();
        assert_eq!(got.len(), 2);
        r.deliver(Scope::One, "b", msg("b:x", 10)).unwrap();
        r.deliver(Scope::One, "b", msg("b:x", 11)).unwrap();
        let got: Vec<_> = std::iter::from_fn(|| inboxes[2].try_recv().ok())
            .map(|m| m.values[0].clone())
            .collect();
        assert_eq!(got, [Value::Int(10), Value::Int(11)], "FIFO per instance");
        assert!(inboxes[0].try_recv().is_err(), "stage a never gets b's messages");
    }

    #[test]
    fn broadcast_no_route_and_remote_scopes() {
        let r = router(8);
        let mut inboxes: Vec<_> = (0..4).map(|i| r.take_inbox(i).unwrap()).collect();
        assert_eq!(r.deliver(Scope::All, "b", msg("b:all", 1)).unwrap(), 3);
        for inbox in inboxes.iter_mut().skip(1) {
            assert_eq!(inbox.try_recv().unwrap().id, "b:all");
        }
        assert_eq!(r.deliver(Scope::All, "zz", msg("zz:x", 1)).unwrap(), 0);
        assert_eq!(
            r.deliver(Scope::One, "zz", msg("zz:x", 1)).unwrap_err().reason(),
            "no route"
        );
        assert_eq!(
            r.deliver(Scope::Remote, "b", msg("b:x", 1)).unwrap_err().reason(),
            "no route"
        );
        assert_eq!(r.deliver(Scope::Local, "a", msg("a:x", 1)).unwrap(), 1);
        // A closed inbox (a stopped instance) is no route.
        drop(inboxes.remove(0));
        assert_eq!(
            r.deliver(Scope::Local, "a", msg("a:x", 1)).unwrap_err().reason(),
            "no route"
        );
    }

    #[test]
    fn remote_seam_gets_what_local_instances_cannot_take() {
        struct Count(AtomicUsize);
        impl Remote for Arc<Count> {
            fn deliver_one(&self, stage: &str, msg: Message) -> Result<(), Message> {
                if stage == "far" {
                    self.0.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                } else {
                    Err(msg)
                }
            }
            fn deliver_all(&self, _: &str, _: &Message) -> usize {
                2
            }
        }
        let c = Arc::new(Count(AtomicUsize::new(0)));
        let r = Router::new("n", &["a".to_string()], 4, Box::new(c.clone()));
        assert_eq!(r.deliver(Scope::One, "far", msg("far:x", 1)).unwrap(), 1);
        assert_eq!(r.deliver(Scope::Remote, "far", msg("far:x", 1)).unwrap(), 1);
        assert!(r.deliver(Scope::Local, "far", msg("far:x", 1)).is_err());
        assert_eq!(c.0.load(Ordering::SeqCst), 2);
        assert_eq!(r.deliver(Scope::All, "a", msg("a:x", 1)).unwrap(), 3);
    }

    #[test]
    fn drain_answers_queued_requests() {
        let r = router(8);
        let mut inbox = r.take_inbox(0).unwrap();
        let (tx, mut rx) = oneshot::channel();
        let mut m = msg("a:x", 1);
        m.reply = Some(ReplyTo::Request(tx));
        r.deliver(Scope::One, "a", m).unwrap();
        r.deliver(Scope::One, "a", msg("a:y", 2)).unwrap();
        assert_eq!(r.drain(&mut inbox, 0), 1);
        assert_eq!(rx.try_recv().unwrap(), Err("shutting down".to_string()));
        assert_eq!(
            r.deliver(Scope::One, "a", msg("a:z", 3)).unwrap_err().reason(),
            "no route"
        );
    }
}
