//! The `ticket` built-in stage (STAGE's `=ticket+ticket`): per category a bounded number of
//! tickets; requests beyond it wait in a FIFO queue. Protocol (docs/stages.md):
//! * `"ticket:category=callback?feedback", v` asks for a ticket; when granted, message
//!   `callback` with `v` reaches the requester as a message whose answer (`stage.signal(nil,
//!   ms)` or the handler's return value) extends the ticket by `ms`, or gives it back with 0.
//!   `feedback` (optional) first gets `(request, true | "@id" | false)`: granted at once,
//!   queued as ticket `@id`, or refused.
//! * A ticket not extended is taken back `LEASE` after its grant (or its last extension).
//! * `"ticket:@category", limit [, close_ms]` creates or resizes a category; a negative limit
//!   refuses requests (no queue) once `|limit|` tickets are out; after `close_ms` the category
//!   grants no more tickets.
//! * `"ticket:=category", v` sends `v` as message `"ticket:category"` to every instance that
//!   holds or waits for a ticket of the category.

use super::{Builtin, Out};
use crate::router::{Kind, Message, SenderInfo};
use crate::value::Value;
use serde_json::Value as Json;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a granted ticket stays out without an extension (STAGE's `TICKET_EXPIRE`).
pub const LEASE: Duration = Duration::from_millis(1000);
/// Requests that may wait at once, over all categories (STAGE's `MAX_ACTIVITY_QUEUE`).
pub const QUEUE: usize = 10_000;

struct Category {
    /// Tickets of the category; negative: no waiting once they are all out.
    limit: i64,
    closes: Option<Instant>,
    held: usize,
    waiting: VecDeque<String>,
}

impl Category {
    fn open(&self, now: Instant) -> bool {
        self.closes.is_none_or(|c| now < c)
    }
}

struct Request {
    category: String,
    from: Arc<SenderInfo>,
    callback: String,
    values: Vec<Value>,
    /// Set while the ticket is held: when it is taken back.
    until: Option<Instant>,
}

/// The state of one `ticket` stage.
pub struct Ticket {
    stage: String,
    queue: usize,
    lease: Duration,
    categories: HashMap<String, Category>,
    requests: HashMap<String, Request>,
    /// The ids of the requests holding a ticket (the only ones with a deadline).
    holding: HashSet<String>,
    waiting: usize,
    next: u64,
}

fn number(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Int(i) => Some(*i),
        Value::Float(f) if f.is_finite() => Some(*f as i64),
        _ => None,
    }
}

impl Ticket {
    pub fn new(stage: &str, queue: usize, lease: Duration) -> Ticket {
        Ticket {
            stage: stage.to_string(),
            queue,
            lease,
            categories: HashMap::new(),
            requests: HashMap::new(),
            holding: HashSet::new(),
            waiting: 0,
            next: 0,
        }
    }

    /// STAGE's settings: `[queue, {"category": limit, ...}]`, `{"category": limit}` or `queue`.
    pub fn from_settings(stage: &str, settings: &Json) -> Result<Ticket, String> {
        let mut t = Ticket::new(stage, QUEUE, LEASE);
        let bad = |what: &str| format!("\"=ticket+{stage}\": {what}");
        let categories = |t: &mut Ticket, o: &serde_json::Map<String, Json>| -> Result<(), String> {
            for (k, v) in o {
                let limit = v
                    .as_i64()
                    .ok_or_else(|| bad(&format!("category \"{k}\": expected an integer limit, found {v}")))?;
                t.create(k, limit, None, Instant::now());
            }
            Ok(())
        };
        match settings {
            Json::Null => {}
            Json::Number(n) => {
                t.queue = n.as_u64().ok_or_else(|| bad("expected a queue size >= 0"))? as usize
            }
            Json::Object(o) => categories(&mut t, o)?,
            Json::Array(a) => {
                for v in a {
                    match v {
                        Json::Number(n) => {
                            t.queue = n.as_u64().ok_or_else(|| bad("expected a queue size >= 0"))? as usize
                        }
                        Json::Object(o) => categories(&mut t, o)?,
                        other => return Err(bad(&format!("unexpected {other}"))),
                    }
                }
            }
            other => {
                return Err(bad(&format!(
                    "expected [queue, {{category: limit}}], found {other}"
                )))
            }
        }
        Ok(t)
    }

    /// Creates or resizes a category.
    pub fn create(&mut self, name: &str, limit: i64, close_ms: Option<u64>, now: Instant) {
        let closes = close_ms.map(|ms| now + Duration::from_millis(ms));
        let c = self.categories.entry(name.to_string()).or_insert(Category {
            limit,
            closes,
            held: 0,
            waiting: VecDeque::new(),
        });
        c.limit = limit;
        c.closes = closes;
        log::info!("ticket: category '{name}' ready ({} tickets)", limit.abs());
    }

    /// Tickets out in `category` (tests, diagnostics).
    pub fn held(&self, category: &str) -> usize {
        self.categories.get(category).map_or(0, |c| c.held)
    }

    /// Requests waiting in `category`.
    pub fn waiting(&self, category: &str) -> usize {
        self.categories.get(category).map_or(0, |c| c.waiting.len())
    }

    /// A request for a ticket of `category`; the result as STAGE's feedback reports it.
    fn request(
        &mut self,
        category: &str,
        from: Arc<SenderInfo>,
        callback: &str,
        values: Vec<Value>,
        out: &Out,
        now: Instant,
    ) -> Value {
        let Some(c) = self.categories.get_mut(category).filter(|c| c.open(now)) else {
            return Value::Bool(false);
        };
        let max = c.limit.unsigned_abs() as usize;
        let full = c.held >= max;
        if full && (c.limit < 0 || self.waiting >= self.queue) {
            return Value::Bool(false);
        }
        self.next += 1;
        let id = format!("@{:x}", self.next);
        self.requests.insert(
            id.clone(),
            Request {
                category: category.to_string(),
                from,
                callback: callback.to_string(),
                values,
                until: None,
            },
        );
        if full {
            c.waiting.push_back(id.clone());
            self.waiting += 1;
            return Value::Str(id.into_bytes());
        }
        if self.grant(&id, out, now) {
            Value::Bool(true)
        } else {
            Value::Bool(false)
        }
    }

    /// Hands ticket `id` out: message `callback` to its requester. False if it cannot be
    /// delivered (the request is dropped).
    fn grant(&mut self, id: &str, out: &Out, now: Instant) -> bool {
        let Some(r) = self.requests.get_mut(id) else {
            return false;
        };
        let values = std::mem::take(&mut r.values);
        let kind = Kind::Signal {
            cb: Some(id.to_string()),
            implicit: true,
        };
        if out.send(&r.from, r.callback.clone(), values, kind) {
            r.until = Some(now + self.lease);
            self.holding.insert(id.to_string());
            if let Some(c) = self.categories.get_mut(&r.category) {
                c.held += 1;
            }
            true
        } else {
            log::warn!(
                "ticket {id}: its grant cannot reach {} (dropped)",
                r.from.address()
            );
            self.requests.remove(id);
            false
        }
    }

    /// Takes ticket or request `id` back and grants the category's next waiter.
    fn revoke(&mut self, id: &str, out: &Out, now: Instant) {
        let Some(r) = self.requests.remove(id) else {
            return;
        };
        let Some(c) = self.categories.get_mut(&r.category) else {
            return;
        };
        if r.until.is_none() {
            if let Some(i) = c.waiting.iter().position(|w| w == id) {
                c.waiting.remove(i);
                self.waiting -= 1;
            }
            return;
        }
        c.held -= 1;
        self.holding.remove(id);
        self.grant_waiters(&r.category, out, now);
    }

    fn grant_waiters(&mut self, category: &str, out: &Out, now: Instant) {
        loop {
            let Some(c) = self.categories.get_mut(category) else {
                return;
            };
            if !c.open(now) || c.held >= c.limit.unsigned_abs() as usize {
                return;
            }
            let Some(next) = c.waiting.pop_front() else {
                return;
            };
            self.waiting -= 1;
            self.grant(&next, out, now);
        }
    }

    /// `ticket:=category`: `values` to every instance with a ticket or a request there.
    fn broadcast(&self, category: &str, values: Vec<Value>, out: &Out) {
        let mut sent: HashSet<(String, usize)> = HashSet::new();
        for r in self.requests.values().filter(|r| r.category == category) {
            if sent.insert((r.from.node.clone(), r.from.instance)) {
                out.send(
                    &r.from,
                    format!("{}:{category}", self.stage),
                    values.clone(),
                    Kind::Reply,
                );
            }
        }
    }
}

impl Builtin for Ticket {
    fn handle(&mut self, msg: Message, out: &Out, now: Instant) {
        let id = msg.id.as_str();
        if let Some(category) = id.strip_prefix('=') {
            return self.broadcast(category, msg.values, out);
        }
        if let Some(name) = id.strip_prefix('@') {
            if self.requests.contains_key(id) {
                // The holder's answer: extend by ms, or give the ticket back with 0.
                match number(msg.values.first()) {
                    Some(ms) if ms > 0 => {
                        if let Some(r) = self.requests.get_mut(id).filter(|r| r.until.is_some()) {
                            r.until = Some(now + Duration::from_millis(ms as u64));
                        }
                    }
                    Some(_) => self.revoke(id, out, now),
                    None => {}
                }
                return;
            }
            // `ticket:@category`, limit [, close_ms] (also as one array).
            let args: Vec<Value> = match msg.values.as_slice() {
                [Value::Table(kv)] => kv.iter().map(|(_, v)| v.clone()).collect(),
                v => v.to_vec(),
            };
            match number(args.first()) {
                Some(limit) if !name.is_empty() => {
                    let close = number(args.get(1)).filter(|ms| *ms >= 0).map(|ms| ms as u64);
                    self.create(name, limit, close, now);
                    self.grant_waiters(name, out, now);
                }
                _ => log::warn!("ticket: \"{id}\" expects a category name and a limit"),
            }
            return;
        }
        let (callback, feedback) = match &msg.kind {
            Kind::Signal { cb: Some(cb), .. } => match cb.split_once('?') {
                Some((c, f)) => (c.to_string(), Some(f.to_string())),
                None => (cb.clone(), None),
            },
            _ => {
                log::warn!("ticket: \"{id}\" needs a callback: \"ticket:{id}=callback\"");
                return;
            }
        };
        let shown = msg.shown_id();
        let result = self.request(id, msg.from.clone(), &callback, msg.values, out, now);
        if let Some(f) = feedback {
            let request = Value::Str(format!("{}:{shown}", self.stage).into_bytes());
            out.send(&msg.from, f, vec![request, result], Kind::Reply);
        }
    }

    fn expire(&mut self, out: &Out, now: Instant) {
        let late: Vec<String> = self
            .holding
            .iter()
            .filter(|id| self.requests[*id].until.is_some_and(|u| u <= now))
            .cloned()
            .collect();
        for id in late {
            log::info!("ticket {id}: not extended, taken back");
            self.revoke(&id, out, now);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.holding.iter().filter_map(|id| self.requests[id].until).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::{NoRemote, Router};

    fn setup() -> (Arc<Router>, Vec<crate::router::Inbox>) {
        let stages: Vec<String> = ["a", "a", "ticket"].iter().map(|s| s.to_string()).collect();
        let r = Arc::new(Router::new("n", &stages, 64, Box::new(NoRemote)));
        let inboxes = (0..2).map(|i| r.take_inbox(i).unwrap()).collect();
        (r, inboxes)
    }

    fn ask(r: &Router, from: usize, category: &str, cb: &str, v: i64) -> Message {
        Message {
            id: category.into(),
            from: Arc::new(r.sender(from)),
            values: vec![Value::Int(v)],
            kind: Kind::Signal {
                cb: Some(cb.into()),
                implicit: true,
            },
        }
    }

    #[test]
    fn bounded_holders_fifo_release_and_lease() {
        let (r, mut inboxes) = setup();
        let out = Out {
            router: r.clone(),
            me: Arc::new(r.sender(2)),
        };
        let mut t = Ticket::from_settings("ticket", &serde_json::json!([100, {"db": 2}])).unwrap();
        let t0 = Instant::now();
        for v in 0..5 {
            t.handle(ask(&r, (v % 2) as usize, "db", "go?fb", v), &out, t0);
        }
        assert_eq!((t.held("db"), t.waiting("db")), (2, 3));
        // instance 0 asked for 0, 2, 4: granted 0; feedbacks true, "@3", "@5"
        let got: Vec<Message> = std::iter::from_fn(|| inboxes[0].try_recv().ok()).collect();
        let grants: Vec<_> = got.iter().filter(|m| m.id == "go").collect();
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].values, [Value::Int(0)]);
        assert_eq!(grants[0].from.stage, "ticket");
        let fb: Vec<_> = got
            .iter()
            .filter(|m| m.id == "fb")
            .map(|m| m.values[1].clone())
            .collect();
        assert_eq!(
            fb,
            [
                Value::Bool(true),
                Value::Str(b"@3".to_vec()),
                Value::Str(b"@5".to_vec())
            ]
        );
        assert_eq!(got[1].values[0], Value::Str(b"ticket:db=go?fb".to_vec()));
        // the holder of @1 gives it back: the first waiter (@3, value 2) gets it
        let answer = |id: &str, ms: i64| Message {
            id: id.into(),
            from: Arc::new(r.sender(0)),
            values: vec![Value::Int(ms)],
            kind: Kind::Reply,
        };
        t.handle(answer("@1", 0), &out, t0);
        let g = inboxes[0].try_recv().unwrap();
        assert_eq!((g.id.as_str(), &g.values[..]), ("go", &[Value::Int(2)][..]));
        assert_eq!(g.answer_id(), Some("@3"));
        assert_eq!((t.held("db"), t.waiting("db")), (2, 2));
        // @2 (instance 1) extends; @3 does not: after the lease only @3 is taken back
        t.handle(answer("@2", 5000), &out, t0);
        assert_eq!(t.next_deadline(), Some(t0 + LEASE));
        t.expire(&out, t0 + LEASE);
        assert_eq!((t.held("db"), t.waiting("db")), (2, 1), "@3 out, @4 in");
        let grants: Vec<Vec<Value>> = std::iter::from_fn(|| inboxes[1].try_recv().ok())
            .filter(|m| m.id == "go")
            .map(|m| m.values)
            .collect();
        assert_eq!(
            grants,
            [vec![Value::Int(1)], vec![Value::Int(3)]],
            "instance 1: @2 at once, @4 now"
        );
    }

    #[test]
    fn categories_negative_limits_closing_and_broadcast() {
        let (r, mut inboxes) = setup();
        let out = Out {
            router: r.clone(),
            me: Arc::new(r.sender(2)),
        };
        let mut t = Ticket::new("ticket", 100, LEASE);
        let t0 = Instant::now();
        let create = |name: &str, values: Vec<Value>| Message {
            id: format!("@{name}"),
            from: Arc::new(r.sender(0)),
            values,
            kind: Kind::Signal {
                cb: None,
                implicit: true,
            },
        };
        // unknown category: refused
        t.handle(ask(&r, 0, "room", "in?fb", 1), &out, t0);
        let fb = inboxes[0].try_recv().unwrap();
        assert_eq!(fb.values[1], Value::Bool(false));
        // a room of 2 that never queues
        t.handle(create("room", vec![Value::Int(-2)]), &out, t0);
        for v in 0..3 {
            t.handle(ask(&r, 1, "room", "in?fb", v), &out, t0);
        }
        let got: Vec<Message> = std::iter::from_fn(|| inboxes[1].try_recv().ok()).collect();
        let fb: Vec<_> = got
            .iter()
            .filter(|m| m.id == "fb")
            .map(|m| m.values[1].clone())
            .collect();
        assert_eq!(fb, [Value::Bool(true), Value::Bool(true), Value::Bool(false)]);
        assert_eq!(t.waiting("room"), 0);
        // everyone in the room hears a broadcast once per instance
        t.handle(
            Message {
                id: "=room".into(),
                from: Arc::new(r.sender(0)),
                values: vec![Value::Str(b"hi".to_vec())],
                kind: Kind::Signal {
                    cb: None,
                    implicit: true,
                },
            },
            &out,
            t0,
        );
        let b = inboxes[1].try_recv().unwrap();
        assert_eq!(
            (b.id.as_str(), &b.values[..]),
            ("ticket:room", &[Value::Str(b"hi".to_vec())][..])
        );
        assert!(inboxes[1].try_recv().is_err());
        // a category that closes after 10 ms (limit and close time as one array)
        let arr = Value::Table(vec![
            (Value::Int(1), Value::Int(5)),
            (Value::Int(2), Value::Int(10)),
        ]);
        t.handle(create("soon", vec![arr]), &out, t0);
        t.handle(
            ask(&r, 0, "soon", "x?fb", 0),
            &out,
            t0 + Duration::from_millis(20),
        );
        assert_eq!(inboxes[0].try_recv().unwrap().values[1], Value::Bool(false));
        // bad settings are named
        let e = Ticket::from_settings("ticket", &serde_json::json!({"db": "x"}))
            .err()
            .unwrap();
        assert!(e.contains("category \"db\""), "{e}");
    }
}
