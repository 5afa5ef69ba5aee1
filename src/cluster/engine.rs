//! One cluster node without its socket: membership by `foca` (SWIM with suspicion), the
//! routing table (each member's stage ids, instance counts and queue load, pushed every
//! third of `#router[0]`), authenticated datagrams (`auth`), batches and fragments
//! (`batch`, `frag`), STAGE's direction rule, the fail-over chain and the owner of each lock
//! (rendezvous hashing over live members). The socket is a `Transport`: UDP in `udp.rs`, memory in the simulation.
//! Incoming work goes to a `Sink` (the router of this node).

use super::auth::{Envelope, Reject, HEADER};
use super::batch::{self, BATCH_HEADER, ENTRY_HEADER};
use super::conf::ClusterConfig;
use super::frag::{self, Reassembler};
use super::wire::{self, App, Reader, Writer};
use crate::router::{Kind, LockOp, Message, SenderInfo};
use crate::value::Value;
use foca::{AccumulatingRuntime, Foca, NoCustomBroadcast, OwnedNotification, PostcardCodec, Timer};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

/// Sends one datagram (UDP, or memory in tests).
pub trait Transport: Send + Sync {
    fn send(&self, to: SocketAddr, datagram: &[u8]);
}

/// Where incoming work goes: this node's router.
pub trait Sink: Send + Sync {
    /// One local instance of `stage` (round-robin, skipping full queues).
    fn one(&self, stage: &str, msg: Message) -> Result<(), Message>;
    /// Every local instance of `stage`; returns how many took it.
    fn all(&self, stage: &str, msg: &Message) -> usize;
    /// Instance `instance` of this node.
    fn to(&self, instance: usize, msg: Message) -> Result<(), Message>;
    /// A lock operation for the table this node owns.
    fn lock(&self, op: LockOp, name: &str, cb: &str, from: Arc<SenderInfo>, values: Vec<Value>);
    /// This node's stages, instance counts and queue load.
    fn local(&self) -> Vec<StageLoad>;
    /// An admin request (small JSON) from another member (`Engine::admin_request`): the
    /// answer is handed to `reply`, from any thread, when it is ready.
    fn admin(&self, from: &str, body: Vec<u8>, reply: AdminReply) {
        let _ = (from, body);
        reply(br#"{"status": 501, "body": {"error": "this node serves no admin requests"}}"#.to_vec());
    }
}

/// Why an admin request cannot be sent to another member.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminSendError {
    /// No member of that name.
    #[error("{0}")]
    Unknown(String),
    /// A member that cannot be asked now (down), or a request too large.
    #[error("{0}")]
    Down(String),
}

/// Sends the answer to an admin request back to the member that asked.
pub type AdminReply = Box<dyn FnOnce(Vec<u8>) + Send>;

/// One stage id of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageLoad {
    pub stage: String,
    pub instances: u32,
    /// The fullest queue of the stage's instances, in percent.
    pub load: u8,
}

/// How many fail-over nodes a message passes through at most (a chain, not a loop).
pub const MAX_FAILOVER_HOPS: u8 = 4;

/// A node whose queues are this full is skipped while another can take the message.
pub const OVERLOADED: u8 = 90;

/// A member's identity in the membership: its address and a generation that changes when
/// the process restarts (so a restarted node is a new member, not a dead one come back).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Ident {
    pub addr: SocketAddr,
    pub generation: u64,
}

impl foca::Identity for Ident {
    type Addr = SocketAddr;
    fn renew(&self) -> Option<Self> {
        Some(Ident {
            addr: self.addr,
            generation: self.generation.wrapping_add(1),
        })
    }
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// A member's state as `cluster.members()` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Alive,
    Suspect,
    Down,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Alive => "alive",
            State::Suspect => "suspect",
            State::Down => "down",
        }
    }
}

/// What this node knows of another.
#[derive(Debug, Clone)]
pub struct Peer {
    pub ident: Option<Ident>,
    pub state: State,
    pub stages: Vec<StageLoad>,
    /// When its last state push arrived.
    pub heard: Option<Instant>,
    /// Its admin API (`#admin`) as it advertises it in its state pushes (`host:port`).
    pub admin: Option<String>,
}

/// A membership change, as delivered to scripts.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `join`, `leave`, `suspect` or `back`.
    pub kind: &'static str,
    pub node: String,
}

const F_GOSSIP: u8 = 1;
const F_STATE: u8 = 2;
const F_FRAG: u8 = 3;
const F_STATUS_REQ: u8 = 4;
const F_STATUS: u8 = 5;
const F_BATCH: u8 = 6;
/// An admin request from a member (`u64` id, JSON body) and its answer (same id, JSON).
const F_ADMIN_REQ: u8 = 7;
const F_ADMIN: u8 = 8;

/// A batch waiting for its sending thread to go idle is sent anyway once it is this old
/// (by the next message put in it, or by the socket thread's sweep).
pub const MAX_BATCH_DELAY: Duration = Duration::from_micros(500);

/// A deferred batch goes out as soon as it holds this many messages, without waiting for its
/// thread to go idle: the receiver starts on it while the sender fills the next one. Without
/// it, a busy client and server play ping-pong with one big batch, one of them idle at a time
/// (remote round trips/s, 64 in flight: 120-134k without a bound, 172-225k with 16-32).
pub const MAX_BATCH_MESSAGES: u32 = 32;

/// Messages for one node: their numbering and the batch being filled.
struct Outbox {
    /// The last message number given out (per sender → receiver pair).
    seq: u64,
    /// The datagram being filled: room for the envelope, then a batch body (`batch`); empty
    /// when nothing waits.
    buf: Vec<u8>,
    /// When the batch's first message was put in (deferred batches only).
    since: Option<Instant>,
    /// Messages in the batch being filled.
    count: u32,
}

/// One destination node's outbox, behind its own lock: numbering, batching and sending are
/// one step per destination, so no message overtakes an older one on its way out.
pub struct Dest {
    to: SocketAddr,
    out: Mutex<Outbox>,
}

/// Outboxes a thread filled and has not sent yet, with their engines.
type Pending = Vec<(Weak<Engine>, Arc<Dest>)>;

thread_local! {
    /// `None` on threads that send at once (the default).
    static DEFERRED: RefCell<Option<Pending>> = const { RefCell::new(None) };
}

/// From now on this thread's cluster messages wait in their destination's batch until the
/// thread calls `flush_deferred` (an instance's runtime calls it when it goes idle), or at
/// most `MAX_BATCH_DELAY`.
pub fn defer_sends() {
    let _ = DEFERRED.try_with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(vec![]);
        }
    });
}

/// Sends every batch this thread filled since it last called this.
pub fn flush_deferred() {
    let _ = DEFERRED.try_with(|d| {
        let mut list = match d.borrow_mut().as_mut() {
            Some(v) if !v.is_empty() => std::mem::take(v),
            _ => return,
        };
        for (e, dest) in list.drain(..) {
            if let Some(e) = e.upgrade() {
                e.flush(&dest);
            }
        }
        // Keep the list's allocation for the next round.
        if let Some(v) = d.borrow_mut().as_mut() {
            if v.is_empty() {
                *v = list;
            }
        }
    });
}

/// A small xorshift generator for foca's probe order (not security relevant).
pub struct Rng(u64);

impl rand::TryRng for Rng {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok((self.try_next_u64()? >> 32) as u32)
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        Ok(x)
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for c in dst.chunks_mut(8) {
            let v = self.try_next_u64()?.to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
        Ok(())
    }
}

type Membership = Foca<Ident, PostcardCodec, Rng, NoCustomBroadcast>;

struct Swim {
    foca: Membership,
    timers: Vec<(Instant, Timer<Ident>)>,
}

/// Random bytes from the system (sessions, generations).
pub fn random_u64() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("system random");
    u64::from_le_bytes(b)
}

/// Counters a node keeps (status, tests, benchmarks).
#[derive(Default)]
pub struct Stats {
    pub rejected: [AtomicU64; 6],
    pub gossip_bytes_sent: AtomicU64,
    pub datagrams_sent: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_dropped: AtomicU64,
}

/// A lock acquisition forwarded to its owner and not granted yet: queued again at the new
/// owner if the owner leaves.
struct PendingLock {
    owner: SocketAddr,
    name: String,
    cb: String,
    from: SenderInfo,
    values: Vec<Value>,
}

/// Forwarded acquisitions remembered at most (the oldest are forgotten first).
const MAX_PENDING_LOCKS: usize = 65536;

/// One node of the cluster.
pub struct Engine {
    pub cfg: ClusterConfig,
    me: Ident,
    name: String,
    env: Envelope,
    transport: Arc<dyn Transport>,
    sink: OnceLock<Arc<dyn Sink>>,
    swim: Mutex<Swim>,
    table: RwLock<HashMap<SocketAddr, Peer>>,
    reasm: Mutex<Reassembler>,
    /// Each destination's numbering and batch, each behind its own lock.
    dests: RwLock<HashMap<SocketAddr, Arc<Dest>>>,
    /// This engine, for the batches a thread leaves to send later.
    this: Weak<Engine>,
    rr: AtomicUsize,
    pub stats: Stats,
    /// Per sender address: when a refusal was last logged (once per peer per minute).
    logged: Mutex<HashMap<SocketAddr, Instant>>,
    watchers: Mutex<Vec<(usize, String)>>,
    pending_locks: Mutex<Vec<PendingLock>>,
    last_push: Mutex<Option<Instant>>,
    last_announce: Mutex<Option<Instant>>,
    /// When foca last renewed this node's identity (it had been declared down).
    rejoined: Mutex<Option<Instant>>,
    /// Members whose state pushes carry a newer generation than the identity the
    /// membership knows them by: they renewed and this node's foca has not caught up.
    renewed: Mutex<HashSet<SocketAddr>>,
    /// Members foca holds as suspect: the identity, incarnation and since when (seen here).
    suspected: Mutex<HashMap<SocketAddr, (Ident, u16, Instant)>>,
    /// Announce at the next tick rather than at the next sync interval.
    announce_now: std::sync::atomic::AtomicBool,
    /// Payload bytes per fragment.
    chunk: usize,
    /// This node's admin API address, advertised in every state push (`set_admin`).
    admin: RwLock<Option<String>>,
    /// The largest batch body: a batch datagram is no larger than a fragment's.
    batch_cap: usize,
    /// Admin requests sent to other members and not answered yet, by id.
    admin_pending: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Vec<u8>>>>,
    admin_seq: AtomicU64,
}

impl Engine {
    pub fn new(cfg: ClusterConfig, transport: Arc<dyn Transport>) -> Arc<Engine> {
        let me = Ident {
            addr: cfg.addr(),
            // Later starts win address conflicts: a restarted node replaces its old self.
            generation: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64),
        };
        let sync = cfg.sync;
        let mut fc = foca::Config::new_lan(std::num::NonZeroU32::new(32).expect("nonzero"));
        fc.probe_period = sync / 3;
        fc.probe_rtt = sync / 6;
        fc.suspect_to_down_after = sync;
        fc.remove_down_after = Some(Duration::from_secs(120));
        fc.max_packet_size =
            std::num::NonZeroUsize::new(1400 - super::auth::HEADER - super::auth::TAG).expect("nonzero");
        fc.periodic_announce = Some(foca::PeriodicParams {
            frequency: sync * 4,
            num_members: std::num::NonZeroUsize::new(1).expect("nonzero"),
        });
        fc.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: sync * 2,
            num_members: std::num::NonZeroUsize::new(2).expect("nonzero"),
        });
        let foca = Foca::new(me.clone(), fc, Rng(random_u64() | 1), PostcardCodec);
        // Loopback carries big datagrams; real networks get datagrams that fit an MTU.
        let chunk = if cfg.advertise.is_loopback() { 60_000 } else { 1200 };
        let env = Envelope::new(cfg.key.as_deref(), random_u64()).accepting(&cfg.accept);
        Arc::new_cyclic(|this| Engine {
            admin_pending: Mutex::new(HashMap::new()),
            admin_seq: AtomicU64::new(0),
            name: me.addr.to_string(),
            me,
            env,
            transport,
            sink: OnceLock::new(),
            swim: Mutex::new(Swim { foca, timers: vec![] }),
            table: RwLock::new(HashMap::new()),
            reasm: Mutex::new(Reassembler::default()),
            dests: RwLock::new(HashMap::new()),
            this: this.clone(),
            rr: AtomicUsize::new(0),
            stats: Stats::default(),
            logged: Mutex::new(HashMap::new()),
            watchers: Mutex::new(vec![]),
            pending_locks: Mutex::new(vec![]),
            last_push: Mutex::new(None),
            last_announce: Mutex::new(None),
            rejoined: Mutex::new(None),
            renewed: Mutex::new(HashSet::new()),
            suspected: Mutex::new(HashMap::new()),
            announce_now: std::sync::atomic::AtomicBool::new(false),
            chunk,
            admin: RwLock::new(None),
            batch_cap: frag::FRAG_HEADER + chunk,
            cfg,
        })
    }

    /// This node's name (`process.node`): its advertised `ip:port`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Advertises this node's admin API at `addr` (`host:port`) to the other members: an
    /// unspecified host (`0.0.0.0`, `[::]`) is replaced by the cluster's advertised address.
    pub fn set_admin(&self, addr: SocketAddr) {
        let shown = if addr.ip().is_unspecified() {
            SocketAddr::new(self.cfg.advertise, addr.port())
        } else {
            addr
        };
        *self.admin.write().expect("admin") = Some(shown.to_string());
    }

    /// Every member's admin API address as advertised (itself included), by node name.
    pub fn admin_addrs(&self) -> HashMap<String, String> {
        let mut out: HashMap<String, String> = self
            .table
            .read()
            .expect("table")
            .iter()
            .filter_map(|(a, p)| Some((a.to_string(), p.admin.clone()?)))
            .collect();
        if let Some(a) = self.admin.read().expect("admin").clone() {
            out.insert(self.name.clone(), a);
        }
        out
    }

    pub fn set_sink(&self, sink: Arc<dyn Sink>) {
        let _ = self.sink.set(sink);
    }

    /// Instance `instance` gets membership events as message `id`.
    pub fn watch(&self, instance: usize, id: &str) {
        let mut w = self.watchers.lock().expect("watchers");
        w.retain(|(i, _)| *i != instance);
        if !id.is_empty() {
            w.push((instance, id.to_string()));
        }
    }

    pub fn rejected(&self, r: Reject) -> u64 {
        self.stats.rejected[Reject::ALL.iter().position(|x| *x == r).expect("reason")].load(Ordering::Relaxed)
    }

    // ---- membership -------------------------------------------------------------------

    /// Runs due timers, announces to named nodes not yet members, pushes this node's state.
    /// Call it every few ms (the driver does). Returns when it next wants to be called.
    pub fn tick(&self, now: Instant) -> Instant {
        let mut rt = AccumulatingRuntime::new();
        let next = {
            let mut s = self.swim.lock().expect("swim");
            let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut s.timers)
                .into_iter()
                .partition(|(t, _)| *t <= now);
            s.timers = later;
            for (_, t) in due {
                if let Err(e) = s.foca.handle_timer(t, &mut rt) {
                    log::debug!("cluster: membership timer: {e}");
                }
            }
            let announce = {
                let mut last = self.last_announce.lock().expect("announce");
                let due = last.is_none_or(|t| now.duration_since(t) >= self.cfg.sync)
                    || self.announce_now.swap(false, Ordering::Relaxed);
                if due {
                    *last = Some(now);
                }
                due
            };
            if announce {
                // Named nodes that are not members (yet, or any more); members that renewed
                // their identity before foca here heard of it; and, for a few intervals after
                // this node renewed its own, every member. An announce is taken by whatever
                // identity holds the address and answered with the membership, so both
                // sides learn each other's current identity. Without it, two nodes that
                // renewed at once (each had declared the other down: a lossy link, a stalled
                // process) address each other's old identities, foca drops every such
                // datagram, and each keeps the other "alive" forever, with no failure
                // detection and, but for the pushes, no stage ids.
                let table = self.table.read().expect("table");
                let mut to: Vec<SocketAddr> = self
                    .cfg
                    .peers
                    .iter()
                    .chain(&self.cfg.failover)
                    .filter(|a| table.get(a).is_none_or(|p| p.state == State::Down))
                    .copied()
                    .collect();
                to.extend(self.renewed.lock().expect("renewed").drain());
                let rejoining = self
                    .rejoined
                    .lock()
                    .expect("rejoined")
                    .is_some_and(|t| now.duration_since(t) < self.cfg.sync * 3);
                if rejoining {
                    to.extend(self.cfg.peers.iter().chain(&self.cfg.failover).copied());
                    to.extend(
                        table
                            .iter()
                            .filter(|(_, p)| p.state != State::Down)
                            .map(|(a, _)| *a),
                    );
                }
                to.sort();
                to.dedup();
                for addr in to {
                    if addr != self.me.addr {
                        let dst = Ident { addr, generation: 0 };
                        let _ = s.foca.announce(dst, &mut rt);
                    }
                }
            }
            s.timers.iter().map(|(t, _)| *t).min()
        };
        self.run(rt, now);
        let push_due = {
            let mut last = self.last_push.lock().expect("push");
            let due = last.is_none_or(|t| now.duration_since(t) >= self.cfg.sync / 3);
            if due {
                *last = Some(now);
            }
            due
        };
        if push_due {
            self.push_state();
            self.check_stale(now);
            self.reasm.lock().expect("reasm").expire(now);
        }
        let soon = now + Duration::from_millis(50);
        next.map_or(soon, |n| n.min(soon))
    }

    /// Carries out what foca asked for: datagrams, timers, membership notifications.
    fn run(&self, mut rt: AccumulatingRuntime<Ident>, now: Instant) {
        while let Some((to, data)) = rt.to_send() {
            let d = self.env.seal(to.addr, F_GOSSIP, &data);
            self.stats
                .gossip_bytes_sent
                .fetch_add(d.len() as u64, Ordering::Relaxed);
            self.send_raw(to.addr, &d);
        }
        let mut timers = vec![];
        while let Some((after, t)) = rt.to_schedule() {
            timers.push((now + after, t));
        }
        if !timers.is_empty() {
            self.swim.lock().expect("swim").timers.extend(timers);
        }
        let mut reconnect = false;
        while let Some(n) = rt.to_notify() {
            match n {
                OwnedNotification::MemberUp(id) => self.set_state(&id, State::Alive),
                OwnedNotification::MemberDown(id) => self.set_state(&id, State::Down),
                // The member renewed its identity: only the identity changes here. Whether it
                // is up or down comes as MemberUp/MemberDown when that changed too (a rename
                // to a down identity is not a join).
                OwnedNotification::Rename(_, new) => {
                    if let Some(p) = self.table.write().expect("table").get_mut(&new.addr) {
                        p.ident = Some(new);
                    }
                }
                OwnedNotification::Rejoin(new) => {
                    log::info!(
                        "cluster: this node was declared down; it rejoins as generation {}",
                        new.generation
                    );
                    *self.rejoined.lock().expect("rejoined") = Some(now);
                    self.announce_now.store(true, Ordering::Relaxed);
                    reconnect = true;
                }
                _ => {}
            }
        }
        if reconnect {
            // A renewed foca is disconnected (no probes, no periodic announces) until a
            // datagram to its new identity arrives, which may never happen (the other side
            // died, or a partition began): an empty update reconnects it to the members it
            // still lists, so it probes them, and suspects and declares them down if need be.
            let mut rt = AccumulatingRuntime::new();
            let r = self
                .swim
                .lock()
                .expect("swim")
                .foca
                .apply_many(std::iter::empty(), false, &mut rt);
            if let Err(e) = r {
                log::debug!("cluster: membership after rejoining: {e}");
            }
            self.run(rt, now);
        }
    }

    fn set_state(&self, id: &Ident, state: State) {
        let ev = {
            let mut t = self.table.write().expect("table");
            let p = t.entry(id.addr).or_insert(Peer {
                ident: None,
                state: State::Down,
                stages: vec![],
                heard: None,
                admin: None,
            });
            if state == State::Down && p.ident.as_ref().is_some_and(|cur| cur != id) {
                // An older generation of a node that has restarted since.
                return;
            }
            let before = (p.state, p.ident.is_some());
            p.ident = Some(id.clone());
            p.state = state;
            if state == State::Down {
                p.stages.clear();
                p.heard = None;
            }
            match (before, state) {
                ((State::Down, _), State::Alive) => Some("join"),
                ((State::Suspect, _), State::Alive) => Some("back"),
                ((State::Alive | State::Suspect, true), State::Down) => Some("leave"),
                ((State::Alive, true), State::Suspect) => Some("suspect"),
                _ => None,
            }
        };
        if let Some(kind) = ev {
            self.emit(Event {
                kind,
                node: id.addr.to_string(),
            });
            if kind == "leave" {
                self.requeue_locks(id.addr);
            }
        }
    }

    /// The owner `gone` left: the acquisitions this node forwarded to it and that were not
    /// granted go to each lock's new owner (by then an unrenewed lease there has ended).
    fn requeue_locks(&self, gone: SocketAddr) {
        let moved: Vec<PendingLock> = {
            let mut p = self.pending_locks.lock().expect("pending locks");
            let (moved, kept) = std::mem::take(&mut *p).into_iter().partition(|w| w.owner == gone);
            *p = kept;
            moved
        };
        if moved.is_empty() {
            return;
        }
        log::info!(
            "cluster: {} lock request(s) waiting at {gone} are queued at the locks' new owners",
            moved.len()
        );
        for w in moved {
            if !self.forward_lock(LockOp::Acquire, &w.name, &w.cb, &w.from, &w.values) {
                if let Some(sink) = self.sink.get() {
                    sink.lock(LockOp::Acquire, &w.name, &w.cb, Arc::new(w.from), w.values);
                }
            }
        }
    }

    fn emit(&self, ev: Event) {
        log::info!(
            "cluster: node {} {}",
            ev.node,
            match ev.kind {
                "join" => "joined",
                "leave" => "left (down)",
                "suspect" => "is suspected down",
                _ => "is back",
            }
        );
        let Some(sink) = self.sink.get() else { return };
        let stages = self.peer_stages(&ev.node);
        for (instance, id) in self.watchers.lock().expect("watchers").clone() {
            let msg = Message {
                id,
                from: Arc::new(SenderInfo {
                    node: self.name.clone(),
                    stage: "cluster".into(),
                    instance,
                }),
                values: vec![Value::Table(vec![
                    (s("event"), s(ev.kind)),
                    (s("node"), s(&ev.node)),
                    (
                        s("stages"),
                        Value::Table(
                            stages
                                .iter()
                                .enumerate()
                                .map(|(i, st)| (Value::Int(i as i64 + 1), s(st)))
                                .collect(),
                        ),
                    ),
                ])],
                kind: Kind::Reply,
            };
            let _ = sink.to(instance, msg);
        }
    }

    fn peer_stages(&self, node: &str) -> Vec<String> {
        let Ok(addr) = node.parse::<SocketAddr>() else {
            return vec![];
        };
        self.table
            .read()
            .expect("table")
            .get(&addr)
            .map(|p| p.stages.iter().map(|s| s.stage.clone()).collect())
            .unwrap_or_default()
    }

    /// Suspect members from foca's view, and nodes whose state pushes stopped: they lose
    /// their stage ids after `#router[0]` and a half of it.
    fn check_stale(&self, now: Instant) {
        let suspects: Vec<(Ident, u16)> = {
            let s = self.swim.lock().expect("swim");
            s.foca
                .iter_membership_state()
                .filter(|m| m.state() == foca::State::Suspect)
                .map(|m| (m.id().clone(), m.incarnation()))
                .collect()
        };
        // foca ends a suspicion with a timer, and renewing this node's identity cancels every
        // timer: a member suspected then stays suspect for good (probes of a suspect do not
        // end it, only its refutation does, and that may have been lost). A suspicion twice
        // as old as foca's is ended here as foca would have: the member is declared down
        // (it hears so, rejoins, and comes back).
        let stuck: Vec<(Ident, u16)> = {
            let mut sus = self.suspected.lock().expect("suspected");
            sus.retain(|a, (id, inc, _)| suspects.iter().any(|(i, n)| i.addr == *a && i == id && n == inc));
            suspects
                .iter()
                .filter(|(id, inc)| {
                    let since = sus.entry(id.addr).or_insert_with(|| (id.clone(), *inc, now)).2;
                    now.duration_since(since) > self.cfg.sync * 2
                })
                .cloned()
                .collect()
        };
        if !stuck.is_empty() {
            let mut rt = AccumulatingRuntime::new();
            {
                let mut s = self.swim.lock().expect("swim");
                for (id, inc) in &stuck {
                    log::info!(
                        "cluster: node {} has been suspected for {} ms without a verdict: declared down",
                        id.addr,
                        (self.cfg.sync * 2).as_millis()
                    );
                    let down = foca::Member::new(id.clone(), *inc, foca::State::Down);
                    if let Err(e) = s.foca.apply_many(std::iter::once(down), true, &mut rt) {
                        log::debug!("cluster: membership: {e}");
                    }
                }
            }
            self.run(rt, now);
        }
        for (id, _) in suspects {
            let alive = self
                .table
                .read()
                .expect("table")
                .get(&id.addr)
                .is_some_and(|p| p.state == State::Alive);
            if alive {
                self.set_state(&id, State::Suspect);
            }
        }
        // A suspect that foca sees alive again is back.
        let back: Vec<Ident> = {
            let s = self.swim.lock().expect("swim");
            s.foca
                .iter_membership_state()
                .filter(|m| m.state() == foca::State::Alive)
                .map(|m| m.id().clone())
                .collect()
        };
        for id in back {
            let suspect = self
                .table
                .read()
                .expect("table")
                .get(&id.addr)
                .is_some_and(|p| p.state == State::Suspect);
            if suspect {
                self.set_state(&id, State::Alive);
            }
        }
        let grace = self.cfg.sync + self.cfg.sync / 2;
        let mut t = self.table.write().expect("table");
        for (addr, p) in t.iter_mut() {
            if p.heard.is_some_and(|h| now.duration_since(h) > grace) {
                log::info!(
                    "cluster: node {addr} not heard from for {} ms: its stage ids are withdrawn",
                    grace.as_millis()
                );
                p.stages.clear();
                p.heard = None;
            }
        }
    }

    /// Sends this node's stages and load to every member that is not down.
    fn push_state(&self) {
        let Some(sink) = self.sink.get() else { return };
        // foca's identity, not `self.me`: after this node was declared down somewhere (a lossy
        // link, a partition) foca renews it with a higher generation, and the others then
        // accept only pushes of that generation.
        let generation = self.swim.lock().expect("swim").foca.identity().generation;
        let mut w = Writer::default();
        w.u64(generation);
        let local = sink.local();
        w.u32(local.len() as u32);
        for s in &local {
            w.str(&s.stage);
            w.u32(s.instances);
            w.u8(s.load);
        }
        // Last, and optional (an older node's push ends before it): the admin API address.
        w.str(self.admin.read().expect("admin").as_deref().unwrap_or(""));
        // Every member foca lists, and every node this one's table holds as not down: the two
        // views can differ for a while (one side renewed its identity), and a node must not
        // lose this one's stage ids meanwhile.
        let mut to: Vec<SocketAddr> = {
            let s = self.swim.lock().expect("swim");
            s.foca.iter_members().map(|m| m.id().addr).collect()
        };
        for (a, p) in self.table.read().expect("table").iter() {
            if p.state != State::Down && *a != self.me.addr && !to.contains(a) {
                to.push(*a);
            }
        }
        for a in to {
            let d = self.env.seal(a, F_STATE, &w.buf);
            self.stats
                .gossip_bytes_sent
                .fetch_add(d.len() as u64, Ordering::Relaxed);
            self.send_raw(a, &d);
        }
    }

    fn on_state(&self, from: SocketAddr, body: &[u8]) -> Result<(), wire::WireError> {
        let mut r = Reader::new(body);
        let generation = r.u64()?;
        let n = r.u32()? as usize;
        if n > body.len() {
            return Err(wire::WireError("stage count exceeds the frame"));
        }
        let mut stages = Vec::with_capacity(n);
        for _ in 0..n {
            stages.push(StageLoad {
                stage: r.str()?,
                instances: r.u32()?,
                load: r.u8()?,
            });
        }
        let admin = if r.rest.is_empty() {
            None
        } else {
            Some(r.str()?).filter(|a| !a.is_empty())
        };
        let mut t = self.table.write().expect("table");
        // Only members count: a state push never makes a node a member by itself.
        let Some(p) = t.get_mut(&from) else { return Ok(()) };
        let Some(known) = p.ident.as_ref().map(|i| i.generation) else {
            return Ok(());
        };
        if generation > known {
            // It renewed its identity and this node's membership has not caught up: announce
            // to it at the next tick (the identity stays foca's, so foca's verdicts on it
            // still apply here).
            self.renewed.lock().expect("renewed").insert(from);
            self.announce_now.store(true, Ordering::Relaxed);
        }
        // A push of the member's generation or a newer one; never an older incarnation's.
        if p.state != State::Down && known <= generation {
            p.stages = stages;
            p.admin = admin;
            p.heard = Some(Instant::now());
        }
        Ok(())
    }

    // ---- datagrams --------------------------------------------------------------------

    fn send_raw(&self, to: SocketAddr, d: &[u8]) {
        self.stats.datagrams_sent.fetch_add(1, Ordering::Relaxed);
        self.transport.send(to, d);
    }

    fn refuse(&self, from: SocketAddr, why: Reject) {
        let i = Reject::ALL.iter().position(|x| *x == why).expect("reason");
        self.stats.rejected[i].fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut l = self.logged.lock().expect("logged");
        if l.get(&from)
            .is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            l.insert(from, now);
            if l.len() > 4096 {
                l.retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
            }
            log::warn!(
                "cluster: refused a datagram from {from} ({}); further refusals from it are counted, not logged, for a minute",
                why.name()
            );
        }
    }

    /// Takes one datagram that arrived from `from`.
    pub fn receive(&self, from: SocketAddr, d: &[u8]) {
        let o = match self.env.open(self.me.addr, d) {
            Ok(o) => o,
            Err(why) => return self.refuse(from, why),
        };
        let now = Instant::now();
        match o.frame {
            F_GOSSIP => {
                let mut rt = AccumulatingRuntime::new();
                let r = self.swim.lock().expect("swim").foca.handle_data(o.body, &mut rt);
                if r.is_err() {
                    self.refuse(from, Reject::Malformed);
                }
                self.run(rt, now);
            }
            F_STATE => {
                if self.on_state(from, o.body).is_err() {
                    self.refuse(from, Reject::Malformed);
                }
            }
            F_FRAG => {
                let whole = self.reasm.lock().expect("reasm").push(o.session, o.body, now);
                match whole {
                    Ok(Some(payload)) => match wire::decode_app(&payload, self.env.secure()) {
                        Ok(app) => self.on_app(app),
                        Err(_) => self.refuse(from, Reject::Malformed),
                    },
                    Ok(None) => {}
                    Err(frag::Drop::Late) => {
                        self.stats.messages_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => self.refuse(from, Reject::Malformed),
                }
            }
            F_BATCH => {
                let Ok((first, entries)) = batch::parse(o.body) else {
                    return self.refuse(from, Reject::Malformed);
                };
                let n = entries.clone().count() as u64;
                let late = self
                    .reasm
                    .lock()
                    .expect("reasm")
                    .take_run(o.session, first, n, now);
                if late > 0 {
                    self.stats.messages_dropped.fetch_add(late, Ordering::Relaxed);
                }
                for e in entries.skip(late as usize) {
                    match wire::decode_app(e, self.env.secure()) {
                        Ok(app) => self.on_app(app),
                        Err(_) => self.refuse(from, Reject::Malformed),
                    }
                }
            }
            F_STATUS_REQ => {
                let d = self
                    .env
                    .seal(from, F_STATUS, self.status_json().to_string().as_bytes());
                self.send_raw(from, &d);
            }
            F_ADMIN_REQ => self.on_admin_request(from, o.body),
            F_ADMIN => {
                let mut r = Reader::new(o.body);
                match (r.u64(), r.bytes()) {
                    (Ok(id), Ok(body)) => {
                        let waiting = self.admin_pending.lock().expect("admin").remove(&id);
                        if let Some(tx) = waiting {
                            let _ = tx.send(body.to_vec());
                        }
                    }
                    _ => self.refuse(from, Reject::Malformed),
                }
            }
            _ => self.refuse(from, Reject::Malformed),
        }
    }

    /// An admin request: taken only from a member this node holds as not down (a key holder
    /// that is not a member, such as `stage cluster status`, is refused), answered through
    /// the sink whenever it is done.
    fn on_admin_request(&self, from: SocketAddr, body: &[u8]) {
        let mut r = Reader::new(body);
        let (Ok(id), Ok(req)) = (r.u64(), r.bytes()) else {
            return self.refuse(from, Reject::Malformed);
        };
        let member = self
            .table
            .read()
            .expect("table")
            .get(&from)
            .is_some_and(|p| p.state != State::Down);
        let Some(sink) = self.sink.get() else { return };
        let this = self.this.clone();
        let reply: AdminReply = Box::new(move |answer: Vec<u8>| {
            let Some(e) = this.upgrade() else { return };
            let mut w = Writer::default();
            w.u64(id);
            w.bytes(&answer);
            let d = e.env.seal(from, F_ADMIN, &w.buf);
            e.send_raw(from, &d);
        });
        if !member {
            log::warn!("cluster: admin request from {from} refused: not a live member of this cluster");
            return reply(
                serde_json::json!({"status": 403, "body": {"error": format!(
                    "{} takes admin requests from live cluster members only, and {from} is not one", self.name
                )}})
                .to_string()
                .into_bytes(),
            );
        }
        sink.admin(&from.to_string(), req.to_vec(), reply);
    }

    /// Sends admin request `body` (small JSON) to member `node` (its name, `ip:port`);
    /// the answer arrives on the receiver. `Err` says why it cannot be sent. A request that
    /// gets no answer is forgotten with `admin_forget`.
    pub fn admin_request(
        &self,
        node: &str,
        body: &[u8],
    ) -> Result<(u64, tokio::sync::oneshot::Receiver<Vec<u8>>), AdminSendError> {
        let known = || {
            self.members()
                .iter()
                .map(|m| m.0.clone())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let addr = node
            .parse::<SocketAddr>()
            .ok()
            .filter(|a| self.table.read().expect("table").contains_key(a))
            .ok_or_else(|| {
                AdminSendError::Unknown(format!(
                    "no node \"{node}\" in the cluster (members: {})",
                    known()
                ))
            })?;
        let state = self.table.read().expect("table").get(&addr).map(|p| p.state);
        if state == Some(State::Down) {
            return Err(AdminSendError::Down(format!(
                "node {node} is down: it cannot be asked"
            )));
        }
        if body.len() > 32 * 1024 {
            return Err(AdminSendError::Down("admin request larger than 32 KiB".into()));
        }
        let id = self.admin_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.admin_pending.lock().expect("admin").insert(id, tx);
        let mut w = Writer::default();
        w.u64(id);
        w.bytes(body);
        let d = self.env.seal(addr, F_ADMIN_REQ, &w.buf);
        self.send_raw(addr, &d);
        Ok((id, rx))
    }

    /// Forgets admin request `id` (its answer did not come in time).
    pub fn admin_forget(&self, id: u64) {
        self.admin_pending.lock().expect("admin").remove(&id);
    }

    fn on_app(&self, app: App) {
        self.stats.messages_in.fetch_add(1, Ordering::Relaxed);
        let Some(sink) = self.sink.get() else { return };
        match app {
            App::One { stage, msg } => {
                if let Err(msg) = sink.one(&stage, msg) {
                    self.fail_request(msg, "no route");
                }
            }
            App::Failover { stage, msg, hops } => {
                let Err(msg) = sink.one(&stage, msg) else { return };
                // STAGE's fail-over nodes chain: pass it on, a bounded number of times.
                match self.failover() {
                    Some(next) if hops < MAX_FAILOVER_HOPS => {
                        let app = App::Failover {
                            stage,
                            msg,
                            hops: hops + 1,
                        };
                        if !self.send_or_log(next, &app) {
                            let App::Failover { msg, .. } = app else {
                                unreachable!()
                            };
                            self.fail_request(msg, "no route");
                        }
                    }
                    _ => self.fail_request(msg, "no route"),
                }
            }
            App::All { stage, msg } => {
                sink.all(&stage, &msg);
            }
            App::To { instance, msg } => {
                // A lock grant comes "from" the waiter itself: it is no longer pending.
                if msg.kind == Kind::Reply && msg.from.instance == instance && msg.from.node == self.name {
                    let mut p = self.pending_locks.lock().expect("pending locks");
                    if let Some(i) = p.iter().position(|w| w.cb == msg.id && w.from == *msg.from) {
                        p.remove(i);
                    }
                }
                if let Err(msg) = sink.to(instance, msg) {
                    self.fail_request(msg, "no route");
                }
            }
            App::Lock {
                op,
                name,
                cb,
                from,
                values,
            } => sink.lock(op, &name, &cb, Arc::new(from), values),
        }
    }

    /// A request that reached this node but no instance: its requester hears why at once.
    fn fail_request(&self, msg: Message, why: &str) {
        if let Kind::Request { cb, .. } = &msg.kind {
            let answer = Message {
                id: cb.clone(),
                from: Arc::new(SenderInfo {
                    node: self.name.clone(),
                    stage: String::new(),
                    instance: 0,
                }),
                values: vec![],
                kind: Kind::Failed(why.into()),
            };
            let _ = self.deliver_to(&msg.from, answer);
        } else {
            self.stats.messages_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The outbox of `to`.
    fn dest(&self, to: SocketAddr) -> Arc<Dest> {
        if let Some(d) = self.dests.read().expect("dests").get(&to) {
            return d.clone();
        }
        self.dests
            .write()
            .expect("dests")
            .entry(to)
            .or_insert_with(|| {
                Arc::new(Dest {
                    to,
                    out: Mutex::new(Outbox {
                        seq: 0,
                        buf: vec![],
                        since: None,
                        count: 0,
                    }),
                })
            })
            .clone()
    }

    /// Sends an application frame to `to`: numbered, encoded straight into the destination's
    /// batch, which goes out at once or (on a thread that defers) when the thread goes idle;
    /// a message larger than a datagram goes out at once in fragments, after the batch before
    /// it. `Err` when it cannot be encoded.
    fn send_app(&self, to: SocketAddr, app: &App) -> Result<(), &'static str> {
        let dest = self.dest(to);
        let mut o = dest.out.lock().expect("outbox");
        let fresh = o.buf.is_empty();
        if fresh {
            o.buf.resize(HEADER + BATCH_HEADER, 0);
        }
        let at = batch::begin_entry(&mut o.buf);
        let mut w = Writer {
            buf: std::mem::take(&mut o.buf),
        };
        let r = wire::put_app(&mut w, app, self.env.secure());
        o.buf = w.buf;
        let cut = if fresh { 0 } else { at };
        if let Err(e) = r {
            o.buf.truncate(cut);
            return Err(e);
        }
        if o.buf.len() - at - ENTRY_HEADER > frag::MAX_MESSAGE {
            o.buf.truncate(cut);
            return Err("message larger than the cluster's 8 MiB limit");
        }
        o.seq += 1;
        let seq = o.seq;
        if o.buf.len() - HEADER > self.batch_cap {
            // It does not fit with what waits: that goes first, then this message alone.
            let entry = o.buf.split_off(at + ENTRY_HEADER);
            o.buf.truncate(cut);
            self.flush_locked(to, &mut o);
            if BATCH_HEADER + ENTRY_HEADER + entry.len() <= self.batch_cap {
                o.buf.resize(HEADER, 0);
                batch::start(&mut o.buf, seq);
                let at = batch::begin_entry(&mut o.buf);
                o.buf.extend_from_slice(&entry);
                batch::finish_entry(&mut o.buf, at);
            } else {
                for f in frag::split(seq, &entry, self.chunk) {
                    let d = self.env.seal(to, F_FRAG, &f);
                    self.send_raw(to, &d);
                }
                return Ok(());
            }
        } else {
            batch::finish_entry(&mut o.buf, at);
            if fresh {
                o.buf[HEADER..HEADER + BATCH_HEADER].copy_from_slice(&seq.to_le_bytes());
            }
        }
        let deferred = DEFERRED
            .try_with(|d| match d.borrow_mut().as_mut() {
                Some(list) => {
                    if !list.iter().any(|(_, x)| Arc::ptr_eq(x, &dest)) {
                        list.push((self.this.clone(), dest.clone()));
                    }
                    true
                }
                None => false,
            })
            .unwrap_or(false);
        o.count += 1;
        if !deferred || o.count >= MAX_BATCH_MESSAGES {
            self.flush_locked(to, &mut o);
        } else {
            let now = Instant::now();
            match o.since {
                None => o.since = Some(now),
                Some(t) if now.duration_since(t) >= MAX_BATCH_DELAY => self.flush_locked(to, &mut o),
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Sends the batch of `dest`, if any.
    fn flush(&self, dest: &Dest) {
        let mut o = dest.out.lock().expect("outbox");
        self.flush_locked(dest.to, &mut o);
    }

    fn flush_locked(&self, to: SocketAddr, o: &mut Outbox) {
        o.since = None;
        o.count = 0;
        if o.buf.len() <= HEADER + BATCH_HEADER {
            o.buf.clear();
            return;
        }
        self.env.seal_in_place(to, F_BATCH, &mut o.buf);
        self.send_raw(to, &o.buf);
        o.buf.clear();
        // A message near the limit grew the buffer: give the memory back.
        if o.buf.capacity() > 4 * (HEADER + self.batch_cap) {
            o.buf = Vec::new();
        }
    }

    /// Sends the batches that waited `MAX_BATCH_DELAY` or longer (their threads stayed busy);
    /// the socket thread calls it every millisecond or so.
    pub fn flush_late(&self, now: Instant) {
        for d in self.dests.read().expect("dests").values() {
            let Ok(mut o) = d.out.try_lock() else { continue };
            if o.since.is_some_and(|t| now.duration_since(t) >= MAX_BATCH_DELAY) {
                self.flush_locked(d.to, &mut o);
            }
        }
    }

    fn send_or_log(&self, to: SocketAddr, app: &App) -> bool {
        match self.send_app(to, app) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("cluster: cannot send to {to}: {e}");
                false
            }
        }
    }

    // ---- routing ----------------------------------------------------------------------

    /// Nodes this one routes `stage` to (direction rule, live, state heard), with instance
    /// counts and load.
    /// Suspected nodes count only when no alive node has the stage.
    fn candidates(&self, stage: &str, same_host: bool) -> Vec<(SocketAddr, u32, u8)> {
        let all = self.candidates_with_state(stage, same_host);
        let alive: Vec<_> = all
            .iter()
            .filter(|c| c.3 == State::Alive)
            .map(|c| (c.0, c.1, c.2))
            .collect();
        if alive.is_empty() {
            all.into_iter().map(|c| (c.0, c.1, c.2)).collect()
        } else {
            alive
        }
    }

    fn candidates_with_state(&self, stage: &str, same_host: bool) -> Vec<(SocketAddr, u32, u8, State)> {
        let t = self.table.read().expect("table");
        let mut v: Vec<_> = self
            .cfg
            .peers
            .iter()
            .filter(|a| !same_host || a.ip() == self.me.addr.ip())
            .filter_map(|a| {
                let p = t.get(a)?;
                if p.state == State::Down || p.heard.is_none() {
                    return None;
                }
                let s = p.stages.iter().find(|s| s.stage == stage)?;
                Some((*a, s.instances, s.load, p.state))
            })
            .collect();
        v.dedup_by_key(|x| x.0);
        v
    }

    /// The first fail-over node that is a live member.
    fn failover(&self) -> Option<SocketAddr> {
        let t = self.table.read().expect("table");
        self.cfg
            .failover
            .iter()
            .find(|a| **a != self.me.addr && t.get(a).is_some_and(|p| p.state != State::Down))
            .copied()
    }

    /// `stage:msg` beyond this node: round-robin over the nodes that have the stage,
    /// skipping overloaded ones while another can take it; none: the fail-over chain.
    pub fn deliver_one(&self, stage: &str, msg: Message, same_host: bool) -> Result<(), Message> {
        let c = self.candidates(stage, same_host);
        let to = if c.is_empty() {
            if same_host {
                return Err(msg);
            }
            let Some(f) = self.failover() else { return Err(msg) };
            let app = App::Failover {
                stage: stage.to_string(),
                msg,
                hops: 0,
            };
            return if self.send_or_log(f, &app) {
                Ok(())
            } else {
                let App::Failover { msg, .. } = app else {
                    unreachable!()
                };
                Err(msg)
            };
        } else {
            let start = self.rr.fetch_add(1, Ordering::Relaxed);
            let n = c.len();
            (0..n)
                .map(|k| c[(start + k) % n])
                .find(|x| x.2 < OVERLOADED)
                .unwrap_or(c[start % n])
                .0
        };
        let app = App::One {
            stage: stage.to_string(),
            msg,
        };
        if self.send_or_log(to, &app) {
            Ok(())
        } else {
            let App::One { msg, .. } = app else { unreachable!() };
            Err(msg)
        }
    }

    /// `*stage:msg` beyond this node: every node that has the stage; returns the number of
    /// instances there.
    pub fn deliver_all(&self, stage: &str, msg: &Message) -> usize {
        let app = App::All {
            stage: stage.to_string(),
            msg: msg.clone(),
        };
        self.candidates(stage, false)
            .into_iter()
            .filter(|(a, _, _)| self.send_or_log(*a, &app))
            .map(|(_, n, _)| n as usize)
            .sum()
    }

    /// An answer (or grant) to the instance at `to` on another node. Answers go back to
    /// whoever asked, whatever the direction rule (the asker named this node, or was named).
    pub fn deliver_to(&self, to: &SenderInfo, msg: Message) -> Result<(), Message> {
        let Ok(addr) = to.node.parse::<SocketAddr>() else {
            return Err(msg);
        };
        if addr == self.me.addr {
            return match self.sink.get() {
                Some(s) => s.to(to.instance, msg),
                None => Err(msg),
            };
        }
        let app = App::To {
            instance: to.instance,
            msg,
        };
        if self.send_or_log(addr, &app) {
            Ok(())
        } else {
            let App::To { msg, .. } = app else { unreachable!() };
            Err(msg)
        }
    }

    /// The node that owns lock `name`: rendezvous hashing over this node and the members
    /// not down, so every node with the same view picks the same owner.
    pub fn lock_owner(&self, name: &str) -> SocketAddr {
        let t = self.table.read().expect("table");
        std::iter::once(self.me.addr)
            .chain(t.iter().filter(|(_, p)| p.state != State::Down).map(|(a, _)| *a))
            .max_by_key(|a| rendezvous(name, &a.to_string()))
            .expect("this node")
    }

    /// Forwards a lock operation to the owning node; false when this node owns the lock.
    pub fn forward_lock(
        &self,
        op: LockOp,
        name: &str,
        cb: &str,
        from: &SenderInfo,
        values: &[Value],
    ) -> bool {
        let owner = self.lock_owner(name);
        if owner == self.me.addr {
            return false;
        }
        {
            let mut p = self.pending_locks.lock().expect("pending locks");
            match op {
                LockOp::Acquire => {
                    if p.len() >= MAX_PENDING_LOCKS {
                        p.remove(0);
                    }
                    p.push(PendingLock {
                        owner,
                        name: name.to_string(),
                        cb: cb.to_string(),
                        from: from.clone(),
                        values: values.to_vec(),
                    });
                }
                // A waiter that gives up (or a holder that releases) is no longer pending.
                LockOp::Release => p.retain(|w| !(w.name == name && w.from == *from)),
                LockOp::Extend => {}
            }
        }
        self.send_or_log(
            owner,
            &App::Lock {
                op,
                name: name.to_string(),
                cb: cb.to_string(),
                from: from.clone(),
                values: values.to_vec(),
            },
        );
        true
    }

    // ---- status -----------------------------------------------------------------------

    /// Every member this node knows (itself first).
    pub fn members(&self) -> Vec<(String, State, Vec<StageLoad>)> {
        let mut out = vec![(
            self.name.clone(),
            State::Alive,
            self.sink.get().map(|s| s.local()).unwrap_or_default(),
        )];
        let t = self.table.read().expect("table");
        let mut others: Vec<_> = t
            .iter()
            .map(|(a, p)| (a.to_string(), p.state, p.stages.clone()))
            .collect();
        others.sort_by(|a, b| a.0.cmp(&b.0));
        out.extend(others);
        out
    }

    /// When each member started, in µs since the Unix epoch (its identity's generation),
    /// by node name; a member heard of only by address has none. Itself included.
    pub fn started_us(&self) -> HashMap<String, u64> {
        let mut out: HashMap<String, u64> = self
            .table
            .read()
            .expect("table")
            .iter()
            .filter_map(|(a, p)| Some((a.to_string(), p.ident.as_ref()?.generation)))
            .collect();
        out.insert(self.name.clone(), self.me.generation);
        out
    }

    /// What `stage cluster status` prints.
    pub fn status_json(&self) -> serde_json::Value {
        let members: Vec<_> = self
            .members()
            .into_iter()
            .map(|(node, state, stages)| {
                let routed = node.parse::<SocketAddr>().is_ok_and(|a| self.cfg.peers.contains(&a));
                serde_json::json!({
                    "node": node, "state": state.name(), "routed": routed,
                    "stages": stages.iter().map(|s| serde_json::json!({"stage": s.stage, "instances": s.instances, "load": s.load})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let rejected: serde_json::Map<_, _> = Reject::ALL
            .iter()
            .map(|r| (r.name().to_string(), self.rejected(*r).into()))
            .collect();
        serde_json::json!({
            "node": self.name, "secure": self.env.secure(), "members": members, "rejected": rejected,
            "failover": self.cfg.failover.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        })
    }

    /// This node's generation as the membership knows it now (it grows when the node is
    /// declared down somewhere and rejoins).
    pub fn generation(&self) -> u64 {
        self.swim.lock().expect("swim").foca.identity().generation
    }

    /// The identity foca holds for `addr` and whether foca counts it active (tests).
    #[cfg(test)]
    pub(crate) fn foca_member(&self, addr: SocketAddr) -> Option<(u64, bool)> {
        let s = self.swim.lock().expect("swim");
        let found = s
            .foca
            .iter_membership_state()
            .find(|m| m.id().addr == addr)
            .map(|m| (m.id().generation, m.state() != foca::State::Down));
        found
    }

    /// Leaves the cluster politely (others see `leave` at once instead of after detection).
    pub fn leave(&self) {
        let mut rt = AccumulatingRuntime::new();
        let _ = self.swim.lock().expect("swim").foca.leave_cluster(&mut rt);
        self.run(rt, Instant::now());
    }
}

/// A status request as `stage cluster status` sends it, and the reply's body.
pub fn status_request(env: &Envelope, to: SocketAddr) -> Vec<u8> {
    env.seal(to, F_STATUS_REQ, b"")
}

pub fn status_reply<'a>(env: &Envelope, me: SocketAddr, d: &'a [u8]) -> Option<&'a [u8]> {
    env.open(me, d)
        .ok()
        .filter(|o| o.frame == F_STATUS)
        .map(|o| o.body)
}

/// An admin request datagram as a member sends it (tests of who may send one).
pub fn admin_request_datagram(env: &Envelope, to: SocketAddr, id: u64, body: &[u8]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(id);
    w.bytes(body);
    env.seal(to, F_ADMIN_REQ, &w.buf)
}

/// The id and body of an admin answer datagram addressed to `me`.
pub fn admin_answer(env: &Envelope, me: SocketAddr, d: &[u8]) -> Option<(u64, Vec<u8>)> {
    let o = env.open(me, d).ok().filter(|o| o.frame == F_ADMIN)?;
    let mut r = Reader::new(o.body);
    Some((r.u64().ok()?, r.bytes().ok()?.to_vec()))
}

fn s(v: &str) -> Value {
    Value::Str(v.as_bytes().to_vec())
}

/// FNV-1a of `lock` and `node`: the rendezvous weight.
fn rendezvous(lock: &str, node: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in lock.bytes().chain([0]).chain(node.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    // Mix so nodes differing in the last digits spread well.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51afd7ed558ccd);
    h ^ (h >> 33)
}
