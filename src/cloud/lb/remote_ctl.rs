//! Remote-mode LBs in the controller: every LB placed on a VM ([`super::remote`]) is
//! restored from its record and supervised by the controller itself, from the moment remote
//! mode is enabled (the node's start), whether or not a script ever asks for it. Supervision
//! runs on one small tokio runtime of the process ("lb-remote"); each LB has a task that
//! checks its VM every `placement.interval` seconds (fail-over, [`RemoteLb::check`]), reads the
//! VM's `show stat` over the private network (backend state changes become `on_change`
//! events) and puts back any runtime server the VM lacks ([`RemoteLb::observe`]).
//!
//! Operations (`remote_add`, `remote_remove`, `remote_update`, …) block the calling thread
//! (the Lua binding runs them on a thread of their own) and are serialised per LB with the
//! supervision step by the LB's mutex. The desired state is written to the LB's record before
//! the VM is changed, so a replacement VM (rendered from the record's spec) keeps backends
//! added at runtime.

use super::controller::{emit, lock, prefixed, Controller, Event, Inner};
use super::remote::{self, Change, Placement, RemoteEvent, RemoteInfo, RemoteLb};
use super::{invalid, LbError, Result, Spec};
use crate::cloud::vultr::Client;
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

pub(super) type Shared = Arc<tokio::sync::Mutex<RemoteLb>>;

/// The remote LBs of one controller.
#[derive(Default)]
pub(crate) struct Remotes {
    client: OnceLock<Client>,
    lbs: Mutex<BTreeMap<String, Shared>>,
    /// Serialises restoring a record (start-up and a concurrent `lb.get`).
    restoring: tokio::sync::Mutex<()>,
}

/// The runtime remote supervision and operations run on (one per process, never dropped).
fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lb-remote")
            .enable_all()
            .build()
            .expect("the lb-remote runtime")
    })
}

/// A remote fail-over step as an event for `on_failover`.
fn failover_event(ev: RemoteEvent) -> Event {
    let mut e = Event::new(&ev.lb, "failover", &ev.state);
    e.reason = Some(ev.reason);
    e.old_instance = Some(ev.old_instance);
    e.new_instance = ev.new_instance;
    e.reserved_ip = ev.reserved_ip;
    e.seconds = ev.seconds;
    e
}

fn change_event(lb: &str, ch: Change) -> Event {
    let mut e = Event::new(lb, "backend", &ch.state);
    e.backend = Some(ch.backend);
    e.previous = ch.previous;
    e.check = ch.check;
    e
}

/// The LB `name` of this process: from the map, else restored from its record (and its
/// supervision started). `None` when there is no such remote LB.
async fn ensure(weak: &Weak<Inner>, name: &str) -> Result<Option<Shared>> {
    let Some(inner) = weak.upgrade() else {
        return Ok(None);
    };
    if let Some(s) = lock(&inner.remote.lbs).get(name).cloned() {
        return Ok(Some(s));
    }
    let _g = inner.remote.restoring.lock().await;
    if let Some(s) = lock(&inner.remote.lbs).get(name).cloned() {
        return Ok(Some(s));
    }
    let Some(rec) = inner.store.load_remote(name)? else {
        return Ok(None);
    };
    let client = client_of(&inner)?;
    let lb = RemoteLb::restore(&client, rec).await?;
    log::info!(target: "lb", "lb {name}: restored on vm {} (remote mode); supervising it", lb.instance.id);
    Ok(Some(start(&inner, lb, client)))
}

fn client_of(inner: &Inner) -> Result<Client> {
    inner.remote.client.get().cloned().ok_or_else(|| {
        LbError::Failed(
            "lb: remote mode needs the Vultr API: add %vultr (endpoint, api_key) to conf/stage.json".into(),
        )
    })
}

/// Registers `lb` and starts its supervision task.
fn start(inner: &Arc<Inner>, lb: RemoteLb, client: Client) -> Shared {
    let name = lb.spec.name.clone();
    let shared: Shared = Arc::new(tokio::sync::Mutex::new(lb));
    lock(&inner.remote.lbs).insert(name.clone(), shared.clone());
    let weak = Arc::downgrade(inner);
    rt().spawn(supervise(weak, name, shared.clone(), client));
    shared
}

async fn supervise(weak: Weak<Inner>, name: String, shared: Shared, client: Client) {
    loop {
        let interval = shared.lock().await.placement.interval;
        tokio::time::sleep(Duration::from_secs_f64(interval)).await;
        let Some(inner) = weak.upgrade() else { return };
        if inner.stop.load(Ordering::SeqCst) {
            return;
        }
        let mut lb = shared.lock().await;
        if lb.deleted {
            return;
        }
        let before = lb.record();
        let mut events = Vec::new();
        match lb.check(&client).await {
            Ok(Some(ev)) => events.push(failover_event(ev)),
            Ok(None) => {}
            Err(e) => log::warn!(target: "lb", "lb {name}: supervision: {e}"),
        }
        if lb.state == "up" {
            match lb.observe().await {
                Ok(changes) => events.extend(changes.into_iter().map(|c| change_event(&name, c))),
                Err(e) => log::debug!(target: "lb", "lb {name}: show stat: {e}"),
            }
        }
        if lb.record() != before {
            if let Err(e) = inner.store.put_remote(&lb.record()) {
                log::error!(target: "lb", "lb {name}: {e}");
            }
        }
        drop(lb);
        for ev in events {
            emit(&inner, ev);
        }
    }
}

impl Controller {
    /// Enables remote mode with this Vultr client: every LB recorded in the store's
    /// `stage_lb_remote` table is restored and supervised from now on (in the background; an operation
    /// on one that is not restored yet restores it first). Only the first call counts.
    pub fn enable_remote(&self, client: Client) {
        if self.inner.remote.client.set(client).is_err() {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let names = self.recorded_remote_names();
        if names.is_empty() {
            return;
        }
        rt().spawn(async move {
            for name in names {
                if let Err(e) = ensure(&weak, &name).await {
                    log::error!(target: "lb", "lb {name}: cannot restore (remote mode): {e}");
                }
            }
        });
    }

    /// Whether remote mode has a client.
    pub fn remote_enabled(&self) -> bool {
        self.inner.remote.client.get().is_some()
    }

    /// Whether `name` is a remote LB (supervised, or recorded).
    pub fn is_remote(&self, name: &str) -> bool {
        lock(&self.inner.remote.lbs).contains_key(name)
            || matches!(self.inner.store.load_remote(name), Ok(Some(_)))
    }

    /// Names of the remote LBs recorded in the store (an unreadable store is logged).
    fn recorded_remote_names(&self) -> Vec<String> {
        self.inner.store.remote_names().unwrap_or_else(|e| {
            log::error!(target: "lb", "remote lbs: {e}");
            Vec::new()
        })
    }

    /// Names of every remote LB (supervised or recorded).
    pub fn remote_names(&self) -> Vec<String> {
        let mut names = self.recorded_remote_names();
        names.extend(lock(&self.inner.remote.lbs).keys().cloned());
        names.sort();
        names.dedup();
        names
    }

    fn shared(&self, name: &str) -> Result<Shared> {
        let weak = Arc::downgrade(&self.inner);
        let n = name.to_string();
        rt().block_on(async move { ensure(&weak, &n).await })?
            .ok_or_else(|| LbError::NotFound(format!("lb {name:?} does not exist")))
    }

    /// Creates an LB on a VM (blocks until the VM is ready and the reserved IP attached).
    pub fn remote_create(&self, spec: Spec, placement: Placement) -> Result<RemoteInfo> {
        let what = "lb.create";
        let name = spec.name.clone();
        if self.exists(&name) || self.is_remote(&name) {
            return Err(LbError::Exists(format!(
                "{what}: lb {name:?} exists (use lb.get to reach it, or delete it first)"
            )));
        }
        if spec.autoscale.is_some() {
            return Err(invalid(format!(
                "{what}: autoscale: not available with placement (remote mode) yet"
            )));
        }
        let client = client_of(&self.inner)?;
        remote::validate(&spec).map_err(|e| prefixed(what, e))?;
        let inner = self.inner.clone();
        rt().block_on(async move {
            let lb = RemoteLb::provision(&client, spec, placement).await?;
            inner.store.put_remote(&lb.record())?;
            log::info!(target: "lb", "lb {name}: created on vm {} (remote mode)", lb.instance.id);
            let info = lb.info();
            start(&inner, lb, client);
            Ok(info)
        })
    }

    /// A remote LB now (the backends as last read from its VM).
    pub fn remote_info(&self, name: &str) -> Result<RemoteInfo> {
        let s = self.shared(name)?;
        Ok(rt().block_on(async move { s.lock().await.info() }))
    }

    /// Adds a backend to a remote LB: recorded, then `add server` → `enable health` →
    /// `enable server` over the private network. While the VM is down (or being replaced)
    /// the backend stays recorded and reaches the VM that serves next.
    pub fn remote_add(&self, name: &str, address: &str) -> Result<()> {
        let what = format!("{name}.add");
        let s = self.shared(name)?;
        let inner = self.inner.clone();
        let address = address.to_string();
        rt().block_on(async move {
            let mut lb = s.lock().await;
            let (spec, b) = lb.with_backend(&what, &address)?;
            let old = std::mem::replace(&mut lb.spec, spec);
            if let Err(e) = inner.store.put_remote(&lb.record()) {
                lb.spec = old;
                return Err(e);
            }
            let applied = match lb.runtime() {
                Ok(rt) => rt.add_server(&lb.spec, &b).await,
                Err(e) => Err(e),
            };
            match applied {
                Ok(()) => {
                    log::info!(target: "lb", "lb {name}: added backend {} on vm {}", b.address, lb.instance.id);
                    Ok(())
                }
                Err(LbError::Failed(e)) if lb.state != "up" => {
                    log::warn!(target: "lb", "lb {name}: backend {} recorded; vm {} is {} ({e}); it gets it when it serves", b.address, lb.instance.id, lb.state);
                    Ok(())
                }
                Err(e) => {
                    lb.spec = old;
                    if let Err(e) = inner.store.put_remote(&lb.record()) {
                        log::error!(target: "lb", "lb {name}: {e}");
                    }
                    Err(prefixed(&what, e))
                }
            }
        })
    }

    /// Removes a backend of a remote LB: recorded, then drain → maint → wait for its
    /// sessions to end (`drain` seconds) → `del server` over the private network.
    pub fn remote_remove(&self, name: &str, address: &str) -> Result<()> {
        let what = format!("{name}.remove");
        let s = self.shared(name)?;
        let inner = self.inner.clone();
        let address = address.to_string();
        let n = name.to_string();
        rt().block_on(async move {
            let mut lb = s.lock().await;
            let (spec, addr) = lb.without_backend(&what, &address)?;
            let drain = spec.drain;
            let old = std::mem::replace(&mut lb.spec, spec);
            if let Err(e) = inner.store.put_remote(&lb.record()) {
                lb.spec = old;
                return Err(e);
            }
            let prev = lb.servers.remove(&addr).map(|v| v.state);
            let result = match lb.runtime() {
                Ok(rt) => rt.remove_server(&n, &addr, drain).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {}
                Err(LbError::Failed(e)) if lb.state != "up" => {
                    log::warn!(target: "lb", "lb {n}: backend {addr} removed from the record; vm {} is {} ({e})", lb.instance.id, lb.state);
                }
                Err(e) => return Err(prefixed(&what, e)),
            }
            drop(lb);
            let mut ev = Event::new(&n, "backend", "REMOVED");
            ev.backend = Some(addr.clone());
            ev.previous = prev;
            emit(&inner, ev);
            log::info!(target: "lb", "lb {n}: removed backend {addr}");
            Ok(())
        })
    }

    /// Changes a remote LB's fields (not name or backends). A change of the rendered config
    /// is rolled out blue-green ([`RemoteLb::roll`]): the new VM serves before the reserved IP
    /// moves and the old VM goes; a config HAProxy rejects, or a new VM that does not come
    /// up, changes nothing. Other changes (`drain`, `project`) are only recorded.
    pub fn remote_update(&self, name: &str, changes: &Json) -> Result<RemoteInfo> {
        let what = format!("{name}.update");
        let s = self.shared(name)?;
        let client = client_of(&self.inner)?;
        let inner = self.inner.clone();
        let changes = changes.clone();
        rt().block_on(async move {
            let mut lb = s.lock().await;
            if changes.get("placement").is_some() {
                return Err(invalid(format!(
                    "{what}: placement cannot change (delete and create instead)"
                )));
            }
            let spec = lb.spec.updated(&what, &changes)?;
            if spec.autoscale.is_some() {
                return Err(invalid(format!(
                    "{what}: autoscale: not available in remote mode yet"
                )));
            }
            if remote::vm_config(&spec, "x") == remote::vm_config(&lb.spec, "x") {
                lb.spec = spec;
            } else {
                lb.roll(&client, &what, spec).await?;
            }
            inner.store.put_remote(&lb.record())?;
            Ok(lb.info())
        })
    }

    /// Deletes a remote LB: its VM(s) destroyed, its record removed; the reserved IP stays
    /// reserved (detached).
    pub fn remote_delete(&self, name: &str) -> Result<()> {
        let s = self.shared(name)?;
        let client = client_of(&self.inner)?;
        rt().block_on(async move { s.lock().await.delete(&client).await })?;
        if let Err(e) = self.inner.store.delete_remote(name) {
            log::error!(target: "lb", "lb {name}: deleted, but its record stays: {e}");
        }
        lock(&self.inner.remote.lbs).remove(name);
        lock(&self.inner.subs).retain(|(n, _)| n != name);
        log::info!(target: "lb", "lb {name}: deleted (remote mode)");
        Ok(())
    }
}
