//! The LB controller against a real HAProxy on loopback, with backends that are real processes
//! (tests/lb/backend.py) and a real load client (tests/lb/load.py, Python's http.client and
//! sockets). Without haproxy the tests are skipped, except under CI=true where they fail.

#[macro_use]
mod harness;

use serde_json::{json, Value as Json};
use stage::cloud::lb::controller::StoreAt;
use stage::cloud::lb::{Controller, Spec};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether HAProxy is here; panics under CI=true when it is not.
fn have_haproxy() -> bool {
    if stage::cloud::lb::haproxy::binary().is_ok() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("haproxy is not installed; scripts/setup installs it");
    }
    eprintln!("skipping: haproxy is not installed (scripts/setup installs it)");
    false
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lb").join(name)
}

/// A backend process on loopback; killed on drop.
struct Backend {
    child: Child,
    port: u16,
    mode: &'static str,
}

impl Backend {
    fn start(mode: &'static str, port: u16) -> Backend {
        let mut child = Command::new("python3")
            .arg(script("backend.py"))
            .arg(mode)
            .arg(port.to_string())
            .arg(format!("b{port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "backend on {port} did not start");
        Backend { child, port, mode }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.kill();
        *self = Backend::start(self.mode, self.port);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

fn backends(mode: &'static str, n: usize) -> Vec<Backend> {
    (0..n)
        .map(|_| Backend::start(mode, harness::free_tcp_port()))
        .collect()
}

/// A controller on a temporary directory; its HAProxy processes are stopped on drop.
struct Ctl {
    c: Controller,
    dir: tempfile::TempDir,
}

impl Ctl {
    fn new() -> Ctl {
        let dir = tempfile::tempdir().unwrap();
        let c = open(&dir.path().join("var/lb"));
        Ctl { c, dir }
    }

    /// The controller's directory (`HOME/var/lb` of the temporary home).
    fn lbdir(&self) -> PathBuf {
        self.dir.path().join("var/lb")
    }
}

fn open(dir: &Path) -> Controller {
    Controller::open(dir, StoreAt::Sqlite(dir.join("state.db")), false)
        .unwrap()
        .unwrap()
}

impl Drop for Ctl {
    fn drop(&mut self) {
        self.c.shutdown(true);
        // Whatever a test left running under this directory (a replaced master, say).
        kill_haproxy_under(self.dir.path());
    }
}

fn kill_haproxy_under(dir: &Path) {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    let needle = dir.display().to_string();
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(p.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.contains("haproxy") && cmd.contains(&needle) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

#[derive(Debug)]
struct Load {
    ok: u64,
    fail: u64,
    bodies: std::collections::HashMap<String, u64>,
    errors: Vec<String>,
}

fn parse_load(out: &str) -> Load {
    let j: Json = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("load output {out:?}: {e}"));
    Load {
        ok: j["ok"].as_u64().unwrap(),
        fail: j["fail"].as_u64().unwrap(),
        bodies: j["bodies"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
            .collect(),
        errors: j["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.to_string())
            .collect(),
    }
}

fn load_cmd(mode: &str, target: &str, requests: u64, seconds: f64, conc: u32) -> Command {
    let mut c = Command::new("python3");
    c.arg(script("load.py"))
        .arg(mode)
        .arg(target)
        .arg(requests.to_string())
        .arg(seconds.to_string())
        .arg(conc.to_string())
        .stdout(Stdio::piped());
    c
}

fn load(mode: &str, target: &str, requests: u64, conc: u32) -> Load {
    let out = load_cmd(mode, target, requests, 60.0, conc).output().unwrap();
    parse_load(&String::from_utf8_lossy(&out.stdout))
}

/// A load that runs in the background until `finish`.
struct Running {
    child: Child,
    stop: PathBuf,
}

fn load_start(mode: &str, target: &str, dir: &Path) -> Running {
    let id = harness::free_tcp_port();
    let stop = dir.join(format!("stop-{id}"));
    let started = dir.join(format!("started-{id}"));
    let child = load_cmd(mode, target, 0, 60.0, 2)
        .env("LOAD_STOP", &stop)
        .env("LOAD_STARTED", &started)
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(10), || started.exists()).expect("the load starts");
    Running { child, stop }
}

impl Running {
    fn finish(self) -> Load {
        std::fs::write(&self.stop, "").unwrap();
        let out = self.child.wait_with_output().unwrap();
        parse_load(&String::from_utf8_lossy(&out.stdout))
    }
}

/// The value of the series `series` (name and labels, exactly as exposed) in this process's
/// Prometheus exposition, which reads every open controller's LBs; the whole text passes
/// `promtool check metrics` first.
fn metric(series: &str) -> Option<f64> {
    // The classic text format, as `/metrics` serves it to curl and promtool.
    let text = stage::metrics::serve::to_text_format(&stage::metrics::Metrics::new().encode());
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/setup installs Debian's prometheus)");
    std::io::Write::write_all(&mut check.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn spec(v: Json) -> Spec {
    Spec::from_json("test", &v).unwrap()
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// One HTTP/1.0 GET through `listen` with a plain socket: the body when the answer is 200.
fn http_get(listen: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect_timeout(&listen.parse().unwrap(), Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    if !text.starts_with("HTTP/1.1 200") && !text.starts_with("HTTP/1.0 200") {
        return None;
    }
    text.split("\r\n\r\n").nth(1).map(str::to_string)
}

fn serving(listen: &str) -> bool {
    std::net::TcpStream::connect_timeout(&listen.parse().unwrap(), Duration::from_millis(200)).is_ok()
}

fn balance(mode: &'static str) {
    if !have_haproxy() {
        return;
    }
    let ctl = Ctl::new();
    let bs = backends(mode, 3);
    let listen = format!("127.0.0.1:{}", harness::free_tcp_port());
    ctl.c
        .create(spec(json!({"name": "bal", "protocol": mode, "listen": listen,
            "backends": bs.iter().map(Backend::addr).collect::<Vec<_>>(),
            "health": {"protocol": mode, "path": "/healthz", "interval": 1, "timeout": 1}})))
        .unwrap();
    let r = load(mode, &listen, 3000, 4);
    assert_eq!((r.ok, r.fail), (3000, 0), "{:?}", r.errors);
    for b in &bs {
        let n = r.bodies.get(&format!("b{}", b.port)).copied().unwrap_or(0);
        assert!(
            (900..=1100).contains(&n),
            "{mode}: backend {} got {n} of 3000: {:?}",
            b.port,
            r.bodies
        );
    }
}

#[test]
fn balancing_http_round_robin() {
    balance("http");
}

#[test]
fn balancing_tcp_round_robin() {
    balance("tcp");
}

#[test]
fn a_killed_backend_goes_down_then_up() {
    if !have_haproxy() {
        return;
    }
    let ctl = Ctl::new();
    let mut bs = backends("http", 3);
    let listen = format!("127.0.0.1:{}", harness::free_tcp_port());
    ctl.c
        .create(spec(json!({"name": "hc", "listen": listen,
            "backends": bs.iter().map(Backend::addr).collect::<Vec<_>>(),
            "health": {"path": "/healthz", "interval": 0.5, "timeout": 0.4, "healthy": 2, "unhealthy": 2}})))
        .unwrap();
    let mut rx = ctl.c.subscribe("hc");
    // Every backend UP first.
    wait_until(Duration::from_secs(5), || {
        ctl.c.refresh("hc").unwrap();
        ctl.c.info("hc").unwrap().backends.iter().all(|b| b.state == "UP")
    })
    .expect("all UP");
    // The metrics count the backends by state (docs/metrics.md).
    assert_eq!(metric(r#"stage_lb_backends{lb="hc",state="up"}"#), Some(3.0));
    assert_eq!(metric(r#"stage_lb_backends{lb="hc",state="down"}"#), Some(0.0));
    let victim = bs[1].addr();
    bs[1].kill();
    let t0 = Instant::now();
    let ev = loop {
        let ev = rx.blocking_recv().expect("event");
        if ev.backend.as_deref() == Some(victim.as_str()) && ev.state == "DOWN" {
            break ev;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "no DOWN event");
    };
    let took = t0.elapsed();
    // interval × unhealthy + 1 s
    assert!(took <= Duration::from_millis(2000), "DOWN after {took:?}");
    assert_eq!(ev.previous.as_deref(), Some("UP"));
    assert_eq!(metric(r#"stage_lb_backends{lb="hc",state="up"}"#), Some(2.0));
    assert_eq!(metric(r#"stage_lb_backends{lb="hc",state="down"}"#), Some(1.0));
    let r = load("http", &listen, 300, 2);
    assert_eq!(r.fail, 0, "{:?}", r.errors);
    assert_eq!(r.bodies.get(&format!("b{}", bs[1].port)), None);
    bs[1].restart();
    let t0 = Instant::now();
    loop {
        let ev = rx.blocking_recv().expect("event");
        if ev.backend.as_deref() == Some(victim.as_str()) && ev.state == "UP" {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "no UP event");
    }
    assert!(
        t0.elapsed() <= Duration::from_millis(2500),
        "UP after {:?}",
        t0.elapsed()
    );
}

#[test]
fn add_and_remove_under_load_without_failures_or_reload() {
    if !have_haproxy() {
        return;
    }
    let ctl = Ctl::new();
    let bs = backends("http", 3);
    let listen = format!("127.0.0.1:{}", harness::free_tcp_port());
    ctl.c
        .create(spec(json!({"name": "live", "listen": listen, "drain": 5,
            "backends": [bs[0].addr(), bs[1].addr()],
            "health": {"path": "/healthz", "interval": 0.5, "timeout": 0.4}})))
        .unwrap();
    let pid = ctl.c.info("live").unwrap().pid;
    let worker = stage::cloud::lb::haproxy::Runtime::new(&ctl.lbdir().join("live/admin.sock"))
        .worker_pid()
        .unwrap();
    let run = load_start("http", &listen, ctl.dir.path());
    std::thread::sleep(Duration::from_millis(500));
    ctl.c.add("live", &bs[2].addr(), false).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    ctl.c.remove("live", &bs[0].addr()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let before_end = load("http", &listen, 200, 2);
    let r = run.finish();
    assert_eq!(r.fail, 0, "{:?}", r.errors);
    assert!(r.ok > 100, "{r:?}");
    assert!(r.bodies.contains_key(&format!("b{}", bs[2].port)), "{r:?}");
    assert_eq!(
        before_end.bodies.get(&format!("b{}", bs[0].port)),
        None,
        "{before_end:?}"
    );
    let info = ctl.c.info("live").unwrap();
    assert_eq!((info.pid, info.reloads), (pid, 0));
    // `stage lb status HOME` shows the runtime-added backend UP.
    let status = Command::new(harness::stage_bin())
        .args(["lb", "status"])
        .arg(ctl.dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.starts_with(&format!("live  http {listen}  roundrobin  haproxy {pid} running")),
        "{text}"
    );
    let line = text
        .lines()
        .find(|l| l.contains(&bs[2].addr()))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains(" UP "), "{text}");
    assert!(!text.contains(&bs[0].addr()), "{text}");
    let same_worker = stage::cloud::lb::haproxy::Runtime::new(&ctl.lbdir().join("live/admin.sock"))
        .worker_pid()
        .unwrap();
    assert_eq!(same_worker, worker, "no reload: the same worker serves");
    let addrs: Vec<_> = info.backends.iter().map(|b| b.address.clone()).collect();
    assert_eq!(addrs, vec![bs[1].addr(), bs[2].addr()]);
    // The rendered config carries the runtime change too.
    let cfg = std::fs::read_to_string(ctl.lbdir().join("live/haproxy.cfg")).unwrap();
    assert!(
        cfg.contains(&bs[2].addr()) && !cfg.contains(&bs[0].addr()),
        "{cfg}"
    );
}

#[test]
fn kill_9_of_haproxy_is_replaced_with_runtime_backends() {
    if !have_haproxy() {
        return;
    }
    let ctl = Ctl::new();
    let bs = backends("http", 3);
    let listen = format!("127.0.0.1:{}", harness::free_tcp_port());
    ctl.c
        .create(spec(json!({"name": "fo", "listen": listen,
            "backends": [bs[0].addr(), bs[1].addr()],
            "health": {"path": "/healthz", "interval": 1, "timeout": 1}})))
        .unwrap();
    ctl.c.add("fo", &bs[2].addr(), false).unwrap();
    let mut rx = ctl.c.subscribe("fo");
    let old = ctl.c.info("fo").unwrap().pid;
    assert_eq!(metric(r#"stage_lb_failovers_total{lb="fo"}"#), Some(0.0));
    let worker = stage::cloud::lb::haproxy::Runtime::new(&ctl.lbdir().join("fo/admin.sock"))
        .worker_pid()
        .unwrap();
    unsafe {
        libc::kill(old, libc::SIGKILL);
        libc::kill(worker, libc::SIGKILL);
    }
    let back = wait_until(Duration::from_secs(10), || http_get(&listen).is_some()).expect("serving again");
    let ev = rx.blocking_recv().unwrap();
    assert!(
        back <= Duration::from_secs(3),
        "serving again after {back:?} ({ev:?})"
    );
    assert_eq!(ev.kind, "failover");
    assert_eq!(ev.old_pid, Some(old));
    let info = ctl.c.info("fo").unwrap();
    assert_ne!(info.pid, old);
    assert_eq!(info.failovers, 1);
    assert_eq!(metric(r#"stage_lb_failovers_total{lb="fo"}"#), Some(1.0));
    let r = load("http", &listen, 300, 2);
    assert_eq!(r.fail, 0, "{:?}", r.errors);
    assert!(
        r.bodies.contains_key(&format!("b{}", bs[2].port)),
        "runtime-added backend present: {r:?}"
    );
}

#[test]
fn controller_restart_adopts_and_keeps_serving() {
    if !have_haproxy() {
        return;
    }
    let ctl = Ctl::new();
    let bs = backends("http", 3);
    let listen = format!("127.0.0.1:{}", harness::free_tcp_port());
    ctl.c
        .create(spec(
            json!({"name": "keep", "listen": listen, "backends": [bs[0].addr(), bs[1].addr()]}),
        ))
        .unwrap();
    ctl.c.add("keep", &bs[2].addr(), false).unwrap();
    let pid = ctl.c.info("keep").unwrap().pid;
    let run = load_start("http", &listen, ctl.dir.path());
    std::thread::sleep(Duration::from_millis(300));
    ctl.c.shutdown(false);
    std::thread::sleep(Duration::from_millis(300));
    let again = open(&ctl.lbdir());
    assert_eq!(again.names(), vec!["keep".to_string()]);
    let info = again.info("keep").unwrap();
    assert_eq!(info.pid, pid, "adopted, not restarted");
    assert_eq!(info.backends.len(), 3);
    std::thread::sleep(Duration::from_millis(300));
    let r = run.finish();
    assert_eq!(r.fail, 0, "{:?}", r.errors);
    assert_eq!(r.bodies.len(), 3, "{r:?}");
    again.shutdown(true);
}

#[test]
fn bad_input_is_refused_and_the_running_lb_untouched() {
    if !have_haproxy() {
        return;
    }
    let ctl = Ctl::new();
    let bs = backends("http", 2);
    let listen = format!("127.0.0.1:{}", harness::free_tcp_port());
    ctl.c
        .create(spec(
            json!({"name": "ok", "listen": listen, "backends": [bs[0].addr()]}),
        ))
        .unwrap();
    // A port in use by another process.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let e = ctl
        .c
        .create(spec(json!({"name": "other", "listen": taken_addr})))
        .unwrap_err()
        .to_string();
    assert!(e.contains("lb.create: listen") && e.contains("in use"), "{e}");
    // The same listen address as a running LB.
    let e = ctl
        .c
        .create(spec(json!({"name": "dup", "listen": listen})))
        .unwrap_err()
        .to_string();
    assert!(e.contains("used by another lb"), "{e}");
    // An invalid backend address.
    let e = ctl
        .c
        .add("ok", "backend.example:80", false)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("ok.add:") && e.contains("not an ip:port"), "{e}");
    // A config HAProxy rejects.
    let e = ctl
        .c
        .update("ok", &json!({"options": ["no-such-directive 1"]}))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("ok.update: haproxy -c rejected the config"), "{e}");
    assert!(e.contains("no-such-directive"), "{e}");
    let e = ctl
        .c
        .update("ok", &json!({"colour": "red"}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field \"colour\""), "{e}");
    let info = ctl.c.info("ok").unwrap();
    assert_eq!(info.reloads, 0);
    assert!(ctl.c.spec("ok").unwrap().options.is_empty());
    assert_eq!(load("http", &listen, 20, 1).fail, 0);
    // A good update reloads seamlessly.
    ctl.c.update("ok", &json!({"algorithm": "leastconn"})).unwrap();
    assert_eq!(ctl.c.info("ok").unwrap().reloads, 1);
    let cfg = std::fs::read_to_string(ctl.lbdir().join("ok/haproxy.cfg")).unwrap();
    assert!(cfg.contains("balance leastconn"));
    assert_eq!(load("http", &listen, 20, 1).fail, 0);
    ctl.c.delete("ok").unwrap();
    assert!(!serving(&listen));
    assert!(ctl.c.names().is_empty());
    drop(taken);
}

/// Runs the Lua scenario `tests/lua/<rel>` on a fresh home whose preload defines `LB_ENV`
/// (`listen`, `listen2`, `backends`, `names`, `pids`, `backend_py`, `load_py`), then stops
/// whatever HAProxy the home left running.
fn lua_scenario(rel: &str, bs: &[Backend], extra: &str, limit: Duration) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lua").join(rel);
    let text = std::fs::read_to_string(&path).unwrap();
    let home = harness::TestHome::new();
    let list = |f: &dyn Fn(&Backend) -> String| bs.iter().map(f).collect::<Vec<_>>().join(", ");
    let env = format!(
        "LB_ENV = {{ listen = \"127.0.0.1:{}\", listen2 = \"127.0.0.1:{}\", backends = {{ {} }}, names = {{ {} }}, pids = {{ {} }}, backend_py = {:?}, load_py = {:?} {extra} }}\n",
        harness::free_tcp_port(),
        harness::free_tcp_port(),
        list(&|b| format!("\"{}\"", b.addr())),
        list(&|b| format!("\"b{}\"", b.port)),
        list(&|b| b.child.id().to_string()),
        script("backend.py").display().to_string(),
        script("load.py").display().to_string(),
    );
    home.write("preload/01-lb-env.lua", &env);
    home.write("package/start.lua", &text);
    let conf: Vec<&str> = text
        .lines()
        .take_while(|l| l.starts_with("--! "))
        .map(|l| &l[4..])
        .collect();
    if !conf.is_empty() {
        home.write("conf/stage.json", &conf.join("\n"));
    }
    let (code, out) = harness::wait_with_output(home.spawn(), limit);
    kill_haproxy_under(home.path());
    match code {
        Some(0) => out,
        Some(c) => panic!("scenario {rel} failed (exit {c}):\n{out}"),
        None => panic!("scenario {rel} did not finish within {limit:?}:\n{out}"),
    }
}

#[test]
fn lua_api() {
    if !have_haproxy() {
        return;
    }
    let bs = backends("http", 3);
    lua_scenario("lb/api.lua", &bs, "", Duration::from_secs(60));
}

#[test]
fn node_restart_restores_every_lb_without_failed_requests() {
    if !have_haproxy() {
        return;
    }
    let bs = backends("http", 3);
    let home = harness::TestHome::new();
    let out = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", harness::free_tcp_port());
    let env = format!(
        "LB_ENV = {{ listen = {listen:?}, out = {:?}, backends = {{ {} }} }}\n",
        out.path().display().to_string(),
        bs.iter()
            .map(|b| format!("\"{}\"", b.addr()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    home.write("preload/01-lb-env.lua", &env);
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lua/lb/restart.lua"))
            .unwrap();
    home.write("package/start.lua", &text);
    let stop = |child: Child| {
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        harness::wait_with_output(child, Duration::from_secs(10))
    };
    let node = home.spawn();
    let first = out.path().join("first");
    if wait_until(Duration::from_secs(20), || first.exists()).is_none() {
        let (_, log) = stop(node);
        kill_haproxy_under(home.path());
        panic!("the first run did not create the lb:\n{log}");
    }
    let run = load_start("http", &listen, out.path());
    std::thread::sleep(Duration::from_millis(300));
    let (code, log1) = stop(node);
    assert_eq!(code, Some(0), "{log1}");
    std::thread::sleep(Duration::from_millis(300));
    let node = home.spawn();
    let second = out.path().join("second");
    let restored = wait_until(Duration::from_secs(20), || second.exists());
    std::thread::sleep(Duration::from_millis(300));
    let r = run.finish();
    let (_, log2) = stop(node);
    kill_haproxy_under(home.path());
    assert!(restored.is_some(), "the second run did not find the lb:\n{log2}");
    assert_eq!(
        std::fs::read_to_string(&first).unwrap(),
        std::fs::read_to_string(&second).unwrap(),
        "the same haproxy serves across the restart"
    );
    assert_eq!(r.fail, 0, "{:?}", r.errors);
    assert!(r.ok > 50, "{r:?}");
    assert_eq!(r.bodies.len(), 3, "all three backends served: {r:?}");
    assert!(log2.contains("lb web: adopted the running haproxy"), "{log2}");
}

#[test]
fn lua_autoscaling_through_a_provider() {
    if !have_haproxy() {
        return;
    }
    let bs = backends("http", 1);
    let out = tempfile::tempdir().unwrap();
    let spare: Vec<String> = (0..4).map(|_| harness::free_tcp_port().to_string()).collect();
    let extra = format!(
        ", spare = {{ {} }}, out = {:?}",
        spare.join(", "),
        out.path().display().to_string()
    );
    let log = lua_scenario("lb/autoscale.lua", &bs, &extra, Duration::from_secs(90));
    assert!(log.contains("quota exceeded"), "the provider error is logged");
    assert!(log.contains("scale-out failed; retrying in 1 s"), "{log}");
}

/// The example home's JSON API (stage/package/lbaas.lua) over BSON, driven by Python's bson.
#[test]
fn json_api_example_over_bson() {
    json_api_example(Transport::Bson);
}

/// The same API over HTTP, driven by curl: POST JSON, the HTTP status matching the answer
/// (200 successful, 400 a bad request, 404 what does not exist), 405 for GET, bad JSON and a
/// body that names a file answered 400 without reading it.
#[test]
fn json_api_example_over_http() {
    json_api_example(Transport::Http);
}

#[derive(Clone, Copy, PartialEq)]
enum Transport {
    Bson,
    Http,
}

/// `curl -si` with `args`: the HTTP status, the headers (lower-case names) and the body.
fn curl(url: &str, args: &[&str]) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-si", "--max-time", "30", url])
        .args(args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head: {text}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status: {text}"));
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn json_api_example(transport: Transport) {
    if !have_haproxy() {
        return;
    }
    let bs = backends("http", 3);
    let home = harness::TestHome::new();
    let out = tempfile::tempdir().unwrap();
    let api_port = harness::free_tcp_port();
    let http_port = harness::free_tcp_port();
    let listen = format!("127.0.0.1:{}", harness::free_tcp_port());
    home.write(
        "preload/01-lb-env.lua",
        &format!(
            "LB_ENV = {{ api_port = {api_port}, http_port = {http_port}, out = {:?} }}\n",
            out.path().display().to_string()
        ),
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("tests/lua/lb/lbaas.lua")).unwrap();
    let conf: Vec<&str> = text
        .lines()
        .take_while(|l| l.starts_with("--! "))
        .map(|l| &l[4..])
        .collect();
    home.write("conf/stage.json", &conf.join("\n"));
    home.write("package/start.lua", &text);
    home.write(
        "package/lbaas.lua",
        &std::fs::read_to_string(root.join("stage/package/lbaas.lua")).unwrap(),
    );
    let node = home.spawn();
    let finish = |node: Child| {
        unsafe { libc::kill(node.id() as i32, libc::SIGTERM) };
        let r = harness::wait_with_output(node, Duration::from_secs(10));
        kill_haproxy_under(home.path());
        r.1
    };
    if wait_until(Duration::from_secs(20), || out.path().join("ready").exists()).is_none() {
        panic!("the api did not start:\n{}", finish(node));
    }
    let hc = json!({"protocol": "HTTP", "port": bs[0].port, "request-path": "/healthz",
        "criteria": {"interval": 1, "timeout": 1, "health-threshold": 2, "unhealth-threshold": 2}});
    let reqs = json!([
        {"action": "create", "type": "project", "info": {"user": "john", "name": "john's project"}},
        {"action": "create", "type": "instance", "info": {"name": "web", "project": "john's project",
            "listen": listen, "traffic_type": "http",
            "backend": {"entities": [bs[0].addr(), bs[1].addr()], "health-check": hc, "auto-scaling": false}}},
        {"action": "info", "type": "project", "info": {"name": "john's project"}},
        {"action": "update", "type": "instance", "info": {"name": "web",
            "backend": {"entities": [bs[1].addr(), bs[2].addr()]}}},
        {"action": "info", "type": "instance", "info": {"name": "web"}},
        {"action": "update", "type": "project", "info": {"id": 1, "user": "jane"}},
        // Bad requests: each a "fail" naming the field.
        {"action": "create", "type": "project", "info": {"name": "no user"}},
        {"action": "launch", "type": "project", "info": {}},
        {"action": "create", "type": "vm", "info": {}},
        {"action": "create", "type": "instance", "info": {"name": "bad", "project": "john's project",
            "listen": "127.0.0.1:1", "backend": {"entities": ["not-an-ip"]}}},
        {"action": "create", "type": "instance", "info": {"name": "x", "project": "nobody's"}},
        {"action": "delete", "type": "project", "info": {"id": 1}},
        {"action": "delete", "type": "instance", "info": {"name": "web"}},
        {"action": "delete", "type": "project", "info": {"id": 1}},
        {"action": "info", "type": "project", "info": {"id": 1}},
    ]);
    let file = out.path().join("requests.json");
    std::fs::write(&file, reqs.to_string()).unwrap();
    let (res, statuses): (Vec<Json>, Vec<u16>) = if transport == Transport::Bson {
        let client = Command::new("python3")
            .arg(script("bson_client.py"))
            .arg(format!("127.0.0.1:{api_port}"))
            .arg(&file)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&client.stdout);
        let res = serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("{e}: {text} {}", String::from_utf8_lossy(&client.stderr)));
        (res, vec![])
    } else {
        let url = format!("http://127.0.0.1:{http_port}/");
        let mut res = vec![];
        let mut statuses = vec![];
        for r in reqs.as_array().unwrap() {
            let (status, head, body) = curl(
                &url,
                &["-H", "content-type: application/json", "-d", &r.to_string()],
            );
            assert!(head.contains("content-type: application/json"), "{head}");
            res.push(serde_json::from_str::<Json>(&body).unwrap_or_else(|e| panic!("{e}: {body}")));
            statuses.push(status);
        }
        // Not POST, not JSON, a file name: refused before any handler, nothing read.
        let (status, head, body) = curl(&url, &[]);
        assert_eq!(status, 405, "GET: {body}");
        assert!(head.contains("allow: post"), "{head}");
        assert_eq!(
            serde_json::from_str::<Json>(&body).unwrap()["status"],
            "fail",
            "{body}"
        );
        std::fs::write(
            home.path().join("x.json"),
            r#"{"action":"info","type":"project","info":{"id":1}}"#,
        )
        .unwrap();
        for (bad, needle) in [
            ("x.json", "must be a JSON object"),
            ("[1]", "must be a JSON object"),
            ("", "must be a JSON object"),
            ("{\"action\": ", "invalid JSON"),
        ] {
            let (status, _, body) = curl(&url, &["-d", bad]);
            let v: Json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
            assert_eq!(
                (status, v["status"].as_str()),
                (400, Some("fail")),
                "{bad:?}: {body}"
            );
            assert!(v["message"].as_str().unwrap().contains(needle), "{bad:?}: {body}");
        }
        (res, statuses)
    };
    let log = finish(node);
    if transport == Transport::Http {
        let want: Vec<u16> = [200; 6]
            .into_iter()
            .chain([400, 400, 400, 400, 404, 400, 200, 200, 404])
            .collect();
        assert_eq!(statuses, want, "{res:?}\n{log}");
        assert_eq!(
            res[0]["info"]["instances"],
            json!([]),
            "an empty list: {}",
            res[0]
        );
    }
    let st = |i: usize| res[i]["status"].as_str().unwrap().to_string();
    let msg = |i: usize| res[i]["message"].as_str().unwrap_or("").to_string();
    for (i, r) in res.iter().enumerate().take(6) {
        assert_eq!(r["status"], "successful", "request {i}: {r}\n{log}");
    }
    assert_eq!(res[0]["info"]["id"], 1);
    assert_eq!(res[1]["info"]["url"], format!("http://{listen}"));
    assert_eq!(res[2]["info"]["instances"], json!(["web"]));
    assert_eq!(
        res[4]["info"]["backend"]["entities"],
        json!([bs[1].addr(), bs[2].addr()])
    );
    assert_eq!(
        res[4]["info"]["backend"]["health-check"]["criteria"]["unhealth-threshold"],
        2
    );
    assert_eq!(res[5]["info"]["user"], "jane");
    assert_eq!((st(6), msg(6).as_str()), ("fail".into(), "info.user is required"));
    assert!(msg(7).starts_with("action: expected"), "{}", msg(7));
    assert!(msg(8).starts_with("type: expected"), "{}", msg(8));
    assert!(
        msg(9).contains("backends[1]") && msg(9).contains("not an ip:port"),
        "{}",
        msg(9)
    );
    assert!(msg(10).contains("does not exist"), "{}", msg(10));
    assert!(msg(11).contains("still has instances"), "{}", msg(11));
    assert_eq!(
        (st(12), st(13), st(14)),
        ("successful".into(), "successful".into(), "fail".into())
    );
    for i in 6..12 {
        assert_eq!(st(i), "fail", "request {i}: {}", res[i]);
        assert_eq!(res[i]["action"], reqs[i]["action"]);
    }
}

/// The store on PostgreSQL and MariaDB (the `%odbc` connection named `LB` can be any ODBC
/// database): a spec written, replaced, read back and deleted.
#[test]
fn store_on_postgresql_and_mariadb() {
    use stage::cloud::lb::store::Store;
    let dbs = [
        (
            "STAGE_TEST_PG",
            "DRIVER={PostgreSQL Unicode};SERVER=127.0.0.1;PORT=5432;DATABASE=stage_test;UID=stage;PWD=stage;",
            5432,
        ),
        (
            "STAGE_TEST_MYSQL",
            "DRIVER={MariaDB Unicode};SERVER=127.0.0.1;PORT=3306;DATABASE=stage_test;UID=stage;PWD=stage;",
            3306,
        ),
    ];
    for (var, default, port) in dbs {
        if std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))
            .is_err()
        {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("the database on port {port} is not reachable and CI=true: run scripts/services");
            }
            eprintln!("skipping {var}: nothing on port {port} (run scripts/services)");
            continue;
        }
        let conn = std::env::var(var).unwrap_or_else(|_| default.to_string());
        let store = Store::open(stage::db::ConnSpec::from_string(&conn)).unwrap();
        let name = format!("t{}x{port}", std::process::id());
        let mut s = spec(json!({"name": name, "listen": "127.0.0.1:1", "backends": ["127.0.0.1:2"]}));
        store.put(&s).unwrap();
        s.backends.push(stage::cloud::lb::Backend {
            address: "127.0.0.1:3".into(),
            autoscaled: true,
        });
        store.put(&s).unwrap();
        let all = store.load().unwrap();
        for e in all.iter().filter_map(|r| r.as_ref().err()) {
            eprintln!("{var}: {e}");
        }
        let mine: Vec<Spec> = all
            .into_iter()
            .filter_map(Result::ok)
            .filter(|x| x.name == name)
            .collect();
        assert_eq!(mine, vec![s.clone()], "{var}");
        store.delete(&name).unwrap();
        assert!(!store
            .load()
            .unwrap()
            .into_iter()
            .filter_map(Result::ok)
            .any(|x| x.name == name));
    }
}

#[test]
fn autoscaled_backends_warm_up_with_slowstart() {
    if !have_haproxy() {
        return;
    }
    let ctl = Ctl::new();
    let bs = backends("http", 3);
    let listen = format!("127.0.0.1:{}", harness::free_tcp_port());
    ctl.c
        .create(spec(
            json!({"name": "warm", "listen": listen, "backends": [bs[0].addr()],
            "health": {"path": "/healthz", "interval": 0.2, "timeout": 0.2, "healthy": 1},
            "autoscale": {"min": 1, "max": 3, "target": {"queue": 5}, "warmup": 60}}),
        ))
        .unwrap();
    // One backend the autoscaler added (slowstart), one added by hand (full weight at once).
    ctl.c.add("warm", &bs[1].addr(), true).unwrap();
    ctl.c.add("warm", &bs[2].addr(), false).unwrap();
    let cfg = std::fs::read_to_string(ctl.lbdir().join("warm/haproxy.cfg")).unwrap();
    assert!(
        cfg.contains(&format!(
            "{} check inter 200ms fall 2 rise 1 slowstart 60000ms\n",
            bs[1].addr()
        )),
        "{cfg}"
    );
    assert!(
        cfg.contains(&format!("{} check inter 200ms fall 2 rise 1\n", bs[2].addr())),
        "{cfg}"
    );
    wait_until(Duration::from_secs(5), || {
        ctl.c.refresh("warm").unwrap();
        ctl.c
            .info("warm")
            .unwrap()
            .backends
            .iter()
            .all(|b| b.state == "UP")
    })
    .expect("every backend UP");
    let r = load("http", &listen, 600, 2);
    assert_eq!(r.fail, 0, "{:?}", r.errors);
    let got = |b: &Backend| r.bodies.get(&format!("b{}", b.port)).copied().unwrap_or(0);
    let (warming, full) = (got(&bs[1]), got(&bs[2]));
    eprintln!(
        "600 requests: listed {}, autoscaled (warming) {warming}, hand-added {full}",
        got(&bs[0])
    );
    // Without warm-up each would take a third (200); warming up it starts near zero.
    assert!(full >= 150, "a hand-added backend takes its share at once: {r:?}");
    assert!(
        warming < full / 3,
        "the autoscaled backend is still warming up ({warming} vs {full}): {r:?}"
    );
}
