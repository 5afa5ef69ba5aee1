//! Test support: runs the real `stage` binary on a temporary stage home.
//!
//! A scenario is a Lua file under tests/lua/. It becomes `package/start.lua` of a fresh home
//! whose `preload/` holds the helpers below (`check`, `eq`, `fail`, `done`, `write`, `read`).
//! Leading lines that start with `--! ` are joined and written as `conf/stage.json`.
//! The scenario passes when the node exits 0 (`done()`), and fails on `fail()`, on a failed
//! `check`/`eq` (exit 1), or when it does not finish within its time limit.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const HELPERS: &str = r#"
-- Test helpers, preloaded into every instance by the scenario harness.
function fail(msg)
    logger.error("FAIL: " .. tostring(msg) .. "\n" .. debug.traceback("", 2))
    process.exit(1)
    error("scenario failed: " .. tostring(msg), 2)
end
function check(cond, msg)
    if not cond then fail(msg or "check failed") end
    return cond
end
local function show(v)
    if type(v) == "string" then return string.format("%q", v) end
    return tostring(v) .. " (" .. (math.type(v) or type(v)) .. ")"
end
function eq(got, want, msg)
    if got ~= want or math.type(got) ~= math.type(want) then
        fail((msg or "eq") .. ": expected " .. show(want) .. ", got " .. show(got))
    end
end
function done()
    logger.info("PASS")
    process.exit(0)
end
function wait_until(f, ms)
    local limit = process.tick + (ms or 2000) / 1000
    while not f() do
        if process.tick > limit then return false end
        stage.sleep(5)
    end
    return true
end
function write(path, text)
    local f = assert(io.open(path, "w"))
    f:write(text)
    f:close()
end
function read(path)
    local f = io.open(path, "r")
    if not f then return nil end
    local s = f:read("a")
    f:close()
    return s
end
"#;

/// One `#[test]` per scenario: `scenarios! { name => "module/case.lua", }`
/// (use with `#[macro_use] mod harness;`).
#[allow(unused_macros)]
macro_rules! scenarios {
    ($($name:ident => $path:literal,)*) => {
        $(#[test] fn $name() { harness::run_scenario($path); })*
    };
}

/// The built binary under test.
pub fn stage_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_stage"))
}

/// A temporary stage home with the test helpers preloaded.
pub struct TestHome {
    pub dir: tempfile::TempDir,
}

impl TestHome {
    pub fn new() -> TestHome {
        let dir = tempfile::tempdir().expect("tempdir");
        for d in ["conf", "package", "lib", "rollback", "preload", "logs"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("preload/00-test.lua"), HELPERS).unwrap();
        TestHome { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// Starts `stage run` on this home with stderr captured.
    pub fn spawn(&self) -> Child {
        Command::new(stage_bin())
            .arg("run")
            .arg(self.path())
            .env("STAGE_LOG", "info")
            // `stage._panic` and other test-only hooks (src/lua/stage.rs).
            .env("STAGE_TEST_HOOKS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start stage")
    }
}

impl Default for TestHome {
    fn default() -> Self {
        TestHome::new()
    }
}

/// Waits for `child` up to `limit`; kills it after that. Returns (exit code, output).
/// The pipes are drained while it runs, so a chatty child never blocks on a full pipe.
pub fn wait_with_output(mut child: Child, limit: Duration) -> (Option<i32>, String) {
    fn drain(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    }
    let (err, out) = (drain(child.stderr.take()), drain(child.stdout.take()));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut text = err.join().unwrap_or_default();
    text.push_str(&out.join().unwrap_or_default());
    (status, text)
}

/// Runs the scenario `tests/lua/<rel>` and panics with the node's log if it fails.
pub fn run_scenario(rel: &str) {
    run_scenario_with(rel, |_| {});
}

/// As `run_scenario`, with a hook to add files to the home before the node starts.
pub fn run_scenario_with(rel: &str, setup: impl FnOnce(&TestHome)) {
    run_scenario_output(rel, setup);
}

/// As `run_scenario_with`; returns the node's log (stderr, then stdout) when it passed.
pub fn run_scenario_output(rel: &str, setup: impl FnOnce(&TestHome)) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lua").join(rel);
    let script = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let home = TestHome::new();
    let conf: String = script
        .lines()
        .take_while(|l| l.starts_with("--! "))
        .map(|l| &l[4..])
        .collect::<Vec<_>>()
        .join("\n");
    if !conf.is_empty() {
        home.write("conf/stage.json", &conf);
    }
    home.write("package/start.lua", &script);
    setup(&home);
    let limit = std::env::var("STAGE_SCENARIO_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let (code, out) = wait_with_output(home.spawn(), Duration::from_secs(limit));
    match code {
        Some(0) => out,
        Some(c) => panic!("scenario {rel} failed (exit {c}):\n{out}"),
        None => panic!("scenario {rel} did not finish within {limit} s (call done()):\n{out}"),
    }
}

/// PostgreSQL control for the outage tests (odbc, densefog).
///
/// `pg_ctlcluster` arguments of the first cluster: (version, name).
pub fn pg_cluster() -> (String, String) {
    let out = std::process::Command::new("pg_lsclusters")
        .arg("-h")
        .output()
        .expect("pg_lsclusters (scripts/setup)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut f = text
        .lines()
        .next()
        .expect("a PostgreSQL cluster (scripts/services)")
        .split_whitespace();
    (f.next().unwrap().to_string(), f.next().unwrap().to_string())
}

pub fn pg_ctl(action: &str) {
    let (ver, name) = pg_cluster();
    let mut cmd = std::process::Command::new("pg_ctlcluster");
    cmd.args([&ver, &name, action]);
    if action == "stop" {
        cmd.args(["-m", "fast"]);
    }
    let st = cmd.status().expect("pg_ctlcluster");
    assert!(st.success(), "pg_ctlcluster {ver} {name} {action} failed: {st}");
}

/// Restarts PostgreSQL when dropped, so a failing test never leaves it down.
pub struct RestartPg;

impl Drop for RestartPg {
    fn drop(&mut self) {
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], 5432).into();
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
            pg_ctl("start");
        }
    }
}

/// A UDP port free on 127.0.0.1 now (also free for TCP there, most likely: cluster nodes
/// listen on both).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TCP port free on 127.0.0.1 now.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `curl -s` with `args` on `url`, giving up after `max_secs`; returns (HTTP status, body),
/// status 0 when no answer came.
pub fn curl_status(args: &[&str], url: &str, max_secs: u32) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", &max_secs.to_string(), "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Polls `f` every 100 ms until it returns `Some`, at most `limit`.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Kills a node and returns what it printed.
pub fn stop(mut c: Child) -> String {
    let _ = c.kill();
    wait_with_output(c, Duration::from_secs(5)).1
}
