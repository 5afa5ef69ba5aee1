//! STAGE's ordered locks (`>ID.cb`, `>>ID.cb`, `<ID.*`) as a plain state machine: per lock
//! name a FIFO of waiters whose front is the holder, a lease that ends 100 ms after the grant
//! (or after the time a `>>` extension asked for), and the grants each operation causes.
//! The table decides; its owner (the router today, one node of the cluster later) delivers
//! the grants as ordinary addressed messages and reports back a holder it could not reach.

use crate::router::SenderInfo;
use crate::value::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a granted lock stays held without a `>>` extension (STAGE's `DEF_TIMEOUT`).
pub const LEASE: Duration = Duration::from_millis(100);

/// Someone waiting for (or holding) a lock: where to send the grant, and what.
#[derive(Debug, Clone)]
pub struct Waiter {
    pub from: Arc<SenderInfo>,
    /// The message id delivered to `from` when the lock is granted.
    pub cb: String,
    pub values: Vec<Value>,
}

/// A grant to deliver: message `cb` with `values` to `to`.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub name: String,
    pub to: Arc<SenderInfo>,
    pub cb: String,
    pub values: Vec<Value>,
}

struct Lock {
    /// The front is the holder once granted.
    queue: VecDeque<Waiter>,
    granted: bool,
    /// The lease runs out `LEASE` after this moment (STAGE's `timeUpdate`).
    since: Instant,
}

/// Why an extension or a release was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    #[error("lock '{0}' is not held")]
    NotHeld(String),
    #[error("lock '{0}' is held by {1}, not by the sender")]
    NotHolder(String, String),
}

/// Every lock of one owner.
pub struct LockTable {
    locks: HashMap<String, Lock>,
    lease: Duration,
}

fn same(a: &SenderInfo, b: &SenderInfo) -> bool {
    a.instance == b.instance && a.node == b.node && a.stage == b.stage
}

impl Default for LockTable {
    fn default() -> Self {
        LockTable::new(LEASE)
    }
}

impl LockTable {
    pub fn new(lease: Duration) -> LockTable {
        LockTable {
            locks: HashMap::new(),
            lease,
        }
    }

    /// `>name.cb`: queues `w`; returns the grant when the lock was free.
    pub fn acquire(&mut self, name: &str, w: Waiter, now: Instant) -> Option<Grant> {
        let lock = self.locks.entry(name.to_string()).or_insert_with(|| Lock {
            queue: VecDeque::new(),
            granted: false,
            since: now,
        });
        lock.queue.push_back(w);
        self.grant_next(name, now)
    }

    /// `>>name.x, ms`: the holder keeps the lock `ms` longer than a fresh lease.
    pub fn extend(&mut self, name: &str, who: &SenderInfo, ms: u64, now: Instant) -> Result<(), LockError> {
        let lock = self
            .locks
            .get_mut(name)
            .filter(|l| l.granted)
            .ok_or_else(|| LockError::NotHeld(name.to_string()))?;
        let holder = &lock.queue[0].from;
        if !same(holder, who) {
            return Err(LockError::NotHolder(name.to_string(), holder.address()));
        }
        lock.since = now + Duration::from_millis(ms);
        Ok(())
    }

    /// `<name.*`: the holder gives the lock up; returns the grant to the next waiter.
    pub fn release(
        &mut self,
        name: &str,
        who: &SenderInfo,
        now: Instant,
    ) -> Result<Option<Grant>, LockError> {
        let lock = self
            .locks
            .get_mut(name)
            .filter(|l| l.granted)
            .ok_or_else(|| LockError::NotHeld(name.to_string()))?;
        let holder = &lock.queue[0].from;
        if !same(holder, who) {
            return Err(LockError::NotHolder(name.to_string(), holder.address()));
        }
        Ok(self.drop_holder(name, now))
    }

    /// The holder of `name` could not be reached with its grant: the next waiter's turn.
    pub fn unreachable(&mut self, name: &str, now: Instant) -> Option<Grant> {
        self.drop_holder(name, now)
    }

    /// Ends every lease that ran out by `now`: `(name, former holder, grant to the next)`.
    pub fn expire(&mut self, now: Instant) -> Vec<(String, Arc<SenderInfo>, Option<Grant>)> {
        let lease = self.lease;
        let names: Vec<String> = self
            .locks
            .iter()
            .filter(|(_, l)| l.granted && now >= l.since + lease)
            .map(|(k, _)| k.clone())
            .collect();
        names
            .into_iter()
            .map(|name| {
                let holder = self.locks[&name].queue[0].from.clone();
                let grant = self.drop_holder(&name, now);
                (name, holder, grant)
            })
            .collect()
    }

    /// When the next lease runs out, if any lock is held.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.locks
            .values()
            .filter(|l| l.granted)
            .map(|l| l.since + self.lease)
            .min()
    }

    /// The holder of `name` and how many wait behind it.
    pub fn state(&self, name: &str) -> Option<(Arc<SenderInfo>, usize)> {
        let l = self.locks.get(name).filter(|l| l.granted)?;
        Some((l.queue[0].from.clone(), l.queue.len() - 1))
    }

    /// How many locks exist (held or waited for).
    pub fn len(&self) -> usize {
        self.locks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
    }

    fn drop_holder(&mut self, name: &str, now: Instant) -> Option<Grant> {
        let lock = self.locks.get_mut(name)?;
        if lock.granted {
            lock.queue.pop_front();
            lock.granted = false;
        }
        self.grant_next(name, now)
    }

    fn grant_next(&mut self, name: &str, now: Instant) -> Option<Grant> {
        let lock = self.locks.get_mut(name)?;
        if lock.granted {
            return None;
        }
        let Some(w) = lock.queue.front() else {
            self.locks.remove(name);
            return None;
        };
        lock.granted = true;
        lock.since = now;
        Some(Grant {
            name: name.to_string(),
            to: w.from.clone(),
            cb: w.cb.clone(),
            // The values are delivered once, with the grant.
            values: std::mem::take(&mut lock.queue[0].values),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(i: usize) -> Arc<SenderInfo> {
        Arc::new(SenderInfo {
            node: "n".into(),
            stage: "s".into(),
            instance: i,
        })
    }

    fn w(i: usize) -> Waiter {
        Waiter {
            from: who(i),
            cb: format!("cb{i}"),
            values: vec![Value::Int(i as i64)],
        }
    }

    #[test]
    fn fifo_grants_and_holder_checks() {
        let mut t = LockTable::default();
        let t0 = Instant::now();
        let g = t.acquire("L", w(1), t0).expect("free lock is granted at once");
        assert_eq!(
            (g.to.instance, g.cb.as_str(), &g.values[..]),
            (1, "cb1", &[Value::Int(1)][..])
        );
        assert!(t.acquire("L", w(2), t0).is_none());
        assert!(t.acquire("L", w(3), t0).is_none());
        assert_eq!(t.state("L").map(|(h, n)| (h.instance, n)), Some((1, 2)));
        // Only the holder may release or extend.
        assert!(matches!(
            t.release("L", &who(2), t0),
            Err(LockError::NotHolder(..))
        ));
        assert!(matches!(
            t.extend("L", &who(3), 10, t0),
            Err(LockError::NotHolder(..))
        ));
        assert_eq!(
            t.release("nope", &who(1), t0),
            Err(LockError::NotHeld("nope".into()))
        );
        let g = t.release("L", &who(1), t0).unwrap().expect("next waiter");
        assert_eq!(g.to.instance, 2);
        let g = t.release("L", &who(2), t0).unwrap().expect("next waiter");
        assert_eq!(g.to.instance, 3);
        assert!(t.release("L", &who(3), t0).unwrap().is_none());
        assert!(t.is_empty(), "a lock nobody holds or waits for is forgotten");
    }

    #[test]
    fn leases_expire_and_extend() {
        let mut t = LockTable::default();
        let t0 = Instant::now();
        t.acquire("L", w(1), t0).unwrap();
        t.acquire("L", w(2), t0);
        assert_eq!(t.next_deadline(), Some(t0 + LEASE));
        assert!(t.expire(t0 + Duration::from_millis(99)).is_empty());
        // Extended by 500 ms: the lease now ends 600 ms after t0.
        t.extend("L", &who(1), 500, t0).unwrap();
        assert!(t.expire(t0 + Duration::from_millis(599)).is_empty());
        let out = t.expire(t0 + Duration::from_millis(600));
        assert_eq!(out.len(), 1);
        let (name, old, grant) = &out[0];
        assert_eq!((name.as_str(), old.instance), ("L", 1));
        assert_eq!(grant.as_ref().unwrap().to.instance, 2);
        // The new holder's lease starts at its grant.
        let t1 = t0 + Duration::from_millis(600);
        assert_eq!(t.next_deadline(), Some(t1 + LEASE));
        let out = t.expire(t1 + LEASE);
        assert!(out[0].2.is_none());
        assert!(t.is_empty());
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn unreachable_holder_passes_the_lock_on() {
        let mut t = LockTable::default();
        let t0 = Instant::now();
        t.acquire("L", w(1), t0).unwrap();
        t.acquire("L", w(2), t0);
        assert_eq!(t.unreachable("L", t0).unwrap().to.instance, 2);
        assert!(t.unreachable("L", t0).is_none());
        assert!(t.unreachable("L", t0).is_none());
        assert!(t.is_empty());
    }
}
