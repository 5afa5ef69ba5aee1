//! The LB's remote mode against the Vultr emulator (never real Vultr). The "VMs" are real
//! HAProxy processes started here from each instance's user data, as cloud-init would: the
//! emulator gives VPC instances loopback private addresses (127.0.96.x, a /24 per test), so the controller's
//! runtime API probe really crosses a "private network" to a real HAProxy.

mod harness;

use serde_json::json;
use stage::cloud::lb::haproxy;
use stage::cloud::lb::remote::{self, Placement, RemoteEvent, RemoteLb, VM_DIR};
use stage::cloud::lb::render::Paths;
use stage::cloud::lb::Spec;
use stage::cloud::vultr::{ApiKey, Client, Instance, Settings};
use stage::cloud::vultr_emulator::{Emulator, EmulatorConfig, Lifecycle};
use std::path::Path;
use std::time::{Duration, Instant};

const KEY: &str = "TEST-KEY-lbremote";

fn have_haproxy() -> bool {
    if haproxy::binary().is_ok() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("haproxy is not installed; scripts/setup installs it");
    }
    eprintln!("skipping: haproxy is not installed (scripts/setup installs it)");
    false
}

fn setup() -> (Emulator, Client) {
    let emu = Emulator::start(
        "127.0.0.1:0".parse().unwrap(),
        EmulatorConfig {
            api_key: KEY.into(),
            lifecycle: Lifecycle::scaled(Duration::from_millis(30)),
            // A /24 of loopback per emulator: tests run in parallel, and two VMs with the same
            // private address would share its runtime API port (HAProxy binds with SO_REUSEPORT).
            vpc_prefix: {
                static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(96);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                format!("127.0.{n}.")
            },
            ..Default::default()
        },
    )
    .unwrap();
    let c = Client::new(Settings {
        endpoint: emu.endpoint(),
        api_key: Some(ApiKey::new(KEY)),
        timeout: Duration::from_secs(5),
        retries: 2,
        backoff: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        per_page: 100,
    })
    .unwrap();
    (emu, c)
}

fn spec(port: u16) -> Spec {
    Spec::from_json(
        "lb.create",
        &json!({"name": "edge", "listen": format!("127.0.0.1:{port}"),
                "backends": ["127.0.0.1:1", "127.0.0.1:2"],
                "health": {"protocol": "tcp", "interval": 1, "timeout": 0.5}}),
    )
    .unwrap()
}

fn placement(reserved_ip: &str) -> Placement {
    Placement::from_json(
        "placement",
        &json!({"provider": "vultr", "region": "icn", "plan": "vc2-1c-1gb",
                "reserved_ip": reserved_ip, "confirm": 0.3, "interval": 0.1, "boot_timeout": 10}),
    )
    .unwrap()
}

/// "Boots" a VM: reads its user data from the API, takes the config cloud-init would write
/// (private address filled in), checks it with `haproxy -c` and runs it. Returns the master pid.
async fn boot(c: &Client, inst: &Instance, spec: &Spec, root: &Path) -> i32 {
    let ud = String::from_utf8(c.user_data(&inst.id).await.unwrap()).unwrap();
    assert!(ud.starts_with("#cloud-config\n"), "{ud}");
    assert!(
        ud.contains("  - haproxy\n") && ud.contains(&format!("sh {VM_DIR}/boot.sh")),
        "{ud}"
    );
    assert!(!inst.internal_ip.is_empty(), "the LB VM is in a VPC");
    let cfg = remote::config_from_user_data(&ud, &inst.internal_ip).expect("a haproxy.cfg in the user data");
    assert_eq!(
        cfg,
        remote::vm_config(spec, &inst.internal_ip),
        "the rendered config, as is"
    );
    assert!(
        cfg.contains(&format!("stats socket {}:9999 level admin", inst.internal_ip)),
        "runtime API on the private address only: {cfg}"
    );
    let dir = root.join(&inst.id);
    std::fs::create_dir_all(&dir).unwrap();
    let paths = Paths::new(&dir);
    std::fs::write(&paths.config, cfg.replace(VM_DIR, dir.to_str().unwrap())).unwrap();
    let bin = haproxy::binary().unwrap();
    haproxy::validate(&bin, &paths.config).expect("haproxy -c accepts the VM's config");
    haproxy::start(&bin, &paths).expect("the VM's haproxy starts")
}

async fn check_until(
    lb: &mut RemoteLb,
    c: &Client,
    within: Duration,
    mut stop: impl FnMut(&RemoteLb, Option<&RemoteEvent>) -> bool,
) -> Vec<RemoteEvent> {
    let t0 = Instant::now();
    let mut events = Vec::new();
    loop {
        let ev = lb.check(c).await.unwrap();
        if let Some(e) = &ev {
            events.push(e.clone());
        }
        if stop(lb, ev.as_ref()) {
            return events;
        }
        assert!(
            t0.elapsed() < within,
            "not done within {within:?}; events so far: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn remote_lb_fails_over_to_a_new_vm_and_moves_the_reserved_ip() {
    if !have_haproxy() {
        return;
    }
    let (emu, c) = setup();
    let root = tempfile::tempdir().unwrap();
    let ip = c.reserved_ip_create("icn", "v4", Some("edge")).await.unwrap();
    let spec = spec(harness::free_tcp_port());
    let mut lb = RemoteLb::provision(&c, spec.clone(), placement(&ip.id))
        .await
        .unwrap();
    let first = lb.instance.clone();
    assert!(first.is_ready(), "{}", first.state_line());
    assert_eq!(first.label, "lb-edge");
    assert!(first.tags.contains(&"stage-lb-edge".to_string()));
    assert_eq!(
        c.reserved_ip(&ip.id).await.unwrap().instance_id,
        first.id,
        "IP attached"
    );

    // Booting: the probe fails until HAProxy runs, which is not a crash.
    assert_eq!(lb.check(&c).await.unwrap(), None);
    assert!(!lb.up_once);
    let pid1 = boot(&c, &first, &spec, root.path()).await;
    check_until(&mut lb, &c, Duration::from_secs(5), |lb, _| lb.up_once).await;
    let info = remote::runtime_command(
        remote::runtime_addr(&first).unwrap(),
        "show servers state",
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    assert!(
        info.contains("be_edge"),
        "runtime API reached over the private address: {info}"
    );

    // The crash: the API reports the VM stopped, and its HAProxy is gone.
    let t0 = Instant::now();
    assert!(emu.crash(&first.id));
    haproxy::stop(pid1);
    let mut booted: Option<i32> = None;
    let events = {
        let mut evs = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(ev) = lb.check(&c).await.unwrap() {
                evs.push(ev);
            }
            if booted.is_none() {
                if let Some(new) = lb.replacing.clone() {
                    // cloud-init runs on the replacement once it has its private address.
                    let seen = c.get(&new.id).await.unwrap();
                    if !seen.internal_ip.is_empty() {
                        booted = Some(boot(&c, &seen, &spec, root.path()).await);
                    }
                }
            }
            if evs.iter().any(|e: &RemoteEvent| e.state == "replaced") {
                break evs;
            }
            assert!(Instant::now() < deadline, "no fail-over; events {evs:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let took = t0.elapsed();
    let states: Vec<&str> = events.iter().map(|e| e.state.as_str()).collect();
    assert_eq!(states, ["down", "replaced"], "{events:?}");
    assert!(events[0].reason.contains("stopped"), "{}", events[0].reason);
    let second = lb.instance.clone();
    assert_ne!(second.id, first.id);
    assert_eq!(events[1].new_instance.as_deref(), Some(second.id.as_str()));
    assert_eq!(events[1].reserved_ip.as_deref(), Some(ip.id.as_str()));
    assert_eq!(
        c.reserved_ip(&ip.id).await.unwrap().instance_id,
        second.id,
        "IP moved"
    );
    let e = c.get(&first.id).await.unwrap_err();
    assert_eq!(
        e.status(),
        Some(404),
        "the old VM is destroyed: it was not coming back"
    );
    assert_eq!(emu.instance_count(), 1);
    assert_eq!(lb.failovers, 1);
    assert!(remote::probe(&second).await, "the new VM's runtime API answers");
    eprintln!(
        "remote fail-over (emulator, confirm 0.3 s): {:.2} s",
        took.as_secs_f64()
    );

    lb.delete(&c).await.unwrap();
    assert_eq!(emu.instance_count(), 0);
    assert_eq!(
        c.reserved_ip(&ip.id).await.unwrap().instance_id,
        "",
        "kept, detached"
    );
    if let Some(p) = booted {
        haproxy::stop(p);
    }
}

#[tokio::test]
async fn remote_lb_keeps_the_old_vm_when_it_comes_back_first() {
    if !have_haproxy() {
        return;
    }
    let (emu, c) = setup();
    let root = tempfile::tempdir().unwrap();
    let ip = c.reserved_ip_create("icn", "v4", None).await.unwrap();
    let spec = spec(harness::free_tcp_port());
    let mut lb = RemoteLb::provision(&c, spec.clone(), placement(&ip.id))
        .await
        .unwrap();
    let first = lb.instance.clone();
    let pid = boot(&c, &first, &spec, root.path()).await;
    check_until(&mut lb, &c, Duration::from_secs(5), |lb, _| lb.up_once).await;
    // The VM stops (its HAProxy keeps its state), a replacement is started...
    assert!(emu.crash(&first.id));
    let evs = check_until(&mut lb, &c, Duration::from_secs(5), |_, e| e.is_some()).await;
    assert_eq!(evs[0].state, "down");
    let replacement = lb.replacing.clone().expect("a replacement is being created");
    // ...and the old VM is started again before the replacement serves.
    c.action(&first.id, "start").await.unwrap();
    let evs = check_until(&mut lb, &c, Duration::from_secs(5), |_, e| e.is_some()).await;
    assert_eq!(evs[0].state, "recovered", "{evs:?}");
    assert_eq!(lb.instance.id, first.id);
    assert!(lb.replacing.is_none());
    assert_eq!(
        c.get(&replacement.id).await.unwrap_err().status(),
        Some(404),
        "replacement destroyed"
    );
    assert_eq!(
        c.reserved_ip(&ip.id).await.unwrap().instance_id,
        first.id,
        "the IP did not move"
    );
    assert_eq!(lb.failovers, 0);
    lb.delete(&c).await.unwrap();
    haproxy::stop(pid);
}

#[tokio::test]
async fn remote_lb_bad_placement_is_refused_before_any_vm() {
    let (emu, c) = setup();
    let other = c.reserved_ip_create("ewr", "v4", None).await.unwrap();
    let e = RemoteLb::provision(&c, spec(harness::free_tcp_port()), placement(&other.id))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("placement.reserved_ip") && e.contains("region ewr"),
        "{e}"
    );
    let e = RemoteLb::provision(
        &c,
        spec(harness::free_tcp_port()),
        placement("00000000-0000-4000-8000-000000000000"),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("reserved IP not found"), "{e}");
    let mut p = placement(&other.id);
    p.reserved_ip = None;
    p.plan = "vc2-9c-9gb".into();
    let e = RemoteLb::provision(&c, spec(harness::free_tcp_port()), p)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("Invalid plan: vc2-9c-9gb"), "{e}");
    assert_eq!(emu.instance_count(), 0);
}

#[test]
fn lua_remote_lb_create_failover_delete() {
    if !have_haproxy() {
        return;
    }
    let (emu, _c) = setup();
    let conf = json!({"%vultr": {"endpoint": emu.endpoint(), "api_key": KEY, "retries": 2}});
    harness::run_scenario_with("lb/remote.lua", |home| {
        home.write("conf/stage.json", &conf.to_string())
    });
    assert_eq!(emu.instance_count(), 0, "the scenario's VMs are destroyed");
    assert!(emu.reserved_ips().is_empty());
}

/// The record of remote LB `name` in the home's store (`var/lb/state.db`, table
/// `stage_lb_remote`), as a restarted node reads it.
fn remote_record(home: &Path, name: &str) -> Option<stage::cloud::lb::remote::Record> {
    stage::cloud::lb::store::Store::sqlite(&home.join("var/lb/state.db"))
        .unwrap()
        .load_remote(name)
        .unwrap()
}

/// A home from before the `stage_lb_remote` table: its `var/lb/remote/NAME.json` record is
/// imported into the store once (the file renamed to `NAME.json.imported`), and
/// `stage lb status` shows the LB from the store.
#[test]
fn remote_json_records_of_an_older_home_are_imported() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("var/lb/remote");
    std::fs::create_dir_all(&dir).unwrap();
    // The file exactly as the JSON-file version wrote it (serde_json::to_string_pretty of a
    // Record).
    let old = json!({
        "spec": serde_json::to_value(spec(18080)).unwrap(),
        "placement": serde_json::to_value(placement("rip-1")).unwrap(),
        "instance": "vm-from-before", "replacing": null, "failovers": 2, "up_once": true,
        "state": "up", "internal_ip": "10.1.96.7",
    });
    std::fs::write(dir.join("edge.json"), serde_json::to_string_pretty(&old).unwrap()).unwrap();
    let status = stage::lb_cli::status(home.path());
    assert!(
        status.contains("edge  http 127.0.0.1:18080")
            && status.contains("vm vm-from-before (private 10.1.96.7)")
            && status.contains("reserved ip rip-1")
            && status.contains("failovers 2"),
        "{status}"
    );
    assert!(!dir.join("edge.json").exists(), "imported once");
    assert!(dir.join("edge.json.imported").exists());
    let rec = remote_record(home.path(), "edge").expect("imported into the store");
    assert_eq!((rec.instance.as_str(), rec.failovers), ("vm-from-before", 2));
    assert_eq!(serde_json::to_value(&rec).unwrap(), old);
    // A second look reads the store, not the (renamed) file.
    assert!(stage::lb_cli::status(home.path()).contains("vm vm-from-before"));
}

#[test]
fn remote_lb_survives_a_node_restart() {
    if !have_haproxy() {
        return;
    }
    let (emu, _c) = setup();
    let home = harness::TestHome::new();
    let out = tempfile::tempdir().unwrap();
    home.write(
        "conf/stage.json",
        &json!({"%vultr": {"endpoint": emu.endpoint(), "api_key": KEY, "retries": 2}}).to_string(),
    );
    home.write(
        "preload/01-lb-env.lua",
        &format!("LB_ENV = {{ out = {:?} }}\n", out.path().display().to_string()),
    );
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lua/lb/remote_restart.lua"),
    )
    .unwrap();
    home.write("package/start.lua", &text);
    let stop = |child: std::process::Child| {
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        harness::wait_with_output(child, Duration::from_secs(10))
    };
    let wait = |p: &Path| {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if p.exists() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    };
    let node = home.spawn();
    let first = out.path().join("first");
    let created = wait(&first);
    let (code, log1) = stop(node);
    assert!(created, "the first run did not create the lb:\n{log1}");
    assert_eq!(code, Some(0), "{log1}");
    assert_eq!(emu.instance_count(), 1, "the VM outlives the node");
    assert!(
        remote_record(home.path(), "edge").is_some(),
        "the record is in the store"
    );
    assert!(
        !home.path().join("var/lb/remote/edge.json").exists(),
        "no JSON file"
    );
    // Turn this home into one from before the stage_lb_remote table (no state.db, the record
    // in var/lb/remote/edge.json): the restarted node imports it and restores the LB from it.
    let rec = remote_record(home.path(), "edge").unwrap();
    std::fs::remove_file(home.path().join("var/lb/state.db")).unwrap();
    home.write(
        "var/lb/remote/edge.json",
        &serde_json::to_string_pretty(&rec).unwrap(),
    );
    let node = home.spawn();
    let second = out.path().join("second");
    let restored = wait(&out.path().join("deleted"));
    let (_, log2) = stop(node);
    assert!(
        restored,
        "the second run did not restore and delete the lb:\n{log2}"
    );
    assert_eq!(
        std::fs::read_to_string(&first).unwrap(),
        std::fs::read_to_string(&second).unwrap(),
        "the same VM and reserved IP after the restart"
    );
    assert!(log2.contains("lb edge: restored on vm"), "{log2}");
    assert!(log2.contains("lb edge: remote record imported from"), "{log2}");
    assert!(home.path().join("var/lb/remote/edge.json.imported").exists());
    assert!(!home.path().join("var/lb/remote/edge.json").exists());
    assert_eq!(emu.instance_count(), 0, "deleted");
    assert_eq!(remote_record(home.path(), "edge"), None, "record forgotten");
}

/// Stands in for cloud-init and the VMs' machines: every emulator VM that is running with a
/// private address gets a real HAProxy started from its user data (the private address filled
/// in as the boot script does; the frontend bound to the VM's own private address, as each VM
/// has its own network; its files in a directory of its own). A VM that stops or is destroyed
/// loses its HAProxy. A killed HAProxy ([`Vms::kill`]) is not started again.
struct Vms {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pids: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, i32>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _root: tempfile::TempDir,
}

impl Vms {
    fn start(endpoint: String) -> Vms {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pids = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let root = tempfile::tempdir().unwrap();
        let (stop2, pids2, dir) = (stop.clone(), pids.clone(), root.path().to_path_buf());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let c = client(endpoint);
                let bin = haproxy::binary().unwrap();
                while !stop2.load(Ordering::SeqCst) {
                    if let Ok(list) = c.instances(&Default::default()).await {
                        for inst in &list {
                            let known = pids2.lock().unwrap().contains_key(&inst.id);
                            if known || !inst.is_ready() || inst.internal_ip.is_empty() {
                                continue;
                            }
                            let Ok(ud) = c.user_data(&inst.id).await else {
                                continue;
                            };
                            let ud = String::from_utf8(ud).unwrap();
                            let Some(cfg) = remote::config_from_user_data(&ud, &inst.internal_ip) else {
                                continue;
                            };
                            let vm = dir.join(&inst.id);
                            std::fs::create_dir_all(&vm).unwrap();
                            let paths = Paths::new(&vm);
                            let cfg = cfg
                                .replace(VM_DIR, vm.to_str().unwrap())
                                .replace("    bind 0.0.0.0:", &format!("    bind {}:", inst.internal_ip));
                            std::fs::write(&paths.config, cfg).unwrap();
                            let pid = haproxy::start(&bin, &paths)
                                .unwrap_or_else(|e| panic!("vm {}: haproxy: {e}", inst.id));
                            pids2.lock().unwrap().insert(inst.id.clone(), pid);
                        }
                        let mut pids = pids2.lock().unwrap();
                        for (id, pid) in pids.iter_mut() {
                            let gone = list
                                .iter()
                                .find(|i| &i.id == id)
                                .map(|i| i.power_status == "stopped")
                                .unwrap_or(true);
                            if gone && *pid > 0 {
                                haproxy::stop(*pid);
                                *pid = 0;
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        });
        Vms {
            stop,
            pids,
            thread: Some(thread),
            _root: root,
        }
    }

    /// `kill -9` of a VM's HAProxy (master and workers): the VM stays up, its LB is gone.
    fn kill(&self, id: &str) {
        let sock = self._root.path().join(id).join("admin.sock");
        let worker = haproxy::Runtime::new(&sock)
            .worker_pid()
            .expect("the vm's worker");
        let mut pids = self.pids.lock().unwrap();
        let pid = pids.get_mut(id).expect("a booted vm");
        unsafe { libc::kill(*pid, libc::SIGKILL) };
        unsafe { libc::kill(worker, libc::SIGKILL) };
        *pid = 0;
    }

    fn booted(&self, id: &str) -> bool {
        self.pids.lock().unwrap().get(id).is_some_and(|p| *p > 0)
    }
}

impl Drop for Vms {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for pid in self.pids.lock().unwrap().values() {
            if *pid > 0 {
                haproxy::stop(*pid);
            }
        }
    }
}

fn client(endpoint: String) -> Client {
    Client::new(Settings {
        endpoint,
        api_key: Some(ApiKey::new(KEY)),
        timeout: Duration::from_secs(5),
        retries: 2,
        backoff: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        per_page: 100,
    })
    .unwrap()
}

/// A backend process (tests/lb/backend.py, HTTP) on loopback; killed on drop.
struct PyBackend {
    child: std::process::Child,
    port: u16,
}

impl PyBackend {
    fn start() -> PyBackend {
        use std::io::BufRead;
        let port = harness::free_tcp_port();
        let mut child = std::process::Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lb/backend.py"))
            .arg("http")
            .arg(port.to_string())
            .arg(format!("b{port}"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "backend on {port} did not start");
        PyBackend { child, port }
    }
}

impl Drop for PyBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lb_env(home: &harness::TestHome, backends: &[PyBackend], port: u16, out: &Path) {
    let list = |f: &dyn Fn(&PyBackend) -> String| backends.iter().map(f).collect::<Vec<_>>().join(", ");
    home.write(
        "preload/01-lb-env.lua",
        &format!(
            "LB_ENV = {{ backends = {{ {} }}, names = {{ {} }}, pids = {{ {} }}, port = {port}, home = {:?}, out = {:?} }}\n",
            list(&|b| format!("\"127.0.0.1:{}\"", b.port)),
            list(&|b| format!("\"b{}\"", b.port)),
            list(&|b| b.child.id().to_string()),
            home.path().display().to_string(),
            out.display().to_string(),
        ),
    );
}

#[test]
fn lua_remote_lb_add_remove_update_on_change() {
    if !have_haproxy() {
        return;
    }
    let (emu, _c) = setup();
    let vms = Vms::start(emu.endpoint());
    let backends: Vec<PyBackend> = (0..3).map(|_| PyBackend::start()).collect();
    let port = harness::free_tcp_port();
    let out = tempfile::tempdir().unwrap();
    let conf = json!({"%vultr": {"endpoint": emu.endpoint(), "api_key": KEY, "retries": 2}});
    let log = harness::run_scenario_output("lb/remote_ops.lua", |home| {
        home.write("conf/stage.json", &conf.to_string());
        lb_env(home, &backends, port, out.path());
    });
    assert!(log.contains("replaced by"), "{log}");
    assert_eq!(emu.instance_count(), 0, "the scenario's VMs are destroyed");
    drop(vms);
}

/// The controller restores and supervises a remote LB at start-up: after a node restart no
/// script calls lb.get, the VM's HAProxy is killed, and the LB fails over to a new VM that
/// carries the backend added at runtime before the restart.
#[test]
fn remote_lb_is_supervised_after_a_restart_without_any_script() {
    if !have_haproxy() {
        return;
    }
    let (emu, c) = setup();
    let vms = Vms::start(emu.endpoint());
    let backends: Vec<PyBackend> = (0..2).map(|_| PyBackend::start()).collect();
    let port = harness::free_tcp_port();
    let out = tempfile::tempdir().unwrap();
    let home = harness::TestHome::new();
    home.write(
        "conf/stage.json",
        &json!({"%vultr": {"endpoint": emu.endpoint(), "api_key": KEY, "retries": 2}}).to_string(),
    );
    lb_env(&home, &backends, port, out.path());
    home.write(
        "package/start.lua",
        r#"
local E = LB_ENV
stage.addtask(0, function ()
    local ip = vultr.reserved_ip_create { region = "icn", label = "edge" }
    local edge = lb.create { name = "edge", listen = "0.0.0.0:" .. E.port, backends = { E.backends[1] },
        health = { protocol = "tcp", interval = 0.3, timeout = 0.2, healthy = 1, unhealthy = 1 },
        placement = { provider = "vultr", region = "icn", plan = "vc2-1c-1gb", reserved_ip = ip.id,
                      boot_timeout = 20, confirm = 0.5, interval = 0.2 } }
    local limit = process.tick + 15
    while edge.info().state ~= "up" do
        if process.tick > limit then fail("the VM never served") end
        stage.sleep(100)
    end
    edge.add(E.backends[2])
    write(E.out .. "/first", edge.info().vm .. " " .. ip.id)
end)
"#,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stop = |child: std::process::Child| {
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        harness::wait_with_output(child, Duration::from_secs(10))
    };
    let first = out.path().join("first");
    let node = home.spawn();
    let t0 = Instant::now();
    while !first.exists() && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, log1) = stop(node);
    let text = std::fs::read_to_string(&first)
        .unwrap_or_else(|_| panic!("the first run did not create the lb:\n{log1}"));
    let (vm, ip) = text.split_once(' ').unwrap();
    assert!(vms.booted(vm), "the stand-in runs the VM's haproxy");

    // While the node is down: `stage lb status` shows the remote LB from its record, and the
    // backends from the VM's runtime API over its private address.
    let status = stage::lb_cli::status(home.path());
    assert!(
        status.contains("edge  http 0.0.0.0:")
            && status.contains(&format!("remote (vultr icn vc2-1c-1gb)  vm {vm}"))
            && status.contains(&format!("reserved ip {ip}"))
            && status.contains("state up"),
        "{status}"
    );
    assert!(
        status.contains(&format!("127.0.0.1:{}", backends[1].port)) && status.contains("UP"),
        "{status}"
    );

    // The second run: a start script that never mentions lb.
    home.write("package/start.lua", "logger.info('no lb calls here')\n");
    let node = home.spawn();
    // Supervision resumed (the record is rewritten when the VM is seen up again)...
    std::thread::sleep(Duration::from_secs(2));
    vms.kill(vm);
    let t0 = Instant::now();
    let new = loop {
        let now = rt.block_on(c.reserved_ip(ip)).unwrap().instance_id;
        if !now.is_empty() && now != vm {
            break now;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let (_, log2) = stop(node);
            panic!("no fail-over within 20 s:\n{log2}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = t0.elapsed();
    let (_, log2) = stop(node);
    assert!(log2.contains("lb edge: restored on vm"), "{log2}");
    assert!(log2.contains("lb edge: fail-over"), "{log2}");
    assert_eq!(
        rt.block_on(c.get(vm)).unwrap_err().status(),
        Some(404),
        "the old VM is destroyed"
    );
    let ud = String::from_utf8(rt.block_on(c.user_data(&new)).unwrap()).unwrap();
    assert!(
        ud.contains(&format!(" 127.0.0.1:{} ", backends[1].port)),
        "the replacement carries the backend added at runtime: {ud}"
    );
    let rec = remote_record(home.path(), "edge").expect("the record in the store");
    assert_eq!(rec.instance, new, "{rec:?}");
    eprintln!(
        "remote fail-over after a restart (emulator, confirm 0.5 s): {:.2} s",
        took.as_secs_f64()
    );
    rt.block_on(c.delete(&new)).unwrap();
    drop(vms);
}
