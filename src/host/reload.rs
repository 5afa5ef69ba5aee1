//! The reload check of a deploy (`PUT /packages`, docs/admin.md): the admin API asks every
//! Lua instance of the node to load again, at once, the scripts it has loaded with
//! `stage.load` (the loader's hot reload, API.md §1, done now instead of on the next call),
//! and waits for each instance's answer: the scripts that failed to load. Plain Rust: the
//! instances (host/instance.rs) run the loads, the admin API only asks and waits.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// The instances that take part, what was asked last and what each one answered.
pub struct Reloads {
    asked: tokio::sync::watch::Sender<u64>,
    /// Per instance name: the last request it answered and that answer's errors.
    board: Mutex<BTreeMap<String, (u64, Vec<String>)>>,
    changed: tokio::sync::Notify,
}

/// What a reload check found.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Per instance: the scripts that failed to load (`script … failed to load: …`).
    pub failed: Vec<(String, Vec<String>)>,
    /// Instances that did not answer in time (a handler that never yields).
    pub late: Vec<String>,
    /// How many instances answered.
    pub answered: usize,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.failed.is_empty() && self.late.is_empty()
    }

    /// One sentence naming every failure.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .failed
            .iter()
            .map(|(i, errs)| format!("{i}: {}", errs.join("; ")))
            .collect();
        for i in &self.late {
            parts.push(format!(
                "{i}: did not finish reloading in time (a handler that never yields?)"
            ));
        }
        parts.join(" | ")
    }
}

impl Default for Reloads {
    fn default() -> Self {
        Reloads {
            asked: tokio::sync::watch::channel(0).0,
            board: Mutex::new(BTreeMap::new()),
            changed: tokio::sync::Notify::new(),
        }
    }
}

impl Reloads {
    /// Instance `name` takes part from now on: the receiver moves at each request. It counts
    /// as having answered what was asked before (it has loaded nothing older).
    pub fn join(&self, name: &str) -> tokio::sync::watch::Receiver<u64> {
        let rx = self.asked.subscribe();
        let now = *rx.borrow();
        self.board
            .lock()
            .expect("reloads")
            .insert(name.to_string(), (now, vec![]));
        rx
    }

    /// Instance `name` stops (its thread ends): it is no longer waited for.
    pub fn leave(&self, name: &str) {
        self.board.lock().expect("reloads").remove(name);
        self.changed.notify_waiters();
    }

    /// Instance `name` answers request `seq`.
    pub fn report(&self, name: &str, seq: u64, errors: Vec<String>) {
        if let Some(e) = self.board.lock().expect("reloads").get_mut(name) {
            *e = (seq, errors);
        }
        self.changed.notify_waiters();
    }

    /// Asks every instance to reload now; returns the request's number for `wait`.
    pub fn ask(&self) -> u64 {
        let mut seq = 0;
        self.asked.send_modify(|v| {
            *v += 1;
            seq = *v;
        });
        seq
    }

    /// Waits until every instance answered request `seq` or `limit` passed.
    pub async fn wait(&self, seq: u64, limit: Duration) -> Outcome {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (done, outcome) = {
                let b = self.board.lock().expect("reloads");
                let mut o = Outcome::default();
                for (name, (answered, errors)) in b.iter() {
                    if *answered < seq {
                        o.late.push(name.clone());
                    } else {
                        o.answered += 1;
                        if !errors.is_empty() {
                            o.failed.push((name.clone(), errors.clone()));
                        }
                    }
                }
                (o.late.is_empty(), o)
            };
            if done || tokio::time::Instant::now() >= deadline {
                return outcome;
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_every_instance_and_collects_errors() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let r = std::sync::Arc::new(Reloads::default());
            let mut a = r.join("web#0");
            let _b = r.join("db#1");
            let seq = r.ask();
            assert!(a.has_changed().unwrap());
            a.borrow_and_update();
            r.report("web#0", seq, vec![]);
            let late = r.wait(seq, Duration::from_millis(50)).await;
            assert_eq!(late.late, vec!["db#1".to_string()]);
            assert!(!late.ok());
            let r2 = r.clone();
            let t = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                r2.report("db#1", seq, vec!["script x failed to load: boom".into()]);
            });
            let o = r.wait(seq, Duration::from_secs(5)).await;
            t.await.unwrap();
            assert_eq!(o.answered, 2);
            assert!(o.late.is_empty());
            assert_eq!(o.describe(), "db#1: script x failed to load: boom");
            r.leave("db#1");
            assert!(r.wait(seq, Duration::from_millis(10)).await.ok());
        });
    }
}
