//! The `route` built-in stage (STAGE's `=route+route`): subscriptions by id. Protocol
//! (docs/stages.md):
//! * `"route:@", {sub_id = "callback", other = true | false | ms}` subscribes the sending
//!   instance (`callback` gets the messages), resumes, pauses, or pauses for `ms`;
//!   `"route:@", true` keeps its subscriptions alive (they lapse after 30 s without any
//!   `route:@`), `"route:@", ms` / `false` pauses all of them, `"route:@"` (nil) drops them.
//! * `"route:sub_id?argument!fail=cb", v...` asks every active subscriber of `sub_id` (or of
//!   its `a.b.` / `a.` prefixes) with message `"route:@"` `(sub_id, token)` whether it takes
//!   the message; the first that answers `stage.signal(nil, token)` gets message `callback`
//!   with `(sub_id, v...)`, whose answers go to the original sender (as `cb` when given).
//!   Nobody accepting within 300 ms (or no subscriber): message `fail` `(sub_id, v...)`
//!   back to the sender.
//! * `"route:*sub_id", v...` goes to every active subscriber at once, without asking.

use super::{Builtin, Out};
use crate::router::{Kind, Message, SenderInfo};
use crate::value::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a subscriber has to accept a message (STAGE's `FAIL_TIMEOUT`).
pub const ACCEPT: Duration = Duration::from_millis(300);
/// Subscriptions not refreshed by any `route:@` for this long are dropped (`STABLE_TIMEOUT`).
pub const KEEPALIVE: Duration = Duration::from_secs(30);

struct Subscription {
    who: Arc<SenderInfo>,
    callback: String,
    /// `None`: active; `Some(None)`: paused until resumed; `Some(Some(t))`: paused until t.
    paused: Option<Option<Instant>>,
}

impl Subscription {
    fn active(&self, now: Instant) -> bool {
        match self.paused {
            None => true,
            Some(Some(t)) => now >= t,
            Some(None) => false,
        }
    }
}

/// A message waiting for a subscriber to accept it.
struct Pending {
    sub_id: String,
    from: Arc<SenderInfo>,
    values: Vec<Value>,
    fail: Option<String>,
    reply: Option<String>,
    candidates: Vec<(Arc<SenderInfo>, String)>,
    deadline: Instant,
}

/// The state of one `route` stage.
pub struct Route {
    /// Subscriptions by subscribe id.
    subs: HashMap<String, Vec<Subscription>>,
    /// When each subscriber (node, instance) last sent a `route:@`.
    seen: HashMap<(String, usize), Instant>,
    pending: HashMap<u64, Pending>,
    next: u64,
}

fn key(who: &SenderInfo) -> (String, usize) {
    (who.node.clone(), who.instance)
}

fn same(a: &SenderInfo, b: &SenderInfo) -> bool {
    a.instance == b.instance && a.node == b.node
}

impl Default for Route {
    fn default() -> Self {
        Route::new()
    }
}

impl Route {
    pub fn new() -> Route {
        Route {
            subs: HashMap::new(),
            seen: HashMap::new(),
            pending: HashMap::new(),
            next: 0,
        }
    }

    /// How many subscriptions `sub_id` has (tests, diagnostics).
    pub fn subscribers(&self, sub_id: &str) -> usize {
        self.subs.get(sub_id).map_or(0, Vec::len)
    }

    fn control(&mut self, who: &Arc<SenderInfo>, values: &[Value], now: Instant) {
        self.seen.insert(key(who), now);
        let mine = |s: &Subscription| same(&s.who, who);
        match values.first() {
            None | Some(Value::Nil) => {
                for v in self.subs.values_mut() {
                    v.retain(|s| !mine(s));
                }
                self.subs.retain(|_, v| !v.is_empty());
            }
            Some(Value::Bool(true)) => {}
            Some(Value::Bool(false)) => self.pause_all(who, Some(None)),
            Some(Value::Int(ms)) => {
                self.pause_all(who, Some(Some(now + Duration::from_millis((*ms).max(0) as u64))))
            }
            Some(Value::Table(kv)) => {
                for (k, v) in kv {
                    let Value::Str(k) = k else { continue };
                    let id = String::from_utf8_lossy(k).into_owned();
                    let list = self.subs.entry(id.clone()).or_default();
                    match v {
                        Value::Str(cb) => {
                            let callback = String::from_utf8_lossy(cb).into_owned();
                            match list.iter_mut().find(|s| mine(s)) {
                                Some(s) => {
                                    s.callback = callback;
                                    s.paused = None;
                                }
                                None => list.push(Subscription {
                                    who: who.clone(),
                                    callback,
                                    paused: None,
                                }),
                            }
                        }
                        other => {
                            let paused = match other {
                                Value::Bool(true) => None,
                                Value::Int(ms) => {
                                    Some(Some(now + Duration::from_millis((*ms).max(0) as u64)))
                                }
                                _ => Some(None),
                            };
                            for s in list.iter_mut().filter(|s| mine(s)) {
                                s.paused = paused;
                            }
                        }
                    }
                    if list.is_empty() {
                        self.subs.remove(&id);
                    }
                }
            }
            Some(_) => {}
        }
    }

    fn pause_all(&mut self, who: &SenderInfo, paused: Option<Option<Instant>>) {
        for s in self.subs.values_mut().flatten().filter(|s| same(&s.who, who)) {
            s.paused = paused;
        }
    }

    /// The active subscribers of `id`, or of its nearest `a.b.` / `a.` prefix that has some.
    fn candidates(&self, id: &str, now: Instant) -> Vec<(Arc<SenderInfo>, String)> {
        let mut keys = vec![id.to_string()];
        let body = id.strip_suffix('.').unwrap_or(id);
        for (i, _) in body.rmatch_indices('.') {
            keys.push(id[..=i].to_string());
        }
        for k in keys {
            let found: Vec<_> = self
                .subs
                .get(&k)
                .into_iter()
                .flatten()
                .filter(|s| s.active(now))
                .map(|s| (s.who.clone(), s.callback.clone()))
                .collect();
            if !found.is_empty() {
                return found;
            }
        }
        vec![]
    }

    fn deliver(out: &Out, p: &Pending, to: &SenderInfo, callback: &str) -> bool {
        let mut values = Vec::with_capacity(1 + p.values.len());
        values.push(Value::Str(p.sub_id.clone().into_bytes()));
        values.extend(p.values.iter().cloned());
        // The subscriber's answers go to the original sender.
        let msg = Message {
            id: callback.to_string(),
            from: p.from.clone(),
            values,
            kind: Kind::Signal {
                cb: p.reply.clone(),
                implicit: true,
            },
        };
        out.router.send_to_address(to, msg).is_ok()
    }

    fn fail(out: &Out, p: Pending) {
        let Some(fail) = p.fail else { return };
        let mut values = vec![Value::Str(p.sub_id.into_bytes())];
        values.extend(p.values);
        out.send(&p.from, fail, values, Kind::Reply);
    }

    fn publish(&mut self, msg: Message, out: &Out, now: Instant) {
        let (all, spec) = match msg.id.strip_prefix('*') {
            Some(rest) => (true, rest),
            None => (false, msg.id.as_str()),
        };
        let (head, fail) = match spec.split_once('!') {
            Some((h, f)) => (h, Some(f.to_string())),
            None => (spec, None),
        };
        let sub_id = head.split_once('?').map_or(head, |(s, _)| s).to_string();
        let reply = match &msg.kind {
            Kind::Signal { cb, .. } => cb.clone(),
            _ => None,
        };
        let p = Pending {
            candidates: self.candidates(&sub_id, now),
            sub_id,
            from: msg.from,
            values: msg.values,
            fail,
            reply,
            deadline: now + ACCEPT,
        };
        if p.candidates.is_empty() {
            return Route::fail(out, p);
        }
        if all {
            for (to, cb) in &p.candidates {
                Route::deliver(out, &p, to, cb);
            }
            return;
        }
        self.next += 1;
        let n = self.next;
        let mut asked = 0;
        for (i, (to, _)) in p.candidates.iter().enumerate() {
            let ask = Message {
                id: format!("{}:@", out.me.stage),
                from: out.me.clone(),
                values: vec![
                    Value::Str(p.sub_id.clone().into_bytes()),
                    Value::Str(format!("{n:x}+{i}").into_bytes()),
                ],
                kind: Kind::Signal {
                    cb: Some("=".into()),
                    implicit: false,
                },
            };
            asked += usize::from(out.router.send_to_address(to, ask).is_ok());
        }
        if asked == 0 {
            return Route::fail(out, p);
        }
        self.pending.insert(n, p);
    }

    /// A subscriber accepted (`"n+i"`): the message goes to candidate i.
    fn accept(&mut self, token: &[u8], out: &Out) {
        let token = String::from_utf8_lossy(token);
        let Some((n, i)) = token.split_once('+') else {
            return;
        };
        let (Ok(n), Ok(i)) = (u64::from_str_radix(n, 16), i.parse::<usize>()) else {
            return;
        };
        let Some(p) = self.pending.remove(&n) else { return };
        if let Some((to, cb)) = p.candidates.get(i) {
            if !Route::deliver(out, &p, to, cb) {
                Route::fail(out, p);
            }
        }
    }
}

impl Builtin for Route {
    fn handle(&mut self, msg: Message, out: &Out, now: Instant) {
        match msg.id.as_str() {
            "@" => self.control(&msg.from, &msg.values, now),
            "=" => {
                if let Some(Value::Str(token)) = msg.values.first() {
                    let token = token.clone();
                    self.accept(&token, out);
                }
            }
            _ => self.publish(msg, out, now),
        }
    }

    fn expire(&mut self, out: &Out, now: Instant) {
        let late: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for n in late {
            if let Some(p) = self.pending.remove(&n) {
                Route::fail(out, p);
            }
        }
        let stale: Vec<(String, usize)> = self
            .seen
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= KEEPALIVE)
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            self.seen.remove(&k);
            for v in self.subs.values_mut() {
                v.retain(|s| key(&s.who) != k);
            }
            self.subs.retain(|_, v| !v.is_empty());
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let p = self.pending.values().map(|p| p.deadline).min();
        let s = self.seen.values().map(|t| *t + KEEPALIVE).min();
        match (p, s) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::{NoRemote, Router};

    fn msg(r: &Router, from: usize, id: &str, values: Vec<Value>, cb: Option<&str>) -> Message {
        Message {
            id: id.into(),
            from: Arc::new(r.sender(from)),
            values,
            kind: Kind::Signal {
                cb: cb.map(str::to_string),
                implicit: true,
            },
        }
    }

    fn s(x: &str) -> Value {
        Value::Str(x.as_bytes().to_vec())
    }

    #[test]
    fn subscribe_accept_deliver_fail_and_broadcast() {
        let stages: Vec<String> = ["a", "b", "b", "route"].iter().map(|s| s.to_string()).collect();
        let r = Arc::new(Router::new("n", &stages, 64, Box::new(NoRemote)));
        let mut inboxes: Vec<_> = (0..3).map(|i| r.take_inbox(i).unwrap()).collect();
        let out = Out {
            router: r.clone(),
            me: Arc::new(r.sender(3)),
        };
        let mut rt = Route::new();
        let t0 = Instant::now();
        let sub = |id: &str, cb: &str| Value::Table(vec![(s(id), s(cb))]);
        rt.handle(msg(&r, 1, "@", vec![sub("login", "fetch")], None), &out, t0);
        rt.handle(msg(&r, 2, "@", vec![sub("login", "fetch2")], None), &out, t0);
        assert_eq!(rt.subscribers("login"), 2);
        // A publishes: both subscribers are asked
        rt.handle(
            msg(&r, 0, "login?x!oops", vec![Value::Int(7)], Some("done")),
            &out,
            t0,
        );
        let ask1 = inboxes[1].try_recv().unwrap();
        let ask2 = inboxes[2].try_recv().unwrap();
        assert_eq!(ask1.id, "route:@");
        assert_eq!(ask1.values[0], s("login"));
        assert_eq!(ask1.answer_id(), Some("="));
        // instance 2 accepts first: it alone gets the message, answerable to A as "done"
        rt.handle(msg(&r, 2, "=", vec![ask2.values[1].clone()], None), &out, t0);
        rt.handle(msg(&r, 1, "=", vec![ask1.values[1].clone()], None), &out, t0);
        let got = inboxes[2].try_recv().unwrap();
        assert_eq!(
            (got.id.as_str(), &got.values[..]),
            ("fetch2", &[s("login"), Value::Int(7)][..])
        );
        assert_eq!(got.from.instance, 0, "answers go to the original sender");
        assert_eq!(got.answer_id(), Some("done"));
        assert!(inboxes[1].try_recv().is_err());
        // nobody accepts: the fail callback after 300 ms
        rt.handle(msg(&r, 0, "login!oops", vec![Value::Int(8)], None), &out, t0);
        assert_eq!(rt.next_deadline(), Some(t0 + ACCEPT));
        rt.expire(&out, t0 + ACCEPT);
        let f = inboxes[0].try_recv().unwrap();
        assert_eq!(
            (f.id.as_str(), &f.values[..]),
            ("oops", &[s("login"), Value::Int(8)][..])
        );
        // "*login" reaches both at once; a paused subscriber is skipped
        for inbox in inboxes.iter_mut() {
            while inbox.try_recv().is_ok() {}
        }
        rt.handle(
            msg(
                &r,
                1,
                "@",
                vec![Value::Table(vec![(s("login"), Value::Bool(false))])],
                None,
            ),
            &out,
            t0,
        );
        rt.handle(msg(&r, 0, "*login", vec![Value::Int(9)], None), &out, t0);
        assert!(inboxes[1].try_recv().is_err(), "paused");
        assert_eq!(inboxes[2].try_recv().unwrap().id, "fetch2");
        // prefixes: "login.eu" finds "login." subscribers; unknown ids fail at once
        rt.handle(msg(&r, 1, "@", vec![sub("zone.", "z")], None), &out, t0);
        rt.handle(msg(&r, 0, "*zone.eu.west", vec![], None), &out, t0);
        assert_eq!(inboxes[1].try_recv().unwrap().id, "z");
        rt.handle(msg(&r, 0, "nobody!oops", vec![], None), &out, t0);
        assert_eq!(inboxes[0].try_recv().unwrap().id, "oops");
        // "route:@" with nil drops the sender's subscriptions; silence for 30 s drops them too
        rt.handle(msg(&r, 2, "@", vec![], None), &out, t0);
        assert_eq!(rt.subscribers("login"), 1);
        rt.expire(&out, t0 + KEEPALIVE);
        assert_eq!(rt.subscribers("login"), 0);
        assert_eq!(rt.subscribers("zone."), 0);
    }
}
