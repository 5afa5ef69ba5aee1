//! The controller: the desired state of every LB (persisted in the [`Store`] before the data
//! plane changes), one HAProxy process per LB converged to it, and a monitor thread that polls
//! each process (alive, runtime API answering, frontend accepting), turns server state changes
//! into [`Event`]s and replaces a crashed HAProxy within a tick (fail-over).
//!
//! Operations block (they talk to HAProxy and the database) and are serialised per LB; the Lua
//! binding runs them off the instance thread. One controller serves a state directory
//! (`HOME/var/lb`) for the whole process; [`Controller::open`] returns the shared one.

use super::autoscale::{Decision, Observation, Scaler};
use super::haproxy::{self, Runtime};
use super::render::{self, backend_name, server_name, Paths};
use super::store::Store;
use super::{parse_address, Backend, LbError, Metric, Protocol, Result, Spec, MAX_BACKENDS};
use serde::Serialize;
use serde_json::Value as Json;
use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

pub mod metrics;

/// How often the monitor polls every LB.
pub const TICK: Duration = Duration::from_millis(200);
/// How often the frontend is probed with a TCP connect.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Failed frontend probes in a row that count as a crash (with a live process).
const PROBE_FAILURES: u32 = 3;

/// Something that happened to an LB, for `on_change` / `on_failover` and the log.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    pub lb: String,
    /// `backend` (a health or admin state change), `failover`, `scale`.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The new state: `UP`, `DOWN`, `MAINT`, `DRAIN`, `REMOVED`; `replaced` for a fail-over.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// HAProxy's last check status (`L7OK`, `L4CON`, …) for backend events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    /// Free text: why a fail-over happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Fail-over: the old and the new master pid, and seconds from detection to serving.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Remote mode's fail-over: the VM that went down, its replacement, the reserved IP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_instance: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_instance: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved_ip: Option<String>,
}

impl Event {
    pub(super) fn new(lb: &str, kind: &str, state: &str) -> Event {
        Event {
            lb: lb.into(),
            kind: kind.into(),
            backend: None,
            state: state.into(),
            previous: None,
            check: None,
            reason: None,
            old_pid: None,
            new_pid: None,
            seconds: None,
            old_instance: None,
            new_instance: None,
            reserved_ip: None,
        }
    }
}

/// One backend as `info()` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BackendInfo {
    pub address: String,
    pub server: String,
    pub state: String,
    pub check: String,
    /// Current and total sessions, sessions per second.
    pub sessions: u64,
    pub total: u64,
    pub rate: u64,
    pub queue: u64,
    pub autoscaled: bool,
}

/// An LB as `info()` / `lb.list()` show it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Info {
    pub name: String,
    pub protocol: String,
    pub listen: String,
    pub algorithm: String,
    pub running: bool,
    pub pid: i32,
    pub reloads: u64,
    pub failovers: u64,
    /// Frontend figures: current sessions, total sessions, sessions/s, HTTP requests/s.
    pub sessions: u64,
    pub total: u64,
    pub rate: u64,
    pub requests_per_second: u64,
    pub backends: Vec<BackendInfo>,
    pub health: super::Health,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<super::Autoscale>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Where the config and the runtime API socket are.
    pub dir: String,
}

/// One server as HAProxy's `show stat` last reported it (local and remote LBs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerView {
    pub state: String,
    pub check: String,
    pub scur: u64,
    pub stot: u64,
    pub rate: u64,
    pub qcur: u64,
}

impl ServerView {
    /// The server of one `show stat` row.
    pub fn from_row(r: &HashMap<String, String>) -> ServerView {
        ServerView {
            state: haproxy::state_word(r.get("status").map(String::as_str).unwrap_or("")),
            check: r
                .get("check_status")
                .cloned()
                .unwrap_or_default()
                .trim_start_matches("* ")
                .to_string(),
            scur: num(r, "scur"),
            stot: num(r, "stot"),
            rate: num(r, "rate"),
            qcur: num(r, "qcur"),
        }
    }
}

impl BackendInfo {
    /// Backend `b` as `info()` shows it, with what `show stat` last said of it (`None`: nothing yet).
    pub fn of(b: &Backend, v: Option<&ServerView>) -> BackendInfo {
        let v = v.cloned().unwrap_or_default();
        BackendInfo {
            address: b.address.clone(),
            server: server_name(&b.address),
            state: if v.state.is_empty() {
                "UNKNOWN".into()
            } else {
                v.state
            },
            check: v.check,
            sessions: v.scur,
            total: v.stot,
            rate: v.rate,
            queue: v.qcur,
            autoscaled: b.autoscaled,
        }
    }
}

struct LbState {
    spec: Spec,
    paths: Paths,
    pid: i32,
    worker: Option<i32>,
    servers: BTreeMap<String, ServerView>,
    draining: Vec<String>,
    fe_scur: u64,
    fe_stot: u64,
    fe_rate: u64,
    fe_req_rate: u64,
    be_scur: u64,
    be_qcur: u64,
    be_rate: u64,
    probe_at: Instant,
    probe_failures: u32,
    reloads: u64,
    failovers: u64,
    scaler: Scaler,
    deleted: bool,
}

struct Lb {
    /// Serialises operations (and fail-over) on this LB.
    op: Mutex<()>,
    st: Mutex<LbState>,
}

pub(super) struct Inner {
    pub(super) dir: PathBuf,
    bin: PathBuf,
    pub(super) store: Store,
    lbs: Mutex<BTreeMap<String, Arc<Lb>>>,
    pub(super) subs: Mutex<Vec<(String, UnboundedSender<Event>)>>,
    pub(super) stop: AtomicBool,
    /// Remote-mode LBs (on VMs), supervised by the controller too ([`super::remote_ctl`]).
    pub(super) remote: super::remote_ctl::Remotes,
}

/// The controller of one state directory. Cheap to clone.
#[derive(Clone)]
pub struct Controller {
    pub(super) inner: Arc<Inner>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn registry() -> &'static Mutex<HashMap<PathBuf, Controller>> {
    static R: OnceLock<Mutex<HashMap<PathBuf, Controller>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Where the store is: the `%odbc` connection named `LB`, else SQLite in the state directory.
#[derive(Debug, Clone)]
pub enum StoreAt {
    Sqlite(PathBuf),
    Odbc(crate::db::ConnSpec),
}

impl StoreAt {
    /// The store of state directory `dir` (`HOME/var/lb`): the `%odbc` entry named `LB`
    /// (`odbc_lb`, from conf/stage.json) if there is one, else `dir/state.db`.
    pub fn of(dir: &Path, odbc_lb: Option<&serde_json::Value>) -> Result<StoreAt> {
        Ok(match odbc_lb {
            Some(j) => StoreAt::Odbc(
                crate::db::ConnSpec::from_json("LB", j).map_err(|e| LbError::Failed(e.to_string()))?,
            ),
            None => StoreAt::Sqlite(dir.join("state.db")),
        })
    }

    /// Opens (and creates) the store.
    pub fn open(self) -> Result<Store> {
        match self {
            StoreAt::Sqlite(p) => Store::sqlite(&p),
            StoreAt::Odbc(spec) => Store::open(spec),
        }
    }
}

/// Whether `dir/remote/` holds remote LB records of an older home, not imported yet.
pub fn has_remote_files(dir: &Path) -> bool {
    std::fs::read_dir(dir.join("remote"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.path().extension().is_some_and(|x| x == "json"))
}

impl Controller {
    /// The controller of the home at `root` (`var/lb`, its store on `%odbc` `LB` when that is
    /// set), opened when the node starts if the home has LBs, so every LB is restored and
    /// supervised with no script asking. `None` when the home has none.
    pub fn of_home(root: &Path, odbc_lb: Option<&Json>) -> Result<Option<Controller>> {
        let dir = root.join("var").join("lb");
        Controller::open(&dir, StoreAt::of(&dir, odbc_lb)?, true)
    }

    /// Gives the controller the Vultr client of `%vultr` (remote mode), once: from then on it
    /// restores and supervises every remote LB of this home. Without `%vultr` and with no
    /// remote LB recorded, nothing is done.
    pub fn enable_remote_from(&self, vultr: Option<&Json>) {
        if self.remote_enabled() || (vultr.is_none() && self.remote_names().is_empty()) {
            return;
        }
        match crate::cloud::vultr::Settings::from_config(vultr).and_then(crate::cloud::vultr::Client::new) {
            Ok(client) => self.enable_remote(client),
            Err(e) => log::error!(target: "lb", "lb: remote mode (%vultr): {e}"),
        }
    }
}

impl Controller {
    /// The controller of `dir` for this process, started (and reconciled from the store) on
    /// first use. With `only_if_used`, returns `None` when no LB was ever created there.
    pub fn open(dir: &Path, store: StoreAt, only_if_used: bool) -> Result<Option<Controller>> {
        let mut reg = lock(registry());
        if let Some(c) = reg.get(dir) {
            return Ok(Some(c.clone()));
        }
        if only_if_used && matches!(&store, StoreAt::Sqlite(p) if !p.exists()) && !has_remote_files(dir) {
            return Ok(None);
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| LbError::Failed(format!("cannot create {}: {e}", dir.display())))?;
        let bin = haproxy::binary()?;
        let store = store.open()?;
        store.import_remote_files(dir);
        let c = Controller {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                bin,
                store,
                lbs: Mutex::new(BTreeMap::new()),
                subs: Mutex::new(Vec::new()),
                stop: AtomicBool::new(false),
                remote: Default::default(),
            }),
        };
        c.restore();
        let weak = Arc::downgrade(&c.inner);
        std::thread::Builder::new()
            .name("lb-monitor".into())
            .spawn(move || monitor(weak))
            .map_err(|e| LbError::Failed(format!("cannot start the lb monitor: {e}")))?;
        reg.insert(dir.to_path_buf(), c.clone());
        Ok(Some(c))
    }

    /// Stops the monitor and forgets this controller (the HAProxy processes keep running,
    /// as they do when the node stops). With `stop_processes`, stops them too (tests).
    pub fn shutdown(&self, stop_processes: bool) {
        self.inner.stop.store(true, Ordering::SeqCst);
        lock(registry()).remove(&self.inner.dir);
        if stop_processes {
            for lb in lock(&self.inner.lbs).values() {
                let _g = lock(&lb.op);
                let st = lock(&lb.st);
                haproxy::stop(st.pid);
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn store_label(&self) -> String {
        self.inner.store.label().to_string()
    }

    /// Reconciles every stored LB: adopts a running HAProxy (reloading it when its config is
    /// stale, and adding / removing runtime servers to match), or starts one.
    fn restore(&self) {
        let specs = match self.inner.store.load() {
            Ok(s) => s,
            Err(e) => {
                log::error!(target: "lb", "{e}");
                return;
            }
        };
        for spec in specs {
            let spec = match spec {
                Ok(s) => s,
                Err(e) => {
                    log::error!(target: "lb", "{e}");
                    continue;
                }
            };
            let name = spec.name.clone();
            match self.adopt(spec) {
                Ok(how) => log::info!(target: "lb", "lb {name}: {how}"),
                Err(e) => log::error!(target: "lb", "lb {name}: cannot restore: {e}"),
            }
        }
    }

    fn adopt(&self, spec: Spec) -> Result<&'static str> {
        let dir = self.inner.dir.join(&spec.name);
        std::fs::create_dir_all(&dir).map_err(|e| LbError::Failed(format!("{}: {e}", dir.display())))?;
        let paths = Paths::new(&dir);
        let cfg = render::render(&spec, &paths, &[]);
        let on_disk = std::fs::read_to_string(&paths.config).unwrap_or_default();
        let running = haproxy::read_pid(&paths.pidfile)
            .filter(|_| Runtime::new(&paths.socket).command("show info").is_ok());
        let (pid, how) = match running {
            Some(pid) => {
                let mut how = "adopted the running haproxy";
                if on_disk != cfg {
                    write_validated(&self.inner.bin, &paths, &cfg)?;
                    haproxy::reload(&paths, pid)?;
                    how = "adopted the running haproxy and reloaded its stale config";
                }
                sync_runtime(&spec, &paths)?;
                (pid, how)
            }
            None => {
                write_validated(&self.inner.bin, &paths, &cfg)?;
                (haproxy::start(&self.inner.bin, &paths)?, "started haproxy")
            }
        };
        let lb = Arc::new(Lb {
            op: Mutex::new(()),
            st: Mutex::new(new_state(spec.clone(), paths, pid)),
        });
        lock(&self.inner.lbs).insert(spec.name.clone(), lb);
        Ok(how)
    }

    fn get(&self, name: &str) -> Result<Arc<Lb>> {
        lock(&self.inner.lbs)
            .get(name)
            .cloned()
            .ok_or_else(|| LbError::NotFound(format!("lb {name:?} does not exist")))
    }

    /// Names of every LB.
    pub fn names(&self) -> Vec<String> {
        lock(&self.inner.lbs).keys().cloned().collect()
    }

    pub fn exists(&self, name: &str) -> bool {
        lock(&self.inner.lbs).contains_key(name)
    }

    /// The desired state of an LB.
    pub fn spec(&self, name: &str) -> Result<Spec> {
        Ok(lock(&self.get(name)?.st).spec.clone())
    }

    /// Creates an LB: persists it, renders and validates its config, starts HAProxy.
    pub fn create(&self, spec: Spec) -> Result<Info> {
        let what = "lb.create";
        {
            let lbs = lock(&self.inner.lbs);
            if lbs.contains_key(&spec.name) {
                return Err(LbError::Exists(format!(
                    "{what}: lb {:?} exists (use lb.get to reach it, or delete it first)",
                    spec.name
                )));
            }
            for other in lbs.values() {
                if lock(&other.st).spec.listen == spec.listen {
                    return Err(LbError::Invalid(format!(
                        "{what}: listen {} is used by another lb",
                        spec.listen
                    )));
                }
            }
        }
        check_port_free(what, &spec.listen)?;
        let dir = self.inner.dir.join(&spec.name);
        std::fs::create_dir_all(&dir).map_err(|e| LbError::Failed(format!("{}: {e}", dir.display())))?;
        let paths = Paths::new(&dir);
        let cfg = render::render(&spec, &paths, &[]);
        if let Err(e) = write_validated(&self.inner.bin, &paths, &cfg) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(prefixed(what, e));
        }
        self.inner.store.put(&spec)?;
        let pid = match haproxy::start(&self.inner.bin, &paths) {
            Ok(pid) => pid,
            Err(e) => {
                let _ = self.inner.store.delete(&spec.name);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(prefixed(what, e));
            }
        };
        let name = spec.name.clone();
        let lb = Arc::new(Lb {
            op: Mutex::new(()),
            st: Mutex::new(new_state(spec, paths, pid)),
        });
        lock(&self.inner.lbs).insert(name.clone(), lb);
        log::info!(target: "lb", "lb {name}: created (haproxy pid {pid})");
        self.info(&name)
    }

    /// Adds a backend live: persisted, written into the config, then `add server` →
    /// `enable health` → `enable server` through the runtime API (no reload).
    pub fn add(&self, name: &str, address: &str, autoscaled: bool) -> Result<()> {
        let what = format!("{name}.add");
        let lb = self.get(name)?;
        let _op = lock(&lb.op);
        let addr = parse_address(&what, address)?.to_string();
        let (mut spec, paths, draining) = {
            let st = lock(&lb.st);
            (st.spec.clone(), st.paths.clone(), st.draining.clone())
        };
        if spec.backends.iter().any(|b| b.address == addr) {
            return Err(LbError::Exists(format!(
                "{what}: {addr} is already a backend of {name}"
            )));
        }
        if spec.backends.len() >= MAX_BACKENDS {
            return Err(LbError::Invalid(format!(
                "{what}: {name} has {MAX_BACKENDS} backends, the most allowed"
            )));
        }
        let old = spec.clone();
        spec.backends.push(Backend {
            address: addr.clone(),
            autoscaled,
        });
        let cfg = render::render(&spec, &paths, &draining);
        let tmp = paths.config.with_extension("new");
        write(&tmp, &cfg)?;
        haproxy::validate(&self.inner.bin, &tmp).map_err(|e| prefixed(&what, e))?;
        self.inner.store.put(&spec)?;
        let rt = Runtime::new(&paths.socket);
        let be = backend_name(name);
        let srv = server_name(&addr);
        let added = rt
            .expect_ok(&format!(
                "add server {be}/{srv} {addr} {}",
                render::server_args(&spec, autoscaled)
            ))
            .and_then(|_| rt.expect_ok(&format!("enable health {be}/{srv}")))
            .and_then(|_| rt.expect_ok(&format!("enable server {be}/{srv}")));
        if let Err(e) = added {
            let _ = rt.command(&format!("disable server {be}/{srv}"));
            let _ = rt.command(&format!("del server {be}/{srv}"));
            let _ = self.inner.store.put(&old);
            let _ = std::fs::remove_file(&tmp);
            return Err(prefixed(&what, e));
        }
        std::fs::rename(&tmp, &paths.config).map_err(|e| LbError::Failed(format!("{what}: {e}")))?;
        lock(&lb.st).spec = spec;
        log::info!(target: "lb", "lb {name}: added backend {addr}");
        Ok(())
    }

    /// Removes a backend: drain, then maintenance, wait until its sessions end (up to the
    /// LB's `drain` seconds, then they are shut), then `del server`; persisted first.
    pub fn remove(&self, name: &str, address: &str) -> Result<()> {
        let what = format!("{name}.remove");
        let lb = self.get(name)?;
        let _op = lock(&lb.op);
        let addr = parse_address(&what, address)?.to_string();
        let (mut spec, paths) = {
            let st = lock(&lb.st);
            (st.spec.clone(), st.paths.clone())
        };
        let Some(pos) = spec.backends.iter().position(|b| b.address == addr) else {
            return Err(LbError::NotFound(format!(
                "{what}: {addr} is not a backend of {name}"
            )));
        };
        spec.backends.remove(pos);
        self.inner.store.put(&spec)?;
        lock(&lb.st).draining.push(addr.clone());
        let rt = Runtime::new(&paths.socket);
        let be = backend_name(name);
        let srv = server_name(&addr);
        let result = (|| {
            rt.expect_ok(&format!("set server {be}/{srv} state drain"))?;
            rt.expect_ok(&format!("set server {be}/{srv} state maint"))?;
            let deadline = Instant::now() + Duration::from_secs_f64(spec.drain);
            let mut shut = false;
            loop {
                let out = rt.command(&format!("del server {be}/{srv}"))?;
                let t = out.trim();
                if haproxy::server_deleted(&be, &srv, t)? {
                    return Ok(());
                }
                if Instant::now() > deadline && !shut {
                    log::warn!(target: "lb", "lb {name}: {addr} still has sessions after {} s; shutting them", spec.drain);
                    let _ = rt.command(&format!("shutdown sessions server {be}/{srv}"));
                    shut = true;
                }
                if Instant::now() > deadline + Duration::from_secs(5) {
                    return Err(LbError::Failed(format!(
                        "{what}: haproxy still refuses to delete {addr}: {t}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })();
        let mut st = lock(&lb.st);
        st.draining.retain(|a| a != &addr);
        let cfg = render::render(&spec, &paths, &st.draining);
        st.spec = spec;
        let prev = st.servers.remove(&addr).map(|s| s.state);
        drop(st);
        write(&paths.config, &cfg)?;
        result.map_err(|e| prefixed(&what, e))?;
        let mut ev = Event::new(name, "backend", "REMOVED");
        ev.backend = Some(addr.clone());
        ev.previous = prev;
        self.emit(ev);
        log::info!(target: "lb", "lb {name}: removed backend {addr}");
        Ok(())
    }

    /// Changes structure (algorithm, listen, health, protocol, options, autoscale, …):
    /// render → `haproxy -c` → persist → seamless reload. A rejected config changes nothing.
    pub fn update(&self, name: &str, changes: &Json) -> Result<Info> {
        let what = format!("{name}.update");
        let lb = self.get(name)?;
        {
            let _op = lock(&lb.op);
            let (old, paths, pid, draining) = {
                let st = lock(&lb.st);
                (st.spec.clone(), st.paths.clone(), st.pid, st.draining.clone())
            };
            let spec = old.updated(&what, changes)?;
            if spec.listen != old.listen {
                for (other_name, other) in lock(&self.inner.lbs).iter() {
                    if other_name != name && lock(&other.st).spec.listen == spec.listen {
                        return Err(LbError::Invalid(format!(
                            "{what}: listen {} is used by another lb",
                            spec.listen
                        )));
                    }
                }
                check_port_free(&what, &spec.listen)?;
            }
            let cfg = render::render(&spec, &paths, &draining);
            let tmp = paths.config.with_extension("new");
            write(&tmp, &cfg)?;
            haproxy::validate(&self.inner.bin, &tmp).map_err(|e| prefixed(&what, e))?;
            self.inner.store.put(&spec)?;
            let previous_cfg = std::fs::read_to_string(&paths.config).unwrap_or_default();
            std::fs::rename(&tmp, &paths.config).map_err(|e| LbError::Failed(format!("{what}: {e}")))?;
            if let Err(e) = haproxy::reload(&paths, pid) {
                let _ = write(&paths.config, &previous_cfg);
                let _ = self.inner.store.put(&old);
                return Err(prefixed(&what, e));
            }
            let mut st = lock(&lb.st);
            st.reloads += 1;
            st.spec = spec;
        }
        log::info!(target: "lb", "lb {name}: updated and reloaded");
        self.info(name)
    }

    /// Deletes an LB: forgotten by the store, its HAProxy stopped, its directory removed.
    pub fn delete(&self, name: &str) -> Result<()> {
        let lb = self.get(name)?;
        let _op = lock(&lb.op);
        self.inner.store.delete(name)?;
        let mut st = lock(&lb.st);
        st.deleted = true;
        haproxy::stop(st.pid);
        let dir = st.paths.config.parent().map(Path::to_path_buf);
        drop(st);
        lock(&self.inner.lbs).remove(name);
        lock(&self.inner.subs).retain(|(n, _)| n != name);
        if let Some(d) = dir {
            let _ = std::fs::remove_dir_all(d);
        }
        log::info!(target: "lb", "lb {name}: deleted");
        Ok(())
    }

    /// An LB with its backends' live state.
    pub fn info(&self, name: &str) -> Result<Info> {
        let lb = self.get(name)?;
        let st = lock(&lb.st);
        let backends = st
            .spec
            .backends
            .iter()
            .map(|b| BackendInfo::of(b, st.servers.get(&b.address)))
            .collect();
        Ok(Info {
            name: st.spec.name.clone(),
            protocol: st.spec.protocol.word().into(),
            listen: st.spec.listen.clone(),
            algorithm: st.spec.algorithm.word().into(),
            running: haproxy::running(st.pid),
            pid: st.pid,
            reloads: st.reloads,
            failovers: st.failovers,
            sessions: st.fe_scur,
            total: st.fe_stot,
            rate: st.fe_rate,
            requests_per_second: st.fe_req_rate,
            backends,
            health: st.spec.health.clone(),
            autoscale: st.spec.autoscale.clone(),
            project: st.spec.project.clone(),
            dir: st
                .paths
                .config
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        })
    }

    /// Refreshes the live view of one LB now (instead of waiting for the next tick).
    pub fn refresh(&self, name: &str) -> Result<()> {
        let lb = self.get(name)?;
        let events = poll(&mut lock(&lb.st));
        for ev in events {
            self.emit(ev);
        }
        Ok(())
    }

    /// Events of one LB (`on_change`, `on_failover`), until the receiver is dropped.
    pub fn subscribe(&self, name: &str) -> UnboundedReceiver<Event> {
        let (tx, rx) = unbounded_channel();
        lock(&self.inner.subs).push((name.to_string(), tx));
        rx
    }

    fn emit(&self, ev: Event) {
        emit(&self.inner, ev);
    }

    /// One autoscaling evaluation: the decision, and for a scale-in the backend to remove
    /// (the newest autoscaled one).
    pub fn autoscale_decide(&self, name: &str) -> Result<(Decision, Option<String>, Observation)> {
        let lb = self.get(name)?;
        let mut guard = lock(&lb.st);
        let st = &mut *guard;
        let Some(cfg) = st.spec.autoscale.clone() else {
            return Ok((
                Decision::Hold,
                None,
                Observation {
                    total: 0,
                    ready: 0,
                    load: 0.0,
                },
            ));
        };
        let ready = st
            .spec
            .backends
            .iter()
            .filter(|b| {
                st.servers
                    .get(&b.address)
                    .map(|s| s.state == "UP")
                    .unwrap_or(false)
            })
            .count();
        let load = match cfg.metric {
            Metric::SessionsPerBackend => st.be_scur as f64,
            Metric::RequestsPerSecond if st.spec.protocol == Protocol::Http => st.fe_req_rate as f64,
            Metric::RequestsPerSecond => st.be_rate as f64,
            Metric::Queue => st.be_qcur as f64,
        };
        let obs = Observation {
            total: st.spec.backends.len(),
            ready,
            load,
        };
        let d = st.scaler.decide(&cfg, obs, Instant::now());
        let victim = match d {
            Decision::In => st
                .spec
                .backends
                .iter()
                .rev()
                .find(|b| b.autoscaled)
                .map(|b| b.address.clone()),
            _ => None,
        };
        if d == Decision::In && victim.is_none() {
            return Ok((Decision::Hold, None, obs));
        }
        Ok((d, victim, obs))
    }

    /// Records that a scaling step finished (`ok`) or that the provider failed; returns the
    /// back-off delay after a failure.
    pub fn autoscale_result(&self, name: &str, d: Decision, ok: bool) -> Result<Duration> {
        let lb = self.get(name)?;
        let mut st = lock(&lb.st);
        if ok {
            st.scaler.done(d, Instant::now());
            Ok(Duration::ZERO)
        } else {
            Ok(st.scaler.failed(Instant::now()))
        }
    }
}

fn new_state(spec: Spec, paths: Paths, pid: i32) -> LbState {
    LbState {
        spec,
        paths,
        pid,
        worker: None,
        servers: BTreeMap::new(),
        draining: Vec::new(),
        fe_scur: 0,
        fe_stot: 0,
        fe_rate: 0,
        fe_req_rate: 0,
        be_scur: 0,
        be_qcur: 0,
        be_rate: 0,
        probe_at: Instant::now() + PROBE_EVERY,
        probe_failures: 0,
        reloads: 0,
        failovers: 0,
        scaler: Scaler::new(),
        deleted: false,
    }
}

pub(super) fn prefixed(what: &str, e: LbError) -> LbError {
    let text = e.to_string();
    if text.starts_with(what) {
        return e;
    }
    let t = format!("{what}: {text}");
    match e {
        LbError::Invalid(_) => LbError::Invalid(t),
        LbError::Rejected(_) => LbError::Rejected(t),
        LbError::NotFound(_) => LbError::NotFound(t),
        LbError::Exists(_) => LbError::Exists(t),
        LbError::Failed(_) => LbError::Failed(t),
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| LbError::Failed(format!("cannot write {}: {e}", path.display())))
}

/// Writes `cfg` next to the config, validates it with `haproxy -c`, then moves it in place.
fn write_validated(bin: &Path, paths: &Paths, cfg: &str) -> Result<()> {
    let tmp = paths.config.with_extension("new");
    write(&tmp, cfg)?;
    if let Err(e) = haproxy::validate(bin, &tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &paths.config)
        .map_err(|e| LbError::Failed(format!("{}: {e}", paths.config.display())))
}

/// Whether `listen` can be bound (an address used by another process fails here, clearly,
/// instead of as a HAProxy start error).
fn check_port_free(what: &str, listen: &str) -> Result<()> {
    match TcpListener::bind(listen) {
        Ok(l) => {
            drop(l);
            Ok(())
        }
        Err(e) => Err(LbError::Invalid(format!("{what}: listen {listen}: {e}"))),
    }
}

/// Makes the runtime servers of an adopted HAProxy match the spec (adds the missing, deletes
/// the extra ones), as after a controller restart.
fn sync_runtime(spec: &Spec, paths: &Paths) -> Result<()> {
    let rt = Runtime::new(&paths.socket);
    let be = backend_name(&spec.name);
    let present: Vec<String> = rt
        .stat()?
        .into_iter()
        .filter(|r| r.get("pxname").map(String::as_str) == Some(be.as_str()))
        .filter_map(|r| r.get("svname").cloned())
        .filter(|s| s != "BACKEND")
        .collect();
    for b in &spec.backends {
        let srv = server_name(&b.address);
        if !present.contains(&srv) {
            rt.expect_ok(&format!(
                "add server {be}/{srv} {} {}",
                b.address,
                render::server_args(spec, b.autoscaled)
            ))?;
            rt.expect_ok(&format!("enable health {be}/{srv}"))?;
            rt.expect_ok(&format!("enable server {be}/{srv}"))?;
        }
    }
    for srv in present {
        if !spec.backends.iter().any(|b| server_name(&b.address) == srv) {
            let _ = rt.command(&format!("set server {be}/{srv} state maint"));
            let _ = rt.command(&format!("shutdown sessions server {be}/{srv}"));
            let _ = rt.command(&format!("del server {be}/{srv}"));
        }
    }
    Ok(())
}

pub(super) fn emit(inner: &Inner, ev: Event) {
    match ev.kind.as_str() {
        "failover" => {
            log::warn!(target: "lb", "lb {}: fail-over: {}", ev.lb, ev.reason.as_deref().unwrap_or(""))
        }
        "backend" => log::info!(
            target: "lb",
            "lb {}: backend {} {} -> {} ({})",
            ev.lb,
            ev.backend.as_deref().unwrap_or("?"),
            ev.previous.as_deref().unwrap_or("-"),
            ev.state,
            ev.check.as_deref().unwrap_or("")
        ),
        _ => {}
    }
    lock(&inner.subs).retain(|(name, tx)| name != &ev.lb || tx.send(ev.clone()).is_ok());
}

fn num(row: &HashMap<String, String>, k: &str) -> u64 {
    row.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Polls `show stat` of one LB into its state; returns the state changes as events.
fn poll(st: &mut LbState) -> Vec<Event> {
    let rt = Runtime::new(&st.paths.socket);
    let rows = match rt.stat() {
        Ok(r) => r,
        Err(_) => return Vec::new(),
    };
    let be = backend_name(&st.spec.name);
    let fe = format!("fe_{}", st.spec.name);
    let mut events = Vec::new();
    let by_server: HashMap<String, String> = st
        .spec
        .backends
        .iter()
        .map(|b| (server_name(&b.address), b.address.clone()))
        .collect();
    for r in &rows {
        let px = r.get("pxname").map(String::as_str).unwrap_or("");
        let sv = r.get("svname").map(String::as_str).unwrap_or("");
        if px == fe && sv == "FRONTEND" {
            st.fe_scur = num(r, "scur");
            st.fe_stot = num(r, "stot");
            st.fe_rate = num(r, "rate");
            st.fe_req_rate = num(r, "req_rate");
        } else if px == be && sv == "BACKEND" {
            st.be_scur = num(r, "scur");
            st.be_qcur = num(r, "qcur");
            st.be_rate = num(r, "rate");
        } else if px == be {
            let Some(addr) = by_server.get(sv) else { continue };
            let new = ServerView::from_row(r);
            let view = st.servers.entry(addr.clone()).or_default();
            if !view.state.is_empty() && view.state != new.state {
                let mut ev = Event::new(&st.spec.name, "backend", &new.state);
                ev.backend = Some(addr.clone());
                ev.previous = Some(view.state.clone());
                ev.check = Some(new.check.clone());
                events.push(ev);
            }
            *view = new;
        }
    }
    st.servers.retain(|a, _| by_server.values().any(|x| x == a));
    events
}

/// The monitor: every tick, each LB is polled; a dead process (or a frontend that stopped
/// accepting) is replaced.
fn monitor(weak: std::sync::Weak<Inner>) {
    loop {
        std::thread::sleep(TICK);
        let Some(inner) = weak.upgrade() else { return };
        if inner.stop.load(Ordering::SeqCst) {
            return;
        }
        let lbs: Vec<Arc<Lb>> = lock(&inner.lbs).values().cloned().collect();
        for lb in lbs {
            // An operation in progress owns the LB; look again next tick.
            let Ok(_op) = lb.op.try_lock() else { continue };
            let mut st = lock(&lb.st);
            if st.deleted {
                continue;
            }
            let mut crashed = None;
            if !haproxy::running(st.pid) {
                crashed = Some(format!("haproxy master {} is gone", st.pid));
            } else if Instant::now() >= st.probe_at {
                st.probe_at = Instant::now() + PROBE_EVERY;
                if probe(&st.spec.listen) {
                    st.probe_failures = 0;
                } else {
                    st.probe_failures += 1;
                    if st.probe_failures >= PROBE_FAILURES {
                        crashed = Some(format!(
                            "frontend {} refused {} probes in a row",
                            st.spec.listen, st.probe_failures
                        ));
                    }
                }
            }
            if let Some(reason) = crashed {
                let ev = failover(&inner, &mut st, reason);
                drop(st);
                emit(&inner, ev);
                continue;
            }
            if st.worker.is_none() {
                st.worker = Runtime::new(&st.paths.socket).worker_pid().ok();
            }
            let events = poll(&mut st);
            drop(st);
            for ev in events {
                emit(&inner, ev);
            }
        }
    }
}

fn probe(listen: &str) -> bool {
    let Ok(mut addr) = listen.parse::<SocketAddr>() else {
        return false;
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

/// Replaces a crashed HAProxy: the remains are killed, a new master starts from the current
/// config (which carries the runtime-added servers), and the event reports how long it took.
fn failover(inner: &Inner, st: &mut LbState, reason: String) -> Event {
    let t0 = Instant::now();
    let old = st.pid;
    for pid in [Some(old), st.worker].into_iter().flatten() {
        if haproxy::alive(pid) && is_haproxy(pid) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let cfg = render::render(&st.spec, &st.paths, &st.draining);
    let result = write(&st.paths.config, &cfg).and_then(|_| haproxy::start(&inner.bin, &st.paths));
    let mut ev = Event::new(&st.spec.name, "failover", "replaced");
    ev.old_pid = Some(old);
    ev.seconds = Some(t0.elapsed().as_secs_f64());
    match result {
        Ok(pid) => {
            st.pid = pid;
            st.worker = None;
            st.failovers += 1;
            st.probe_failures = 0;
            st.probe_at = Instant::now() + PROBE_EVERY;
            ev.new_pid = Some(pid);
            ev.reason = Some(format!(
                "{reason}; replaced by pid {pid} in {:.3} s",
                t0.elapsed().as_secs_f64()
            ));
        }
        Err(e) => {
            ev.state = "failed".into();
            ev.reason = Some(format!("{reason}; the replacement did not start: {e}"));
        }
    }
    ev
}

fn is_haproxy(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("haproxy"))
        .unwrap_or(false)
}
