//! The `densefog` library (docs/densefog.md) against real databases: the API router and the
//! job worker as Lua scenarios under tests/lua/densefog/ on SQLite, PostgreSQL and MariaDB,
//! and several `stage` processes sharing one job table (exactly-once, `kill -9` mid-job).
//!
//! PostgreSQL and MariaDB are expected on 127.0.0.1 (`scripts/services`: database
//! `stage_test`, user/password `stage`); when one is unreachable its tests are skipped with a
//! message, except with `CI=true`, where they fail.

mod harness;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Child;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Tests of one database share its `job` table names; they run one at a time per database.
static SQL_PG: Mutex<()> = Mutex::new(());
static SQL_MY: Mutex<()> = Mutex::new(());

#[derive(Clone, Copy, PartialEq)]
enum Db {
    Sqlite,
    Postgres,
    Mysql,
}

impl Db {
    /// The connection; SQLite's file is absolute so that several homes share it.
    fn conn(self, sqlite_file: &Path) -> serde_json::Value {
        match self {
            Db::Sqlite => serde_json::json!({
                "DRIVER": "SQLite3", "DATABASE": sqlite_file.to_str().unwrap(),
                "JournalMode": "WAL", "SyncPragma": "NORMAL", ".connectionTimeout": 10000
            }),
            Db::Postgres => serde_json::Value::String(std::env::var("STAGE_TEST_PG").unwrap_or_else(|_| {
                "DRIVER={PostgreSQL Unicode};SERVER=127.0.0.1;PORT=5432;DATABASE=stage_test;UID=stage;PWD=stage;".into()
            })),
            Db::Mysql => serde_json::Value::String(std::env::var("STAGE_TEST_MYSQL").unwrap_or_else(|_| {
                "DRIVER={MariaDB Unicode};SERVER=127.0.0.1;PORT=3306;DATABASE=stage_test;UID=stage;PWD=stage;".into()
            })),
        }
    }

    fn preload(self) -> &'static str {
        match self {
            Db::Sqlite => r#"DIALECT = "sqlite"; SQL_SLEEP = nil"#,
            Db::Postgres => r#"DIALECT = "postgres"; SQL_SLEEP = "SELECT pg_sleep(0.05)""#,
            Db::Mysql => r#"DIALECT = "mysql"; SQL_SLEEP = "SELECT SLEEP(0.05)""#,
        }
    }

    fn port(self) -> Option<u16> {
        match self {
            Db::Sqlite => None,
            Db::Postgres => Some(5432),
            Db::Mysql => Some(3306),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Db::Sqlite => "SQLite",
            Db::Postgres => "PostgreSQL",
            Db::Mysql => "MariaDB",
        }
    }

    fn lock(self) -> Option<std::sync::MutexGuard<'static, ()>> {
        let m = match self {
            Db::Sqlite => return None,
            Db::Postgres => &SQL_PG,
            Db::Mysql => &SQL_MY,
        };
        Some(m.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Whether the server of `db` answers; panics under CI when it does not.
fn available(db: Db) -> bool {
    let Some(port) = db.port() else { return true };
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok() {
        return true;
    }
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!(
            "{} is not reachable on {addr} and CI=true: run scripts/services",
            db.name()
        );
    }
    eprintln!(
        "skipping: {} is not reachable on {addr} (run scripts/services)",
        db.name()
    );
    false
}

fn config(db: Db, sqlite_file: &Path, instances: usize) -> String {
    let startup: Vec<_> = (0..instances).map(|_| serde_json::json!(["lua+stage"])).collect();
    serde_json::json!({
        "#threads": [4, 1024],
        "#startup": startup,
        "lua": { "%odbc": { "DB": db.conn(sqlite_file) } }
    })
    .to_string()
}

fn run_on(db: Db, rel: &str) {
    if !available(db) {
        return;
    }
    let _guard = db.lock();
    harness::run_scenario_with(rel, |home| {
        let file = home.path().join("data/test.db");
        std::fs::create_dir_all(home.path().join("data")).unwrap();
        home.write("conf/stage.json", &config(db, &file, 1));
        home.write("preload/10-db.lua", db.preload());
    });
}

macro_rules! on_databases {
    ($($name:ident => $path:literal,)*) => {
        mod sqlite { use super::*; $(#[test] fn $name() { run_on(Db::Sqlite, $path); })* }
        mod postgres { use super::*; $(#[test] fn $name() { run_on(Db::Postgres, $path); })* }
        mod mariadb { use super::*; $(#[test] fn $name() { run_on(Db::Mysql, $path); })* }
    };
}

on_databases! {
    api => "densefog/api.lua",
    worker => "densefog/worker.lua",
}

/// One `stage` process of a multi-node test: tests/lua/densefog/nodes.lua with `settings`
/// (Lua assignments: ROLE, JOBS, ...) preloaded, `instances` Lua instances.
fn node(db: Db, shared: &Path, instances: usize, settings: &str) -> harness::TestHome {
    let home = harness::TestHome::new();
    let script =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lua/densefog/nodes.lua"))
            .unwrap();
    home.write("conf/stage.json", &config(db, &shared.join("jobs.db"), instances));
    home.write("preload/10-db.lua", db.preload());
    home.write("preload/20-role.lua", settings);
    home.write("package/start.lua", &script);
    home
}

/// Runs a node to its end and panics with its log unless it exits 0.
fn run_node(home: &harness::TestHome, what: &str, limit: Duration) {
    let (code, out) = harness::wait_with_output(home.spawn(), limit);
    assert_eq!(code, Some(0), "{what} failed:\n{out}");
}

fn finish(child: Child, what: &str, limit: Duration) {
    let (code, out) = harness::wait_with_output(child, limit);
    assert_eq!(code, Some(0), "{what} failed:\n{out}");
}

/// 1,000 jobs, 3 workers on 2 processes (2 instances + 1): every job runs exactly once, and
/// every worker took part.
fn exactly_once(db: Db) {
    if !available(db) {
        return;
    }
    let _guard = db.lock();
    let shared = tempfile::tempdir().unwrap();
    let jobs = 1000;
    let seed = node(
        db,
        shared.path(),
        1,
        &format!("ROLE = 'seed'; JOBS = {jobs}; ACTION = 'Count'"),
    );
    run_node(&seed, "seed", Duration::from_secs(120));
    let settings = format!("ROLE = 'worker'; JOBS = {jobs}; PICK = 10; EXEC = 10");
    let a = node(db, shared.path(), 2, &settings);
    let b = node(db, shared.path(), 1, &settings);
    let (ca, cb) = (a.spawn(), b.spawn());
    finish(ca, "node A (2 workers)", Duration::from_secs(300));
    finish(cb, "node B (1 worker)", Duration::from_secs(60));
    let verify = node(
        db,
        shared.path(),
        1,
        &format!("ROLE = 'verify'; JOBS = {jobs}; EXACT = true"),
    );
    run_node(&verify, "verify", Duration::from_secs(60));
    let report = std::fs::read_to_string(verify.path().join("verified")).unwrap();
    let workers: Vec<&str> = report.lines().filter(|l| !l.starts_with("rerun=")).collect();
    assert_eq!(workers.len(), 3, "all three workers ran jobs:\n{report}");
    assert!(report.contains("rerun=0"), "{report}");
}

/// A worker killed with SIGKILL while it runs jobs: after their lease those jobs run again on
/// the other node; every job ends finished, and only the killed worker's jobs ran twice.
fn kill9_mid_job(db: Db) {
    if !available(db) {
        return;
    }
    let _guard = db.lock();
    let shared = tempfile::tempdir().unwrap();
    let jobs = 30;
    let seed = node(
        db,
        shared.path(),
        1,
        &format!("ROLE = 'seed'; JOBS = {jobs}; ACTION = 'Slow'"),
    );
    run_node(&seed, "seed", Duration::from_secs(60));
    let settings = format!(
        "ROLE = 'worker'; JOBS = {jobs}; PICK = 5; EXEC = 5; TIMEOUT = 3; MARGIN = 1; SLOW_MS = 1500"
    );
    let victim = node(db, shared.path(), 1, &settings);
    let mut child = victim.spawn();
    let start = Instant::now();
    let busy = loop {
        let found = std::fs::read_dir(victim.path())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("busy."));
        if found {
            break true;
        }
        if start.elapsed() > Duration::from_secs(30) || child.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // SIGKILL: no chance to record anything.
    let _ = child.kill();
    let (_, out) = harness::wait_with_output(child, Duration::from_secs(5));
    assert!(busy, "the victim never started a job:\n{out}");
    let survivor = node(db, shared.path(), 1, &settings);
    run_node(&survivor, "the surviving node", Duration::from_secs(90));
    let verify = node(
        db,
        shared.path(),
        1,
        &format!("ROLE = 'verify'; JOBS = {jobs}; EXACT = false"),
    );
    run_node(&verify, "verify", Duration::from_secs(60));
    let report = std::fs::read_to_string(verify.path().join("verified")).unwrap();
    let rerun: usize = report
        .lines()
        .find_map(|l| l.strip_prefix("rerun="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=5).contains(&rerun),
        "the killed worker's jobs (at most exec_size = 5) ran again, nothing else:\n{report}"
    );
}

#[test]
fn exactly_once_sqlite() {
    exactly_once(Db::Sqlite);
}

#[test]
fn exactly_once_postgres() {
    exactly_once(Db::Postgres);
}

#[test]
fn kill9_mid_job_sqlite() {
    kill9_mid_job(Db::Sqlite);
}

#[test]
fn kill9_mid_job_postgres() {
    kill9_mid_job(Db::Postgres);
}

/// PostgreSQL stopped for 3 s while a worker picks and runs jobs: picks fail and are retried,
/// results wait for the database, and every job still finishes (none lost, none failed).
///
/// The worker has more slots (`exec_size`) than there are jobs, so its picker keeps polling
/// every `interval` through the whole outage: a pick meets the outage whatever the timing. (With
/// every slot taken, the picker waits for a slot, and a slot frees only when a result is written,
/// which cannot happen during the outage: whether a pick met it was a race, lost on a loaded
/// machine.) The jobs sleep 1.5 s after their start is recorded and the outage begins when the
/// first one started, so results are still due when the database goes away.
#[test]
fn postgres_outage_during_picks() {
    if !available(Db::Postgres) {
        return;
    }
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if !root && std::env::var("CI").as_deref() != Ok("true") {
        eprintln!("skipping: stopping PostgreSQL needs root");
        return;
    }
    let _guard = Db::Postgres.lock();
    let shared = tempfile::tempdir().unwrap();
    let jobs = 20;
    let seed = node(
        Db::Postgres,
        shared.path(),
        1,
        &format!("ROLE = 'seed'; JOBS = {jobs}; ACTION = 'Slow'"),
    );
    run_node(&seed, "seed", Duration::from_secs(60));
    let w = node(
        Db::Postgres,
        shared.path(),
        1,
        &format!(
            "ROLE = 'worker'; JOBS = {jobs}; PICK = 5; EXEC = {}; TIMEOUT = 10; MARGIN = 15; SLOW_MS = 1500",
            jobs + 5
        ),
    );
    let child = w.spawn();
    let _restart = harness::RestartPg;
    // The outage starts once the worker runs jobs (a fixed delay missed it on a loaded
    // machine, where the node took longer than the outage to start).
    let started = std::time::Instant::now();
    let busy = || {
        std::fs::read_dir(w.path())
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("busy."))
            })
            .unwrap_or(false)
    };
    while !busy() && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(busy(), "the worker ran no job within 60 s");
    harness::pg_ctl("stop");
    std::thread::sleep(Duration::from_secs(3));
    harness::pg_ctl("start");
    let (code, out) = harness::wait_with_output(child, Duration::from_secs(120));
    assert_eq!(code, Some(0), "the worker across the outage failed:\n{out}");
    let stats = std::fs::read_to_string(w.path().join("stats.0")).unwrap();
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert!(
        stats["pick_errors"].as_i64().unwrap() >= 1,
        "no pick met the outage: {stats}\n{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.contains(" result: ") && l.contains("; retrying in ")),
        "no job's result waited for the database: {stats}\n{out}"
    );
    assert_eq!(stats["failed"].as_i64(), Some(0), "{stats}");
    assert_eq!(stats["lost"].as_i64(), Some(0), "{stats}");
    let verify = node(
        Db::Postgres,
        shared.path(),
        1,
        &format!("ROLE = 'verify'; JOBS = {jobs}; EXACT = false"),
    );
    run_node(&verify, "verify", Duration::from_secs(60));
}

/// One answer of the HTTP API as curl saw it.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    json: serde_json::Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `curl -si URL ARGS...`: the status, the headers (names lower-cased) and the JSON body.
fn curl(url: &str, args: &[&str]) -> Answer {
    let out = std::process::Command::new("curl")
        .args([
            "-si",
            "--max-time",
            "20",
            "-H",
            "content-type: application/json",
            url,
        ])
        .args(args)
        .output()
        .expect("curl (scripts/setup installs it)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "curl {args:?}: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head: {text}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok());
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: body {body:?}"));
    Answer {
        status: status.unwrap_or_else(|| panic!("no status: {text}")),
        headers,
        json,
    }
}

/// The example stage/package/iaas.lua against the Vultr emulator: RunInstances as a job, then
/// the API over HTTP with curl (routing, error codes and shapes, 405, `x-request-id`,
/// concurrent requests) and over BSON TCP from `stage send` (a client that is not the
/// broker's codec).
#[test]
fn iaas_example_on_the_vultr_emulator() {
    use stage::cloud::vultr_emulator::{Emulator, EmulatorConfig, Lifecycle};
    let emu = Emulator::start(
        "127.0.0.1:0".parse().unwrap(),
        EmulatorConfig {
            api_key: "DENSEFOG-TEST-KEY".into(),
            lifecycle: Lifecycle::scaled(Duration::from_millis(100)),
            ..Default::default()
        },
    )
    .unwrap();
    let home = harness::TestHome::new();
    let db = home.path().join("data/jobs.db");
    std::fs::create_dir_all(home.path().join("data")).unwrap();
    home.write(
        "conf/stage.json",
        &serde_json::json!({
            "%vultr": { "endpoint": emu.endpoint(), "api_key": "DENSEFOG-TEST-KEY" },
            "lua": { "%odbc": { "DB": Db::Sqlite.conn(&db) } }
        })
        .to_string(),
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    home.write(
        "package/iaas.lua",
        &std::fs::read_to_string(root.join("stage/package/iaas.lua")).unwrap(),
    );
    home.write(
        "package/start.lua",
        &std::fs::read_to_string(root.join("tests/lua/densefog/iaas.lua")).unwrap(),
    );
    let mut child = home.spawn();
    let start = Instant::now();
    while !home.path().join("ready").exists() {
        if start.elapsed() > Duration::from_secs(40) || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let (_, out) = harness::wait_with_output(child, Duration::from_secs(5));
            panic!("the iaas scenario did not get ready:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let port = std::fs::read_to_string(home.path().join("port")).unwrap();
    let url = format!("http://127.0.0.1:{}/", port.trim());
    // HTTP with curl: POST bodies routed by their action.
    let r = curl(
        &url,
        &["-d", r#"{"action":"DescribeInstances","project_id":"p-1"}"#],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json["ret_code"], 0, "{r:?}");
    assert_eq!(r.json["action"], "DescribeInstancesResponse", "{r:?}");
    assert_eq!(r.json["instance_set"].as_array().map(Vec::len), Some(1), "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    let rid = r.header("x-request-id").expect("x-request-id header").to_string();
    assert!(rid.starts_with("req-"), "{r:?}");
    assert_eq!(
        r.json["request_id"],
        rid.as_str(),
        "the header is the body's request id: {r:?}"
    );
    let again = curl(
        &url,
        &["-d", r#"{"action":"DescribeInstances","project_id":"p-1"}"#],
    );
    assert_ne!(
        again.header("x-request-id"),
        Some(rid.as_str()),
        "a new id per request"
    );
    // The project from the x-project-id header; another project sees nothing.
    let r = curl(
        &url,
        &[
            "-H",
            "x-project-id: p-1",
            "-d",
            r#"{"action":"DescribeInstances"}"#,
        ],
    );
    assert_eq!(r.json["instance_set"].as_array().map(Vec::len), Some(1), "{r:?}");
    let r = curl(
        &url,
        &["-d", r#"{"action":"DescribeInstances","project_id":"p-2"}"#],
    );
    assert_eq!(r.json["instance_set"].as_array().map(Vec::len), Some(0), "{r:?}");
    // Errors: the code in the body, the matching HTTP status, the seed's shape.
    for (body, status, code, needle) in [
        (r#"{"action":"LaunchRockets"}"#, 404, 4104, "LaunchRockets"),
        (
            r#"{"action":"DescribeJobs","job_id":"job-nope","project_id":"p-1"}"#,
            404,
            4104,
            "job-nope",
        ),
        (
            r#"{"action":"RunInstances","project_id":"p-1"}"#,
            400,
            4100,
            "region",
        ),
        (
            r#"{"action":"RunInstances","region":"icn","os_id":1}"#,
            400,
            4100,
            "plan",
        ),
        (r#"{"action": 5}"#, 400, 4100, "no action"),
        ("{}", 400, 4100, "no action"),
        (r#"{"action":"DescribeInstances""#, 400, 4100, "invalid JSON"),
        ("[1, 2]", 400, 4100, "JSON object"),
        ("x.json", 400, 4100, "JSON object"),
        ("", 400, 4100, "JSON object"),
    ] {
        let r = curl(&url, &["-d", body]);
        assert_eq!(
            (r.status, r.json["ret_code"].as_i64()),
            (status, Some(code)),
            "{body}: {r:?}"
        );
        let message = r.json["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(needle),
            "{body}: message {message:?} names {needle}"
        );
        assert_eq!(
            r.header("x-request-id"),
            r.json["request_id"].as_str(),
            "{body}: {r:?}"
        );
        assert!(
            r.json.get("instance_set").is_none(),
            "{body}: no data on an error: {r:?}"
        );
    }
    // GET (and anything but POST) answers 405 with the same JSON shape.
    for method in ["GET", "PUT", "DELETE"] {
        let r = curl(&url, &["-X", method]);
        assert_eq!(r.status, 405, "{method}: {r:?}");
        assert_eq!(r.json["ret_code"], 4100, "{method}: {r:?}");
        assert!(
            r.json["message"].as_str().unwrap_or_default().contains("POST"),
            "{r:?}"
        );
        assert_eq!(r.header("x-request-id"), r.json["request_id"].as_str(), "{r:?}");
    }
    // Concurrent requests, each answered with its own id.
    let ids: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let r = curl(
                        &url,
                        &["-d", r#"{"action":"DescribeInstances","project_id":"p-1"}"#],
                    );
                    assert_eq!(r.json["ret_code"], 0, "{r:?}");
                    r.json["request_id"].as_str().unwrap().to_string()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "{ids:?}");
    // The same API over BSON TCP from `stage send` (a client that is not the broker's codec).
    let bson_port = std::fs::read_to_string(home.path().join("bson_port")).unwrap();
    let send = |body: &str| -> serde_json::Value {
        let out = std::process::Command::new(harness::stage_bin())
            .args(["send", &format!("127.0.0.1:{}", bson_port.trim()), body])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "stage send: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    };
    let r = send(r#"{"action":"DescribeInstances","project_id":"p-1"}"#);
    assert_eq!(r["ret_code"], 0, "{r}");
    assert_eq!(r["instance_set"].as_array().map(Vec::len), Some(1), "{r}");
    let r = send(r#"{"action":"LaunchRockets"}"#);
    assert_eq!(r["ret_code"], 4104, "{r}");
    let r = send(r#"{"action":"RunInstances","project_id":"p-1"}"#);
    assert_eq!(r["ret_code"], 4100, "{r}");
    let _ = child.kill();
    let _ = child.wait();
}

/// A local HTTP server recording webhook posts: `/hook` answers 200, `/fail` 500, and
/// `/slow/...` reads the request and never answers (until the test ends).
struct HookServer {
    port: u16,
    posts: std::sync::Arc<Mutex<Vec<(String, String, String)>>>,
}

impl HookServer {
    fn start() -> HookServer {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let posts = std::sync::Arc::new(Mutex::new(Vec::new()));
        let recorded = posts.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(64) {
                let Ok(mut stream) = stream else { continue };
                let recorded = recorded.clone();
                std::thread::spawn(move || {
                    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let mut r = BufReader::new(stream.try_clone().unwrap());
                    let mut head = String::new();
                    let (mut len, mut ctype) = (0usize, String::new());
                    r.read_line(&mut head).unwrap();
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap() == 0 || line.trim().is_empty() {
                            break;
                        }
                        let (k, v) = line.split_once(':').unwrap_or((&line, ""));
                        match k.to_ascii_lowercase().as_str() {
                            "content-length" => len = v.trim().parse().unwrap(),
                            "content-type" => ctype = v.trim().to_string(),
                            _ => {}
                        }
                    }
                    let mut body = vec![0; len.min(1 << 20)];
                    r.read_exact(&mut body).unwrap();
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    recorded.lock().unwrap().push((
                        path.clone(),
                        ctype,
                        String::from_utf8_lossy(&body).into_owned(),
                    ));
                    if path.starts_with("/slow") {
                        std::thread::sleep(Duration::from_secs(8));
                        return;
                    }
                    let status = if path == "/fail" {
                        "500 Internal Server Error"
                    } else {
                        "200 OK"
                    };
                    let _ = write!(
                        stream,
                        "HTTP/1.1 {status}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                    );
                });
            }
        });
        HookServer { port, posts }
    }
}

/// The worker's webhook: a failed job is posted as `{"text": ..., "job": {...}}`; a webhook
/// that never answers holds neither the worker nor the node, and is logged (host only: the
/// path of a Slack webhook is its secret); a 500 is logged, not retried.
#[test]
fn worker_webhook_posts_failed_jobs_without_blocking() {
    let hooks = HookServer::start();
    let port = hooks.port;
    let log = harness::run_scenario_output("densefog/webhook.lua", |home| {
        let file = home.path().join("data/test.db");
        std::fs::create_dir_all(home.path().join("data")).unwrap();
        home.write("conf/stage.json", &config(Db::Sqlite, &file, 1));
        home.write("preload/10-db.lua", Db::Sqlite.preload());
        home.write(
            "preload/20-hook.lua",
            &format!("HOOK = 'http://127.0.0.1:{port}'"),
        );
    });
    let posts = hooks.posts.lock().unwrap().clone();
    let paths: Vec<&str> = posts.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(paths, ["/hook", "/slow/T0KEN-not-for-logs", "/fail"], "{log}");
    // The body: Slack's `text`, and the job.
    let burn = log
        .lines()
        .find_map(|l| l.split("BURN_ID=").nth(1))
        .expect("BURN_ID in the log")
        .trim()
        .to_string();
    let (_, ctype, body) = &posts[0];
    assert_eq!(ctype, "application/json");
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let text = v["text"].as_str().unwrap_or_else(|| panic!("no text: {body}"));
    assert!(
        text.starts_with(&format!("densefog: job {burn} Burn failed on ")) && text.contains("disk on fire"),
        "{text}"
    );
    assert_eq!(v["job"]["id"], serde_json::json!(burn), "{body}");
    assert_eq!(v["job"]["action"], "Burn", "{body}");
    assert_eq!(v["job"]["trys"], 1, "{body}");
    assert_eq!(v["job"]["try_max"], 1, "{body}");
    assert!(
        v["job"]["error"].as_str().unwrap().contains("disk on fire"),
        "{body}"
    );
    // The slow webhook did not hold the worker: five jobs ran while it hung (4 s timeout).
    let after: f64 = log
        .lines()
        .find_map(|l| l.split("QUICK_AFTER_FAIL=").nth(1))
        .expect("QUICK_AFTER_FAIL in the log")
        .trim()
        .parse()
        .unwrap();
    assert!(after < 4.0, "the quick jobs waited for the webhook: {after} s");
    assert_eq!(
        log.matches("densefog webhook to 127.0.0.1: no answer within 4 s; the notification is not retried")
            .count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.matches("densefog webhook to 127.0.0.1: answered 500 Internal Server Error; the notification is not retried").count(),
        1,
        "{log}"
    );
    assert!(!log.contains("T0KEN"), "the webhook's path is logged:\n{log}");
}
