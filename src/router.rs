//! The message router of one node, with STAGE's message model: target strings
//! (`db:load_user=cb`, `*msg`, `>LOCK.cb`, ...) rewritten at the sender into the id the
//! receiver looks up, the handler lookup order (ending at the catch-all `@`), delivery to the
//! bounded queue (mailbox) of each instance with round-robin that skips full queues, replies
//! addressed to the sending instance, and the ordered locks (`locks.rs`). Plain Rust: the Lua
//! side lives in `lua/messages.rs`. Other nodes are reached through the `Remote` seam, which
//! the cluster plugs into; until then `NoRemote` delivers nowhere.

use crate::locks::{Grant, LockTable, Waiter};
use crate::value::Value;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Who sent a message: the sending instance's address (`_WAITFOR[1]`) and stage (`_WAITFOR[2]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SenderInfo {
    pub node: String,
    pub stage: String,
    pub instance: usize,
}

impl SenderInfo {
    /// The address as scripts see it (`_WAITFOR[1]`): `"<instance>@<node>"`.
    pub fn address(&self) -> String {
        format!("{}@{}", self.instance, self.node)
    }
}

/// `"<instance>@<node>"` → `(node, instance)`.
pub fn parse_address(s: &str) -> Option<(&str, usize)> {
    let (i, node) = s.split_once('@')?;
    Some((node, i.parse().ok()?))
}

/// What a message is, and so how (and whether) it is answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// `stage.signal`: may be answered to the sender as message `cb`, or as the same id
    /// without `=cb`. `implicit`: the handler's return values are that answer (false for
    /// a message to the own stage without `=cb`, which would call the same handler again).
    Signal { cb: Option<String>, implicit: bool },
    /// `stage.request`: always answered, as message `cb` (the requester's pending id), with
    /// the return values or, when it cannot be handled, as `Failed`. `direct`: the way
    /// straight back to the waiting requester of this node (answers skip its mailbox).
    Request { cb: String, direct: Direct },
    /// An answer: never answered again.
    Reply,
    /// The answer to a request that could not be handled, with the reason.
    Failed(String),
}

/// The answer a waiting `stage.request` gets: values, or why there are none.
pub type Answer = Result<Vec<Value>, String>;

/// The direct way back to a `stage.request` waiting on this node: its answer goes straight
/// to the waiting coroutine instead of through the requester's mailbox and serve loop (one
/// task wake-up instead of two, no handler permit). Copies of the message share it and the
/// first answer takes it. It does not travel to other nodes: their answers come back as
/// messages to the request's `cb`.
#[derive(Clone, Default)]
pub struct Direct(Option<Arc<Mutex<Option<oneshot::Sender<Answer>>>>>);

impl Direct {
    /// A direct channel and the receiver the requester waits on.
    pub fn channel() -> (Direct, oneshot::Receiver<Answer>) {
        let (tx, rx) = oneshot::channel();
        (Direct(Some(Arc::new(Mutex::new(Some(tx))))), rx)
    }

    /// No direct channel (a request from another node, tests).
    pub fn none() -> Direct {
        Direct(None)
    }

    pub fn is_some(&self) -> bool {
        self.0.is_some()
    }

    /// Hands `answer` to the waiting requester: false when there is no channel, it was
    /// answered already, or the requester stopped waiting (timeout).
    pub fn send(&self, answer: Answer) -> bool {
        let Some(slot) = &self.0 else { return false };
        let tx = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        tx.is_some_and(|tx| tx.send(answer).is_ok())
    }
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Direct"
        } else {
            "Direct(none)"
        })
    }
}

/// Messages compare by what travels: the channel is not part of a message's content.
impl PartialEq for Direct {
    fn eq(&self, _: &Direct) -> bool {
        true
    }
}

/// One message in flight.
#[derive(Debug, Clone)]
pub struct Message {
    /// The id the receiver looks its handler up by (the target's stage prefix removed).
    pub id: String,
    pub from: Arc<SenderInfo>,
    pub values: Vec<Value>,
    pub kind: Kind,
}

impl Message {
    /// The id an answer to this message is delivered as, if it may be answered.
    pub fn answer_id(&self) -> Option<&str> {
        match &self.kind {
            Kind::Signal { cb, .. } => Some(cb.as_deref().unwrap_or(&self.id)),
            Kind::Request { cb, .. } => Some(cb),
            Kind::Reply | Kind::Failed(_) => None,
        }
    }

    /// `_WAITFOR[0]`: the id with the `=cb` the sender gave.
    pub fn shown_id(&self) -> String {
        match &self.kind {
            Kind::Signal { cb: Some(cb), .. } => format!("{}={cb}", self.id),
            _ => self.id.clone(),
        }
    }
}

/// How a target reaches instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `:msg`: the calling instance, synchronously.
    Sync,
    /// `msg`, `=msg`, `+msg`, `own_stage:msg`: queued to the sending instance.
    Own,
    /// `stage:msg`, `@msg`: one instance; local first, then other nodes.
    One,
    /// `=stage:msg`: one instance in this process.
    Local,
    /// `+stage:msg`: one instance on another node.
    Remote,
    /// `*stage:msg` / `*msg`: every instance, on every node.
    All,
}

/// The ordered-lock operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockOp {
    /// `>ID.cb`: wait for lock `ID`; message `cb` comes back when it is granted.
    Acquire,
    /// `>>ID.x, ms`: the holder extends its lease.
    Extend,
    /// `<ID.x`: the holder releases the lock.
    Release,
}

/// A parsed `stage.signal` / `stage.request` target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub scope: Scope,
    /// The stage ids the message goes to (a comma list gives several).
    pub stages: Vec<String>,
    /// The message id delivered (what the receiver looks handlers up by); for a lock, the
    /// lock's name.
    pub id: String,
    /// `=cb`: the handler in the sender that receives the answer; for `>ID.cb`, `cb`.
    pub reply: Option<String>,
    /// `>`, `>>`, `<`: an ordered-lock operation on lock `id`.
    pub lock: Option<LockOp>,
}

impl Target {
    /// True when the message stays with the own stage (no implicit answer without `=cb`).
    pub fn own(&self, own_stage: &str) -> bool {
        self.scope == Scope::Own || (self.stages.len() == 1 && self.stages[0] == own_stage)
    }
}

/// Why a target string is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid message target \"{target}\": {reason}")]
pub struct TargetError {
    pub target: String,
    pub reason: &'static str,
}

impl Target {
    /// Parses `target` as sent by an instance of `own_stage` (API.md §4, STAGE's rules).
    /// An empty message id (`"db:"`) is allowed: it sends a table of messages.
    pub fn parse(target: &str, own_stage: &str) -> Result<Target, TargetError> {
        let err = |reason| TargetError {
            target: target.to_string(),
            reason,
        };
        if let Some(lock) = Self::parse_lock(target) {
            let (op, name, cb) = lock.map_err(err)?;
            return Ok(Target {
                scope: Scope::One,
                stages: vec![],
                id: name.to_string(),
                reply: Some(cb.to_string()),
                lock: Some(op),
            });
        }
        let (scope, rest) = match target.as_bytes().first() {
            Some(b':') => (Scope::Sync, &target[1..]),
            Some(b'*') => (Scope::All, &target[1..]),
            Some(b'=') => (Scope::Local, &target[1..]),
            Some(b'+') => (Scope::Remote, &target[1..]),
            Some(b'@') => (Scope::One, &target[1..]),
            Some(_) => (Scope::One, target),
            None => return Err(err("empty")),
        };
        let routed_own = target.starts_with('@');
        let (body, reply) = match rest.split_once('=') {
            Some((_, "")) => return Err(err("empty reply handler after '='")),
            // `ticket:=category`: the id itself starts with '=' (a built-in stage's broadcast).
            Some((b, _)) if b.ends_with(':') && b.len() > 1 => (rest, None),
            Some((b, cb)) => (b, Some(cb.to_string())),
            None => (rest, None),
        };
        let (stages, id, named) = if let Some((stage, msg)) = body.split_once(':') {
            (stage, msg.to_string(), true)
        } else if let Some((stage, msg)) = body.split_once('+') {
            // `stage+msg` is delivered as the sender's own id `<sender_stage>:msg`.
            if stage.is_empty() {
                return Err(err("empty stage id before '+'"));
            }
            if msg.is_empty() {
                return Err(err("empty message id"));
            }
            (stage, format!("{own_stage}:{msg}"), true)
        } else {
            (own_stage, body.to_string(), false)
        };
        if named && (scope == Scope::Sync || routed_own) {
            return Err(err(if routed_own {
                "'@msg' names a message of the own stage, not a stage"
            } else {
                "':msg' names a handler of the calling instance, not a stage"
            }));
        }
        let stages: Vec<String> = stages.split(',').map(str::to_string).collect();
        if stages.iter().any(String::is_empty) {
            return Err(err("empty stage id before ':'"));
        }
        if id.is_empty() && !named {
            return Err(err("empty message id"));
        }
        // Naming no stage, or only one's own, keeps the message in the sending instance
        // (STAGE returns it to the sending process) — except for `*` and `@`.
        let scope = match scope {
            Scope::One | Scope::Local | Scope::Remote
                if !routed_own && stages.len() == 1 && stages[0] == own_stage =>
            {
                Scope::Own
            }
            s => s,
        };
        Ok(Target {
            scope,
            stages,
            id,
            reply,
            lock: None,
        })
    }

    /// `>ID.cb`, `>>ID.x`, `<ID.x` → (operation, ID, cb); `None` for other targets.
    fn parse_lock(target: &str) -> Option<Result<(LockOp, &str, &str), &'static str>> {
        let (op, rest) = if let Some(r) = target.strip_prefix(">>") {
            (LockOp::Extend, r)
        } else if let Some(r) = target.strip_prefix('>') {
            (LockOp::Acquire, r)
        } else if let Some(r) = target.strip_prefix('<') {
            (LockOp::Release, r)
        } else {
            return None;
        };
        Some(match rest.split_once('.') {
            Some(("", _)) | None => Err("expected \">ID.cb\", \">>ID.cb\" or \"<ID.*\""),
            Some((_, "")) if op == LockOp::Acquire => Err("empty message id after the lock name"),
            Some((name, cb)) => Ok((op, name, cb)),
        })
    }
}

/// The handler ids tried for message `id`, in order: `a:b.c.d`, `a:b.c.`, `a:b.`, `a:`,
/// then the catch-all `@`.
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
    if id != "@" {
        out.push("@");
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
    /// Delivers to the instance at `to` (an answer or a lock grant), or gives it back.
    fn deliver_to(&self, to: &SenderInfo, msg: Message) -> Result<(), Message> {
        let _ = to;
        Err(msg)
    }
    /// Delivers to one instance of `stage` in another process of this host (`=stage:msg`).
    fn deliver_host(&self, stage: &str, msg: Message) -> Result<(), Message> {
        let _ = stage;
        Err(msg)
    }
    /// Sends a lock operation to the node that owns lock `name`; false when this node owns
    /// it (the router's own table decides).
    fn forward_lock(&self, op: LockOp, name: &str, cb: &str, from: &SenderInfo, values: &[Value]) -> bool {
        let _ = (op, name, cb, from, values);
        false
    }
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

/// Why a message was not delivered; the message comes back so its sender can be told.
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

/// One instance's queue as `Router::queues` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStat {
    pub instance: usize,
    pub stage: String,
    pub depth: usize,
    pub capacity: usize,
    pub dropped: u64,
    /// False once the instance stopped (its inbox is closed).
    pub open: bool,
}

/// The instances of one stage id and its round-robin cursor.
struct Group {
    members: Vec<usize>,
    next: AtomicUsize,
}

/// One instance's mailbox in the table, with its stage id and drop count.
struct Slot {
    tx: mpsc::Sender<Message>,
    stage: String,
    /// Messages refused because the queue was full (metrics).
    dropped: AtomicU64,
}

/// The instance table deliveries read: slot `i` is instance `i` (`None` once it stopped;
/// numbers are never reused), and the instances of each stage id. Never changed in place:
/// an instance started or stopped at run time (`Router::add`, `Router::remove`) builds a
/// new table and swaps it in, so a delivery reads one snapshot without taking a lock
/// (`arc_swap`: no shared counter to bounce between instance threads; ARCHITECTURE.md).
#[derive(Clone, Default)]
struct Table {
    slots: Vec<Option<Arc<Slot>>>,
    groups: HashMap<String, Arc<Group>>,
}

impl Table {
    fn slot(&self, instance: usize) -> Option<&Slot> {
        self.slots.get(instance)?.as_deref()
    }
}

/// What stopping an instance found in its queue (`Router::drain_as`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drained {
    /// Queued requests answered with `nil, "shutting down"`.
    pub requests: usize,
    /// Queued signals and answers dropped (nobody waits for them).
    pub signals: usize,
}

/// The receiving end of an instance's mailbox.
pub type Inbox = mpsc::Receiver<Message>;

/// The mailboxes and the way out of this node: what the router and its lock timer share.
struct Post {
    node: String,
    table: ArcSwap<Table>,
    remote: Box<dyn Remote>,
    started: Instant,
    /// Seconds since `started` at which "queue full" was last logged (rate limit).
    full_logged: AtomicU64,
}

impl Post {
    fn send_to(&self, instance: usize, msg: Message) -> Result<(), Undelivered> {
        let t = self.table.load();
        match t.slot(instance) {
            Some(slot) => self.send_slot(slot, msg),
            None => Err(Undelivered::NoRoute(msg)),
        }
    }

    fn send_slot(&self, slot: &Slot, msg: Message) -> Result<(), Undelivered> {
        slot.tx.try_send(msg).map_err(|e| match e {
            mpsc::error::TrySendError::Full(m) => {
                slot.dropped.fetch_add(1, Ordering::Relaxed);
                self.log_full(&slot.stage);
                Undelivered::Full(m)
            }
            mpsc::error::TrySendError::Closed(m) => Undelivered::NoRoute(m),
        })
    }

    fn send_to_address(&self, to: &SenderInfo, msg: Message) -> Result<(), Undelivered> {
        if to.node == self.node {
            self.send_to(to.instance, msg)
        } else {
            self.remote.deliver_to(to, msg).map_err(Undelivered::NoRoute)
        }
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

/// The lock table of this node, with the thread that ends unrenewed leases.
struct Locks {
    table: Mutex<LockTable>,
    changed: Condvar,
    post: Arc<Post>,
    timer: OnceLock<()>,
}

impl Locks {
    /// Delivers `grant`; a holder that cannot be reached passes the lock on (as STAGE).
    fn deliver(&self, table: &mut LockTable, mut grant: Option<Grant>) {
        while let Some(g) = grant.take() {
            let msg = Message {
                id: g.cb,
                from: g.to.clone(),
                values: g.values,
                kind: Kind::Reply,
            };
            if let Err(u) = self.post.send_to_address(&g.to, msg) {
                log::warn!(
                    "lock '{}': its grant cannot reach {} ({}); the next waiter gets it",
                    g.name,
                    g.to.address(),
                    u.reason()
                );
                grant = table.unreachable(&g.name, Instant::now());
            }
        }
    }

    /// The lease timer: sleeps until the next lease ends and passes expired locks on.
    fn start_timer(self: &Arc<Self>) {
        self.timer.get_or_init(|| {
            let weak: Weak<Locks> = Arc::downgrade(self);
            let _ = std::thread::Builder::new()
                .name("stage-locks".into())
                .spawn(move || Locks::run_timer(weak));
        });
    }

    fn run_timer(weak: Weak<Locks>) {
        while let Some(locks) = weak.upgrade() {
            let mut table = locks.table.lock().expect("lock table");
            let now = Instant::now();
            for (name, holder, grant) in table.expire(now) {
                log::warn!(
                    "lock '{name}' released: the lease of {} (stage '{}') expired",
                    holder.address(),
                    holder.stage
                );
                locks.deliver(&mut table, grant);
            }
            // Wake up at the next deadline; without one, now and then to notice the router
            // is gone.
            let wait = table
                .next_deadline()
                .map_or(Duration::from_millis(500), |d| d.saturating_duration_since(now))
                .min(Duration::from_millis(500));
            drop(locks.changed.wait_timeout(table, wait).expect("lock table"));
        }
    }
}

/// Every instance of this node, its mailbox, its locks and the way to other nodes.
pub struct Router {
    post: Arc<Post>,
    /// Each instance takes its inbox once, when it starts. Held while the table changes,
    /// so that changes (rare, from the admin API) are made one at a time.
    inboxes: Mutex<HashMap<usize, Inbox>>,
    /// The bound of every queue.
    queue: usize,
    /// The number the next instance started at run time gets (never reused).
    next_instance: AtomicUsize,
    next_id: AtomicU64,
    locks: Arc<Locks>,
}

impl Router {
    /// A router for instances `0..stages.len()` (instance `i` has stage id `stages[i]`),
    /// each with a queue of `queue` messages.
    pub fn new(node: &str, stages: &[String], queue: usize, remote: Box<dyn Remote>) -> Router {
        let mut table = Table::default();
        let mut inboxes = HashMap::new();
        for (i, s) in stages.iter().enumerate() {
            let (tx, rx) = mpsc::channel(queue.max(1));
            inboxes.insert(i, rx);
            table.slots.push(Some(Arc::new(Slot {
                tx,
                stage: s.clone(),
                dropped: AtomicU64::new(0),
            })));
        }
        let mut groups: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, s) in stages.iter().enumerate() {
            groups.entry(s.clone()).or_default().push(i);
        }
        table.groups = groups
            .into_iter()
            .map(|(s, members)| {
                (
                    s,
                    Arc::new(Group {
                        members,
                        next: AtomicUsize::new(0),
                    }),
                )
            })
            .collect();
        let post = Arc::new(Post {
            node: node.to_string(),
            table: ArcSwap::from_pointee(table),
            remote,
            started: Instant::now(),
            full_logged: AtomicU64::new(u64::MAX),
        });
        Router {
            locks: Arc::new(Locks {
                table: Mutex::new(LockTable::default()),
                changed: Condvar::new(),
                post: post.clone(),
                timer: OnceLock::new(),
            }),
            post,
            inboxes: Mutex::new(inboxes),
            queue: queue.max(1),
            next_instance: AtomicUsize::new(stages.len()),
            next_id: AtomicU64::new(0),
        }
    }

    pub fn node(&self) -> &str {
        &self.post.node
    }

    /// The sender info of instance `number` (an empty stage id for a number not running).
    pub fn sender(&self, number: usize) -> SenderInfo {
        SenderInfo {
            node: self.post.node.clone(),
            stage: self
                .post
                .table
                .load()
                .slot(number)
                .map(|s| s.stage.clone())
                .unwrap_or_default(),
            instance: number,
        }
    }

    /// How many instances of `stage` this node has.
    pub fn members(&self, stage: &str) -> usize {
        self.post
            .table
            .load()
            .groups
            .get(stage)
            .map_or(0, |g| g.members.len())
    }

    /// The stage id of instance `number`, if it is in the table.
    pub fn stage_of(&self, number: usize) -> Option<String> {
        self.post.table.load().slot(number).map(|s| s.stage.clone())
    }

    /// The inbox of instance `number`; `None` if already taken.
    pub fn take_inbox(&self, number: usize) -> Option<Inbox> {
        self.inboxes.lock().expect("inboxes").remove(&number)
    }

    /// Adds an instance of `stage` at run time: a new number (never one used before), a
    /// queue of the same bound as the others (its inbox waits in `take_inbox`), and a place
    /// in the stage's round-robin. Returns the number.
    pub fn add(&self, stage: &str) -> usize {
        let mut inboxes = self.inboxes.lock().expect("inboxes");
        let id = self.next_instance.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.queue);
        inboxes.insert(id, rx);
        let mut t = Table::clone(&self.post.table.load());
        if t.slots.len() <= id {
            t.slots.resize(id + 1, None);
        }
        t.slots[id] = Some(Arc::new(Slot {
            tx,
            stage: stage.to_string(),
            dropped: AtomicU64::new(0),
        }));
        let old = t.groups.get(stage);
        let mut members = old.map(|g| g.members.clone()).unwrap_or_default();
        members.push(id);
        let next = AtomicUsize::new(old.map_or(0, |g| g.next.load(Ordering::Relaxed)));
        t.groups
            .insert(stage.to_string(), Arc::new(Group { members, next }));
        self.post.table.store(Arc::new(t));
        id
    }

    /// Takes instance `number` out of the table: no new message reaches it (its stage's
    /// round-robin, answers and grants addressed to it find no route; a stage left with no
    /// instance is no longer advertised). Messages already queued stay in its inbox for
    /// `drain_as`. Returns its stage id, `None` if it was not in the table.
    pub fn remove(&self, number: usize) -> Option<String> {
        let mut inboxes = self.inboxes.lock().expect("inboxes");
        let mut t = Table::clone(&self.post.table.load());
        let slot = t.slots.get_mut(number)?.take()?;
        let stage = slot.stage.clone();
        if let Some(g) = t.groups.get(&stage) {
            let members: Vec<usize> = g.members.iter().copied().filter(|&i| i != number).collect();
            if members.is_empty() {
                t.groups.remove(&stage);
            } else {
                let next = AtomicUsize::new(g.next.load(Ordering::Relaxed));
                t.groups.insert(stage.clone(), Arc::new(Group { members, next }));
            }
        }
        // An inbox nobody took (the instance never started) goes with it.
        inboxes.remove(&number);
        self.post.table.store(Arc::new(t));
        Some(stage)
    }

    /// A process-unique number (generated handler ids).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Sends to one instance's queue without waiting.
    pub fn send_to(&self, instance: usize, msg: Message) -> Result<(), Undelivered> {
        self.post.send_to(instance, msg)
    }

    /// Sends to the instance at address `to` (this node or another) without waiting.
    pub fn send_to_address(&self, to: &SenderInfo, msg: Message) -> Result<(), Undelivered> {
        self.post.send_to_address(to, msg)
    }

    /// Delivers `msg` per `scope` to instances of `stage`; returns how many took it.
    /// `Scope::Own` goes to the sending instance; `Scope::Sync` never reaches the router.
    pub fn deliver(&self, scope: Scope, stage: &str, msg: Message) -> Result<usize, Undelivered> {
        match scope {
            Scope::Own | Scope::Sync => {
                let from = msg.from.clone();
                self.send_to_address(&from, msg).map(|()| 1)
            }
            Scope::All => {
                let mut n = self.deliver_here_all(stage, &msg);
                n += self.post.remote.deliver_all(stage, &msg);
                Ok(n)
            }
            Scope::Remote => self
                .post
                .remote
                .deliver_one(stage, msg)
                .map(|()| 1)
                .map_err(Undelivered::NoRoute),
            Scope::One | Scope::Local => {
                let msg = match self.deliver_local(stage, msg) {
                    Ok(()) => return Ok(1),
                    // `=stage:msg`: another process of this host (a cluster node) may have it.
                    Err(Undelivered::NoRoute(m)) if scope == Scope::Local => {
                        return self
                            .post
                            .remote
                            .deliver_host(stage, m)
                            .map(|()| 1)
                            .map_err(Undelivered::NoRoute)
                    }
                    Err(u) if scope == Scope::Local => return Err(u),
                    Err(u) => u,
                };
                // Local instances could not take it: other nodes (then the fail-over node).
                match msg {
                    Undelivered::NoRoute(m) => self
                        .post
                        .remote
                        .deliver_one(stage, m)
                        .map(|()| 1)
                        .map_err(Undelivered::NoRoute),
                    Undelivered::Full(m) => self
                        .post
                        .remote
                        .deliver_one(stage, m)
                        .map(|()| 1)
                        .map_err(Undelivered::Full),
                }
            }
        }
    }

    /// Delivers to every stage of `stages` (a comma list); returns how many took it, or the
    /// reason of the first failure when none did.
    pub fn deliver_each(&self, scope: Scope, stages: &[String], msg: Message) -> Result<usize, Undelivered> {
        if let [one] = stages {
            return self.deliver(scope, one, msg);
        }
        let mut n = 0;
        let mut first_err = None;
        for s in stages {
            match self.deliver(scope, s, msg.clone()) {
                Ok(k) => n += k,
                Err(u) => {
                    first_err.get_or_insert(u);
                }
            }
        }
        match first_err {
            Some(u) if n == 0 => Err(u),
            _ => Ok(n),
        }
    }

    /// One local instance of `stage` only (a message another node routed here).
    pub fn deliver_here(&self, stage: &str, msg: Message) -> Result<(), Undelivered> {
        self.deliver_local(stage, msg)
    }

    /// Every local instance of `stage` only (a broadcast another node routed here).
    pub fn deliver_here_all(&self, stage: &str, msg: &Message) -> usize {
        let t = self.post.table.load();
        t.groups.get(stage).map_or(0, |g| {
            g.members
                .iter()
                .filter_map(|&i| t.slot(i))
                .filter(|slot| self.post.send_slot(slot, msg.clone()).is_ok())
                .count()
        })
    }

    /// Each local stage id with its instance count and its fullest queue in percent (what
    /// this node advertises to the cluster).
    pub fn load(&self) -> Vec<(String, usize, u8)> {
        let t = self.post.table.load();
        let mut out: Vec<_> = t
            .groups
            .iter()
            .map(|(stage, g)| {
                let full = g
                    .members
                    .iter()
                    .filter_map(|&i| t.slot(i))
                    .map(|slot| {
                        let tx = &slot.tx;
                        let max = tx.max_capacity().max(1);
                        ((max - tx.capacity()) * 100 / max) as u8
                    })
                    .max()
                    .unwrap_or(0);
                (stage.clone(), g.members.len(), full)
            })
            .collect();
        out.sort();
        out
    }

    /// Every local instance: (number, stage id, messages queued, queue bound, messages
    /// dropped because its queue was full). Read at scrape time by the metrics.
    pub fn queues(&self) -> Vec<QueueStat> {
        let t = self.post.table.load();
        t.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, s.as_deref()?)))
            .map(|(i, slot)| QueueStat {
                instance: i,
                stage: slot.stage.clone(),
                depth: slot.tx.max_capacity() - slot.tx.capacity(),
                capacity: slot.tx.max_capacity(),
                dropped: slot.dropped.load(Ordering::Relaxed),
                open: !slot.tx.is_closed(),
            })
            .collect()
    }

    /// Round-robin over the local instances of `stage`, skipping full queues.
    fn deliver_local(&self, stage: &str, mut msg: Message) -> Result<(), Undelivered> {
        let t = self.post.table.load();
        let Some(g) = t.groups.get(stage) else {
            return Err(Undelivered::NoRoute(msg));
        };
        let n = g.members.len();
        let start = g.next.fetch_add(1, Ordering::Relaxed);
        let mut any_open = false;
        for k in 0..n {
            let Some(slot) = t.slot(g.members[(start + k) % n]) else {
                continue;
            };
            match slot.tx.try_send(msg) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(m)) => {
                    any_open = true;
                    msg = m;
                }
                Err(mpsc::error::TrySendError::Closed(m)) => msg = m,
            }
        }
        if any_open {
            // Counted against the instance the round-robin offered it to first.
            if let Some(slot) = t.slot(g.members[start % n]) {
                slot.dropped.fetch_add(1, Ordering::Relaxed);
            }
            self.post.log_full(stage);
            Err(Undelivered::Full(msg))
        } else {
            Err(Undelivered::NoRoute(msg))
        }
    }

    /// Answers message `to` (if it may be answered) from `me`: with the values, or for a
    /// request with the reason it failed. Returns whether an answer was sent.
    pub fn answer(&self, to: &Message, me: &Arc<SenderInfo>, body: Result<Vec<Value>, String>) -> bool {
        let Some(id) = to.answer_id() else {
            return false;
        };
        if let Kind::Request { direct, .. } = &to.kind {
            if direct.is_some() {
                return direct.send(body);
            }
        }
        let (values, kind) = match body {
            Ok(values) => (values, Kind::Reply),
            Err(why) if matches!(to.kind, Kind::Request { .. }) => (vec![], Kind::Failed(why)),
            // Only a request hears about failures (STAGE never calls `=cb` then).
            Err(_) => return false,
        };
        let msg = Message {
            id: id.to_string(),
            from: me.clone(),
            values,
            kind,
        };
        self.send_to_address(&to.from, msg).is_ok()
    }

    /// An ordered-lock operation from `from` on lock `name`: `>name.cb` queues (the grant
    /// is message `cb` with `values`, sent back to `from`), `>>` extends the holder's lease by
    /// `values[0]` ms, `<` releases. Refused extensions and releases are logged.
    pub fn lock(&self, op: LockOp, name: &str, cb: &str, from: Arc<SenderInfo>, values: Vec<Value>) {
        // In a cluster one node owns each lock: the others forward to it.
        if self.post.remote.forward_lock(op, name, cb, &from, &values) {
            return;
        }
        self.lock_here(op, name, cb, from, values);
    }

    /// A lock operation on this node's own table (this node owns lock `name`).
    pub fn lock_here(&self, op: LockOp, name: &str, cb: &str, from: Arc<SenderInfo>, values: Vec<Value>) {
        let mut table = self.locks.table.lock().expect("lock table");
        let now = Instant::now();
        match op {
            LockOp::Acquire => {
                let w = Waiter {
                    from,
                    cb: cb.to_string(),
                    values,
                };
                let grant = table.acquire(name, w, now);
                self.locks.deliver(&mut table, grant);
            }
            LockOp::Extend => {
                let ms = match values.first() {
                    Some(Value::Int(i)) => (*i).max(0) as u64,
                    Some(Value::Float(f)) if *f > 0.0 => *f as u64,
                    _ => 0,
                };
                if let Err(e) = table.extend(name, &from, ms, now) {
                    log::warn!("{} cannot extend: {e}", from.address());
                }
            }
            LockOp::Release => match table.release(name, &from, now) {
                Ok(grant) => self.locks.deliver(&mut table, grant),
                Err(e) => log::debug!("{} cannot release: {e}", from.address()),
            },
        }
        drop(table);
        self.locks.start_timer();
        self.locks.changed.notify_one();
    }

    /// The holder of lock `name` and how many wait for it (tests, diagnostics).
    pub fn lock_state(&self, name: &str) -> Option<(Arc<SenderInfo>, usize)> {
        self.locks.table.lock().expect("lock table").state(name)
    }

    /// Closes instance `number`'s inbox and answers every queued request with
    /// `nil, "shutting down"`, so that no requester waits forever. Returns how many.
    pub fn drain(&self, inbox: &mut Inbox, number: usize) -> usize {
        self.drain_as(inbox, &self.sender(number)).requests
    }

    /// `drain` for the instance `me` (which may already be out of the table): every queued
    /// request is answered `nil, "shutting down"`, every other message is dropped; both are
    /// counted and logged.
    pub fn drain_as(&self, inbox: &mut Inbox, me: &SenderInfo) -> Drained {
        inbox.close();
        let from = Arc::new(me.clone());
        let mut d = Drained::default();
        while let Ok(msg) = inbox.try_recv() {
            if matches!(msg.kind, Kind::Request { .. }) {
                self.answer(&msg, &from, Err("shutting down".into()));
                d.requests += 1;
            } else {
                d.signals += 1;
            }
        }
        if d.requests > 0 || d.signals > 0 {
            log::info!(
                "{}#{}: answered {} queued request(s) with \"shutting down\", dropped {} queued signal(s)",
                me.stage,
                me.instance,
                d.requests,
                d.signals
            );
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Target {
        Target::parse(s, "me").unwrap()
    }

    fn parts(s: &str) -> (Scope, String, String, Option<String>) {
        let x = t(s);
        (x.scope, x.stages.join(","), x.id, x.reply)
    }

    fn p(
        scope: Scope,
        stages: &str,
        id: &str,
        reply: Option<&str>,
    ) -> (Scope, String, String, Option<String>) {
        (scope, stages.into(), id.into(), reply.map(str::to_string))
    }

    #[test]
    fn target_forms_follow_stage() {
        // The receiving stage's prefix is gone: `db` handles `load_user`.
        assert_eq!(parts("db:load_user"), p(Scope::One, "db", "load_user", None));
        assert_eq!(
            parts("db:load_user=cb"),
            p(Scope::One, "db", "load_user", Some("cb"))
        );
        // Naming no stage or one's own stays in the sending instance.
        assert_eq!(parts("msg"), p(Scope::Own, "me", "msg", None));
        assert_eq!(parts("me:msg"), p(Scope::Own, "me", "msg", None));
        assert_eq!(parts("=msg"), p(Scope::Own, "me", "msg", None));
        assert_eq!(parts("+msg"), p(Scope::Own, "me", "msg", None));
        assert_eq!(parts(":msg"), p(Scope::Sync, "me", "msg", None));
        // `@msg`: the own stage through the router (any instance).
        assert_eq!(parts("@msg"), p(Scope::One, "me", "msg", None));
        assert_eq!(parts("*msg"), p(Scope::All, "me", "msg", None));
        assert_eq!(parts("*db:msg"), p(Scope::All, "db", "msg", None));
        assert_eq!(parts("=db:msg"), p(Scope::Local, "db", "msg", None));
        assert_eq!(parts("+db:msg"), p(Scope::Remote, "db", "msg", None));
        // `db+msg` arrives as `<sender>:msg`.
        assert_eq!(parts("db+hello"), p(Scope::One, "db", "me:hello", None));
        // A comma list of stages; a table of messages (`db:` + table).
        assert_eq!(parts("a,b:msg"), p(Scope::One, "a,b", "msg", None));
        assert_eq!(parts("db:"), p(Scope::One, "db", "", None));
        assert_eq!(parts("ticket:=room"), p(Scope::One, "ticket", "=room", None));
        // Ids of the built-in stages pass through untouched.
        assert_eq!(
            parts("ticket:odbc=login?fb"),
            p(Scope::One, "ticket", "odbc", Some("login?fb"))
        );
        assert!(t("msg").own("me") && t("me:x=cb").own("me") && t("@x").own("me"));
        assert!(!t("db:x").own("me"));
        for bad in [
            "", "db:x=", ":db:x", ":", "*", "=:x", "@db:x", "a,:x", "+x+", ">L", ">.cb", ">L.", "<L",
        ] {
            assert!(Target::parse(bad, "me").is_err(), "{bad}");
        }
        assert_eq!(
            Target::parse("db:x=", "me").unwrap_err().to_string(),
            "invalid message target \"db:x=\": empty reply handler after '='"
        );
    }

    #[test]
    fn lock_targets() {
        let x = t(">SAVE.save_now");
        assert_eq!(
            (x.lock, x.id.as_str(), x.reply.as_deref()),
            (Some(LockOp::Acquire), "SAVE", Some("save_now"))
        );
        let x = t(">>SAVE.save_now");
        assert_eq!((x.lock, x.id.as_str()), (Some(LockOp::Extend), "SAVE"));
        let x = t("<SAVE.*");
        assert_eq!((x.lock, x.id.as_str()), (Some(LockOp::Release), "SAVE"));
        assert_eq!(
            t(">A.b.c").reply.as_deref(),
            Some("b.c"),
            "the name ends at the first '.'"
        );
    }

    #[test]
    fn lookup_order_walks_up_the_dots_then_at() {
        assert_eq!(lookup_order("a:b.c.d"), ["a:b.c.d", "a:b.c.", "a:b.", "a:", "@"]);
        assert_eq!(lookup_order("a:b"), ["a:b", "a:", "@"]);
        assert_eq!(lookup_order("a:b.c."), ["a:b.c.", "a:b.", "a:", "@"]);
        assert_eq!(lookup_order("x.y"), ["x.y", "x.", "@"]);
        assert_eq!(lookup_order("x"), ["x", "@"]);
        assert_eq!(lookup_order("@"), ["@"]);
        let mut h = HashMap::new();
        h.insert("a:".to_string(), 1);
        h.insert("a:b.".to_string(), 2);
        assert_eq!(lookup(&h, "a:b.c.d"), Some(("a:b.", &2)));
        assert_eq!(lookup(&h, "a:z"), Some(("a:", &1)));
        assert_eq!(lookup(&h, "q:z"), None);
        h.insert("@".to_string(), 3);
        assert_eq!(lookup(&h, "q:z"), Some(("@", &3)));
    }

    fn from(i: usize) -> Arc<SenderInfo> {
        Arc::new(SenderInfo {
            node: "n".into(),
            stage: if i == 0 { "a".into() } else { "b".into() },
            instance: i,
        })
    }

    fn msg(id: &str, v: i64) -> Message {
        Message {
            id: id.into(),
            from: from(0),
            values: vec![Value::Int(v)],
            kind: Kind::Signal {
                cb: None,
                implicit: true,
            },
        }
    }

    fn router(queue: usize) -> Router {
        let stages: Vec<String> = ["a", "b", "b", "b"].iter().map(|s| s.to_string()).collect();
        Router::new("n", &stages, queue, Box::new(NoRemote))
    }

    #[test]
    fn addresses_round_trip() {
        let s = SenderInfo {
            node: "host-1.example".into(),
            stage: "db".into(),
            instance: 7,
        };
        assert_eq!(s.address(), "7@host-1.example");
        assert_eq!(parse_address(&s.address()), Some(("host-1.example", 7)));
        assert_eq!(parse_address("x"), None);
        assert_eq!(parse_address("x@n"), None);
    }

    #[test]
    fn round_robin_skips_full_queues_and_never_blocks() {
        let r = router(2);
        let mut inboxes: Vec<_> = (0..4).map(|i| r.take_inbox(i).unwrap()).collect();
        for v in 0..6 {
            assert_eq!(r.deliver(Scope::One, "b", msg("x", v)).unwrap(), 1);
        }
        // 6 messages over 3 instances of 2 slots: every queue is full now.
        let u = r.deliver(Scope::One, "b", msg("x", 9)).unwrap_err();
        assert_eq!(u.reason(), "queue full");
        // The metrics see three full queues of "b" and one drop among them.
        let q = r.queues();
        assert_eq!(
            q.iter()
                .filter(|s| s.stage == "b")
                .map(|s| s.depth)
                .collect::<Vec<_>>(),
            [2, 2, 2]
        );
        assert_eq!(q.iter().map(|s| s.dropped).sum::<u64>(), 1);
        assert!(q.iter().all(|s| s.capacity == 2 && s.open));
        // Drain instance 2: it alone takes the next two.
        let got: Vec<_> = std::iter::from_fn(|| inboxes[2].try_recv().ok()).collect();
        assert_eq!(got.len(), 2);
        r.deliver(Scope::One, "b", msg("x", 10)).unwrap();
        r.deliver(Scope::One, "b", msg("x", 11)).unwrap();
        let got: Vec<_> = std::iter::from_fn(|| inboxes[2].try_recv().ok())
            .map(|m| m.values[0].clone())
            .collect();
        assert_eq!(got, [Value::Int(10), Value::Int(11)], "FIFO per instance");
        assert!(inboxes[0].try_recv().is_err(), "stage a never gets b's messages");
    }

    #[test]
    fn own_scope_returns_to_the_sender() {
        let r = router(8);
        let mut inboxes: Vec<_> = (0..4).map(|i| r.take_inbox(i).unwrap()).collect();
        let mut m = msg("cb", 1);
        m.from = from(2);
        for _ in 0..5 {
            assert_eq!(r.deliver(Scope::Own, "b", m.clone()).unwrap(), 1);
        }
        assert_eq!(std::iter::from_fn(|| inboxes[2].try_recv().ok()).count(), 5);
        assert!(inboxes[1].try_recv().is_err() && inboxes[3].try_recv().is_err());
    }

    #[test]
    fn broadcast_comma_lists_no_route_and_remote_scopes() {
        let r = router(8);
        let mut inboxes: Vec<_> = (0..4).map(|i| r.take_inbox(i).unwrap()).collect();
        assert_eq!(r.deliver(Scope::All, "b", msg("all", 1)).unwrap(), 3);
        for inbox in inboxes.iter_mut().skip(1) {
            assert_eq!(inbox.try_recv().unwrap().id, "all");
        }
        let ab = ["a".to_string(), "b".to_string()];
        assert_eq!(r.deliver_each(Scope::One, &ab, msg("x", 1)).unwrap(), 2);
        assert_eq!(r.deliver_each(Scope::All, &ab, msg("x", 1)).unwrap(), 4);
        let az = ["zz".to_string(), "a".to_string()];
        assert_eq!(r.deliver_each(Scope::One, &az, msg("x", 1)).unwrap(), 1);
        assert_eq!(r.deliver(Scope::All, "zz", msg("x", 1)).unwrap(), 0);
        assert_eq!(
            r.deliver(Scope::One, "zz", msg("x", 1)).unwrap_err().reason(),
            "no route"
        );
        assert_eq!(
            r.deliver(Scope::Remote, "b", msg("x", 1)).unwrap_err().reason(),
            "no route"
        );
        for inbox in inboxes.iter_mut() {
            while inbox.try_recv().is_ok() {}
        }
        assert_eq!(r.deliver(Scope::Local, "a", msg("x", 1)).unwrap(), 1);
        // A closed inbox (a stopped instance) is no route.
        drop(inboxes.remove(0));
        assert_eq!(
            r.deliver(Scope::Local, "a", msg("x", 1)).unwrap_err().reason(),
            "no route"
        );
    }

    #[test]
    fn answers_go_to_the_sender_and_are_never_answered() {
        let r = router(8);
        let mut inboxes: Vec<_> = (0..4).map(|i| r.take_inbox(i).unwrap()).collect();
        let me = from(1);
        // Without =cb: the same id; with =cb: cb.
        assert!(r.answer(&msg("load_user", 1), &me, Ok(vec![Value::Int(5)])));
        let a = inboxes[0].try_recv().unwrap();
        assert_eq!(
            (a.id.as_str(), &a.kind, a.from.instance),
            ("load_user", &Kind::Reply, 1)
        );
        let mut m = msg("load_user", 1);
        m.kind = Kind::Signal {
            cb: Some("on_user".into()),
            implicit: true,
        };
        assert_eq!(m.shown_id(), "load_user=on_user");
        assert!(r.answer(&m, &me, Ok(vec![])));
        assert_eq!(inboxes[0].try_recv().unwrap().id, "on_user");
        // A failure reaches a request, never a =cb handler; a reply is never answered.
        assert!(!r.answer(&m, &me, Err("boom".into())));
        assert!(!r.answer(&a, &me, Ok(vec![])));
        m.kind = Kind::Request {
            cb: "#r1".into(),
            direct: Direct::none(),
        };
        assert!(r.answer(&m, &me, Err("no handler".into())));
        let f = inboxes[0].try_recv().unwrap();
        assert_eq!(
            (f.id.as_str(), f.kind),
            ("#r1", Kind::Failed("no handler".into()))
        );
        assert!(inboxes[0].try_recv().is_err());
        // Another node's address goes through the remote seam (none here).
        let far = SenderInfo {
            node: "far".into(),
            stage: "a".into(),
            instance: 0,
        };
        assert_eq!(
            r.send_to_address(&far, msg("x", 1)).unwrap_err().reason(),
            "no route"
        );
    }

    #[test]
    fn requests_are_answered_through_their_direct_channel() {
        // A requester whose mailbox is full still gets its answer: it skips the mailbox.
        let r = router(1);
        let mut inbox = r.take_inbox(0).unwrap();
        assert!(r.send_to(0, msg("filler", 1)).is_ok());
        let me = from(1);
        let (direct, mut rx) = Direct::channel();
        let mut m = msg("echo", 1);
        m.kind = Kind::Request {
            cb: "~request.1".into(),
            direct: direct.clone(),
        };
        let copy = m.clone();
        assert!(r.answer(&m, &me, Ok(vec![Value::Int(7)])));
        assert_eq!(rx.try_recv().unwrap(), Ok(vec![Value::Int(7)]));
        assert_eq!(
            inbox.try_recv().unwrap().id,
            "filler",
            "nothing else in the mailbox"
        );
        assert!(inbox.try_recv().is_err());
        // Copies share the channel: one answer only, later ones are not sent anywhere.
        assert!(!r.answer(&copy, &me, Ok(vec![])));
        assert!(!direct.send(Ok(vec![])));
        assert!(inbox.try_recv().is_err());
        // A failure reaches the requester the same way.
        let (direct, mut rx) = Direct::channel();
        m.kind = Kind::Request {
            cb: "~request.2".into(),
            direct,
        };
        assert!(r.answer(&m, &me, Err("no handler for 'echo'".into())));
        assert_eq!(rx.try_recv().unwrap(), Err("no handler for 'echo'".into()));
        // A requester that stopped waiting (timeout) is not answered.
        let (direct, rx) = Direct::channel();
        drop(rx);
        m.kind = Kind::Request {
            cb: "~request.3".into(),
            direct,
        };
        assert!(!r.answer(&m, &me, Ok(vec![])));
        assert!(inbox.try_recv().is_err());
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
            fn deliver_to(&self, to: &SenderInfo, msg: Message) -> Result<(), Message> {
                if to.node == "far" {
                    self.0.fetch_add(10, Ordering::SeqCst);
                    Ok(())
                } else {
                    Err(msg)
                }
            }
        }
        let c = Arc::new(Count(AtomicUsize::new(0)));
        let r = Router::new("n", &["a".to_string()], 4, Box::new(c.clone()));
        assert_eq!(r.deliver(Scope::One, "far", msg("x", 1)).unwrap(), 1);
        assert_eq!(r.deliver(Scope::Remote, "far", msg("x", 1)).unwrap(), 1);
        assert!(r.deliver(Scope::Local, "far", msg("x", 1)).is_err());
        assert_eq!(c.0.load(Ordering::SeqCst), 2);
        assert_eq!(r.deliver(Scope::All, "a", msg("x", 1)).unwrap(), 3);
        let mut m = msg("x", 1);
        m.from = Arc::new(SenderInfo {
            node: "far".into(),
            stage: "a".into(),
            instance: 3,
        });
        assert!(r.answer(&m, &from(0), Ok(vec![])));
        assert_eq!(c.0.load(Ordering::SeqCst), 12);
    }

    #[test]
    fn drain_answers_queued_requests() {
        let r = router(8);
        let mut inbox = r.take_inbox(1).unwrap();
        let mut requester = r.take_inbox(0).unwrap();
        let mut m = msg("x", 1);
        m.kind = Kind::Request {
            cb: "#r7".into(),
            direct: Direct::none(),
        };
        r.deliver(Scope::Local, "b", m).unwrap();
        let _ = r.take_inbox(2);
        let _ = r.take_inbox(3);
        r.send_to(1, msg("y", 2)).unwrap();
        assert_eq!(r.drain(&mut inbox, 1), 1);
        let a = requester.try_recv().unwrap();
        assert_eq!(
            (a.id.as_str(), a.kind),
            ("#r7", Kind::Failed("shutting down".into()))
        );
        assert_eq!(r.send_to(1, msg("z", 3)).unwrap_err().reason(), "no route");
    }

    #[test]
    fn instances_added_and_removed_at_run_time() {
        let r = router(2);
        let mut inboxes: Vec<_> = (0..4).map(|i| r.take_inbox(i).unwrap()).collect();
        assert_eq!(r.members("b"), 3);
        // A new instance of "b" gets a fresh number and its share of the round-robin.
        let n = r.add("b");
        assert_eq!(n, 4);
        let mut new = r.take_inbox(n).unwrap();
        assert_eq!((r.members("b"), r.sender(n).stage.as_str()), (4, "b"));
        for v in 0..8 {
            r.deliver(Scope::One, "b", msg("x", v)).unwrap();
        }
        assert_eq!(std::iter::from_fn(|| new.try_recv().ok()).count(), 2);
        assert_eq!(
            r.deliver(Scope::All, "b", msg("all", 1)).unwrap(),
            1,
            "the others are full"
        );
        assert!(r.load().contains(&("b".to_string(), 4, 100)));
        // A new stage id appears in the load (what the cluster advertises).
        let c = r.add("c");
        assert_eq!(c, 5);
        assert!(r.load().iter().any(|(s, n, _)| s == "c" && *n == 1));
        // Removed: no new message, queued ones stay for the drain; answers find no route.
        for inbox in inboxes.iter_mut() {
            while inbox.try_recv().is_ok() {}
        }
        while new.try_recv().is_ok() {}
        let mut m = msg("q", 1);
        m.kind = Kind::Request {
            cb: "#r1".into(),
            direct: Direct::none(),
        };
        r.send_to(n, m).unwrap();
        r.send_to(n, msg("s", 2)).unwrap();
        assert_eq!(r.remove(n).as_deref(), Some("b"));
        assert_eq!(r.remove(n), None, "twice");
        assert_eq!(r.members("b"), 3);
        assert_eq!(r.send_to(n, msg("late", 3)).unwrap_err().reason(), "no route");
        for v in 0..6 {
            r.deliver(Scope::One, "b", msg("x", v)).unwrap();
        }
        let me = SenderInfo {
            node: "n".into(),
            stage: "b".into(),
            instance: n,
        };
        assert_eq!(
            r.drain_as(&mut new, &me),
            Drained {
                requests: 1,
                signals: 1
            }
        );
        let a = inboxes[0].try_recv().unwrap();
        assert_eq!(
            (a.id.as_str(), a.kind, a.from.instance),
            ("#r1", Kind::Failed("shutting down".into()), n)
        );
        // The last instance of a stage: the stage id is gone from this node.
        assert_eq!(r.remove(c).as_deref(), Some("c"));
        assert!(r.load().iter().all(|(s, _, _)| s != "c"));
        assert_eq!(
            r.deliver(Scope::One, "c", msg("x", 1)).unwrap_err().reason(),
            "no route"
        );
        assert_eq!(
            r.queues().iter().map(|q| q.instance).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        // Numbers are never reused.
        assert_eq!(r.add("c"), 6);
    }

    #[test]
    fn locks_grant_in_order_and_expire() {
        let stages: Vec<String> = (0..3).map(|_| "s".to_string()).collect();
        let r = Router::new("n", &stages, 8, Box::new(NoRemote));
        let mut inboxes: Vec<_> = (0..3).map(|i| r.take_inbox(i).unwrap()).collect();
        let who = |i| Arc::new(r.sender(i));
        for i in 0..3 {
            r.lock(LockOp::Acquire, "L", "go", who(i), vec![Value::Int(i as i64)]);
        }
        let g = inboxes[0].try_recv().unwrap();
        assert_eq!((g.id.as_str(), &g.values[..]), ("go", &[Value::Int(0)][..]));
        assert!(inboxes[1].try_recv().is_err(), "instance 1 waits");
        // Only the holder releases.
        r.lock(LockOp::Release, "L", "*", who(2), vec![]);
        assert_eq!(r.lock_state("L").unwrap().0.instance, 0);
        r.lock(LockOp::Release, "L", "*", who(0), vec![]);
        assert_eq!(inboxes[1].try_recv().unwrap().values, [Value::Int(1)]);
        // Instance 1 never releases: its lease ends after ~100 ms and 2 gets the lock.
        let t0 = Instant::now();
        let g = loop {
            if let Ok(g) = inboxes[2].try_recv() {
                break g;
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "the lease never expired");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(g.values, [Value::Int(2)]);
        assert!(t0.elapsed() >= Duration::from_millis(80), "{:?}", t0.elapsed());
        // An extended lease outlives the default one.
        r.lock(LockOp::Extend, "L", "go", who(2), vec![Value::Int(300)]);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(r.lock_state("L").unwrap().0.instance, 2);
        // A waiter whose instance is gone is skipped: the next one gets the lock.
        r.lock(LockOp::Release, "L", "*", who(2), vec![]);
        r.lock(LockOp::Acquire, "M", "m", who(0), vec![]);
        assert_eq!(inboxes[0].try_recv().unwrap().id, "m");
        r.lock(LockOp::Acquire, "M", "m", who(1), vec![]);
        r.lock(LockOp::Acquire, "M", "m", who(2), vec![]);
        drop(inboxes.remove(1));
        r.lock(LockOp::Release, "M", "*", who(0), vec![]);
        assert_eq!(
            inboxes[1].try_recv().unwrap().id,
            "m",
            "instance 2 after the gone 1"
        );
        assert_eq!(r.lock_state("M").unwrap().0.instance, 2);
    }
}
