//! Timing of script work: `stage.addtask` timers, `stage.submit` keyed queues, and the
//! "run me again after N ms" rule for callbacks that return a number.

use crate::host::callback::{call_callback, spawn_callback};
use crate::host::context::{ctx, InstanceCtx};
use crate::host::convert;
use mlua::{Function, Lua, MultiValue};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::spawn_local;

/// A positive number returned by callback `what`: "run me again after that many ms"
/// (clamped to `convert::MAX_DURATION`). NaN is logged as an error and ends the repeats.
pub fn rerun_after(lua: &Lua, what: &str, rets: &Option<MultiValue>) -> Option<Duration> {
    let first = rets.as_ref().and_then(|r| r.front());
    convert::rerun_after(what, first).unwrap_or_else(|e| {
        log::error!(target: &ctx(lua).name, "error in {what}: {e}; not run again");
        None
    })
}

/// What `stage.addtask(task, ms [, f])` changes in a pending task.
pub struct TaskCtl {
    /// The next delay, set by a reschedule: it replaces the wait in progress, or the
    /// callback's own answer when it is running.
    resched: Cell<Option<Duration>>,
    f: RefCell<Function>,
    wake: Notify,
}

impl InstanceCtx {
    /// `stage.addtask`: runs `f(args)` after `delay`, again while it returns a positive number.
    pub fn add_task(&self, lua: &Lua, delay: Duration, f: Function, args: MultiValue) -> i64 {
        let id = self.next_task.get() + 1;
        self.next_task.set(id);
        let lua2 = lua.clone();
        let ctl = Rc::new(TaskCtl {
            resched: Cell::new(None),
            f: RefCell::new(f),
            wake: Notify::new(),
        });
        let ctl2 = ctl.clone();
        let handle = spawn_local(async move {
            let mut delay = delay;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = ctl2.wake.notified() => {
                        if let Some(d) = ctl2.resched.take() {
                            delay = d;
                        }
                        continue;
                    }
                }
                let f = ctl2.f.borrow().clone();
                let rets = call_callback(&lua2, "task", &f, args.clone()).await;
                let next = rerun_after(&lua2, "task", &rets);
                match ctl2.resched.take().or(next) {
                    Some(d) => delay = d,
                    None => break,
                }
            }
            ctx(&lua2).tasks.borrow_mut().remove(&id);
        });
        self.tasks.borrow_mut().insert(id, (handle.abort_handle(), ctl));
        id
    }

    /// Cancels a task; returns whether it was still pending.
    pub fn cancel_task(&self, id: i64) -> bool {
        match self.tasks.borrow_mut().remove(&id) {
            Some((h, _)) => {
                h.abort();
                true
            }
            None => false,
        }
    }

    /// `stage.addtask(task, ms [, f])`: the task runs next after `delay` (from now), with `f`
    /// from then on when given. Returns whether the task was still pending.
    pub fn reschedule_task(&self, id: i64, delay: Duration, f: Option<Function>) -> bool {
        let Some(ctl) = self.tasks.borrow().get(&id).map(|(_, c)| c.clone()) else {
            return false;
        };
        if let Some(f) = f {
            *ctl.f.borrow_mut() = f;
        }
        ctl.resched.set(Some(delay));
        ctl.wake.notify_one();
        true
    }

    /// `stage.submit`: calls with the same non-empty key run one after the other, in order.
    pub fn submit(&self, lua: &Lua, key: Option<String>, f: Function, args: MultiValue) {
        let Some(key) = key else {
            spawn_callback(lua, "submit".into(), f, args);
            return;
        };
        {
            let mut submits = self.submits.borrow_mut();
            if let Some(queue) = submits.get_mut(&key) {
                queue.push_back((f, args));
                return;
            }
            submits.insert(key.clone(), VecDeque::new());
        }
        let lua = lua.clone();
        spawn_local(async move {
            let (mut f, mut args) = (f, args);
            loop {
                let rets = call_callback(&lua, "submit", &f, args.clone()).await;
                if let Some(d) = rerun_after(&lua, "submit", &rets) {
                    tokio::time::sleep(d).await;
                    continue;
                }
                let next = {
                    let ctx = ctx(&lua);
                    let mut submits = ctx.submits.borrow_mut();
                    let next = submits.get_mut(&key).and_then(|q| q.pop_front());
                    if next.is_none() {
                        submits.remove(&key);
                    }
                    next
                };
                match next {
                    Some((nf, na)) => (f, args) = (nf, na),
                    None => break,
                }
            }
        });
    }
}
