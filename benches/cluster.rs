//! `scripts/bench cluster`: two `stage run` nodes on loopback, 64 `stage.request`s in flight:
//! remote round trips (A's client → B's `db`) beside local ones (A's client → A's own `ldb`)
//! in the same run, with p50/p99 latency and CPU µs per round trip (both processes); the same
//! with 8 in flight (below saturation: the latency of a round trip itself); then
//! failure detection over real UDP sockets: a node goes silent (as after `kill -9`) 10 times
//! and the time until the other node withdraws its stage ids is measured (p50/p99).
//!
//! Every loop is bounded by a count and by time; all traffic stays on 127.0.0.1.

use stage::cluster::engine::{Sink, StageLoad};
use stage::cluster::udp::Node;
use stage::cluster::ClusterConfig;
use stage::router::{LockOp, Message, SenderInfo};
use stage::value::Value;
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KEY: &str = "bench cluster key";
const SECONDS: f64 = 3.0;
/// Requests in flight: the issue's figure, then a lighter load.
const IN_FLIGHT: [usize; 2] = [64, 8];
const KILLS: usize = 10;

const CLIENT: &str = r#"
local target, seconds, inflight, out, bpid = process["%TARGET"], tonumber(process["%SECONDS"]),
    tonumber(process["%INFLIGHT"]), process["%OUT"], process["%BPID"]
local function cpu(pid)
    local f = io.open("/proc/" .. pid .. "/stat"); if not f then return 0 end
    local s = f:read("a"); f:close()
    local rest = s:match("%) (.*)")
    local fields = {}
    for w in rest:gmatch("%S+") do fields[#fields + 1] = w end
    return (tonumber(fields[12]) + tonumber(fields[13])) / 100   -- utime + stime, seconds
end
-- Wait until the target answers (the cluster has converged).
local t = process.tick
while not stage.request(target, 200, 0) do
    if process.tick - t > 20 then logger.error("no answer from " .. target); process.exit(1) end
    stage.sleep(50)
end
for _ = 1, 1000 do stage.request(target, 1000, 0) end   -- warm up
-- Latencies as a histogram of whole microseconds: a table that stops growing, so the client's
-- heap stays as small as a server's would (a list of every latency made the collector's major
-- cycles the tail).
local hist, n, fails, last = {}, 0, 0, 0
local c0 = cpu("self") + (bpid ~= "" and cpu(bpid) or 0)
local t0 = process.clock
local deadline = t0 + seconds
for _ = 1, inflight do
    stage.submit(0, function()
        while process.clock < deadline do
            local s = process.clock
            local v = stage.request(target, 2000, 1)
            last = process.clock
            if v then
                local us = (last - s) * 1e6 // 1
                hist[us] = (hist[us] or 0) + 1
                n = n + 1
            else
                fails = fails + 1
            end
        end
    end)
end
wait_until = function(f) while not f() do stage.sleep(5) end end
wait_until(function() return process.clock >= deadline end)
local el = last - t0
local c1 = cpu("self") + (bpid ~= "" and cpu(bpid) or 0)
local keys = {}
for us in pairs(hist) do keys[#keys + 1] = us end
table.sort(keys)
local function pct(p)
    local want, seen = math.max(1, math.floor(n * p)), 0
    for _, us in ipairs(keys) do
        seen = seen + hist[us]
        if seen >= want then return us end
    end
    return 0
end
local f = assert(io.open(out, "w"))
f:write(string.format("%f %f %f %f %d\n", n / el, pct(0.5), pct(0.99), (c1 - c0) * 1e6 / math.max(1, n), fails))
f:close()
process.exit(0)
"#;

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn home(conf: String) -> tempfile::TempDir {
    let h = tempfile::tempdir().unwrap();
    for d in ["conf", "package"] {
        std::fs::create_dir_all(h.path().join(d)).unwrap();
    }
    std::fs::write(h.path().join("conf/stage.json"), conf).unwrap();
    std::fs::write(
        h.path().join("package/db.lua"),
        "return { who = function(x) return x end }",
    )
    .unwrap();
    std::fs::write(h.path().join("package/client.lua"), CLIENT).unwrap();
    h
}

/// (round trips/s, p50 µs, p99 µs, CPU µs per round trip, failures)
fn run(target: &str, in_flight: usize) -> (f64, f64, f64, f64, u64) {
    let (pa, pb) = (free_port(), free_port());
    let b = home(format!(
        r##"{{"#cluster": [{pb}], "#cluster-key": "env:STAGE_CLUSTER_KEY", "#startup": [["lua+db"]], "#usage": 0, "#threads": [2, 4096], "lua": {{"lua+db": "db"}}}}"##
    ));
    let a = home(format!(
        r##"{{"#cluster": [{pa}, "127.0.0.1:{pb}"], "#cluster-key": "env:STAGE_CLUSTER_KEY", "#startup": [["lua+client"], ["lua+ldb"]], "#usage": 0, "#threads": [2, 4096], "lua": {{"lua+client": "client", "lua+ldb": "db"}}}}"##
    ));
    let spawn = |h: &tempfile::TempDir, env: &[(&str, String)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_stage"));
        c.arg("run")
            .arg(h.path())
            .env("STAGE_CLUSTER_KEY", KEY)
            .env("STAGE_LOG", "warn");
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut cb = spawn(&b, &[]);
    let out = a.path().join("result");
    let bpid = if target.starts_with("db") {
        cb.id().to_string()
    } else {
        String::new()
    };
    let mut ca = spawn(
        &a,
        &[
            ("TARGET", target.to_string()),
            ("SECONDS", SECONDS.to_string()),
            ("INFLIGHT", in_flight.to_string()),
            ("OUT", out.display().to_string()),
            ("BPID", bpid),
        ],
    );
    let t = Instant::now();
    while ca.try_wait().unwrap().is_none() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = ca.kill();
    let _ = cb.kill();
    let _ = (ca.wait(), cb.wait());
    let s = std::fs::read_to_string(&out).unwrap_or_default();
    let v: Vec<f64> = s.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    if v.len() < 5 {
        return (0.0, 0.0, 0.0, 0.0, 0);
    }
    (v[0], v[1], v[2], v[3], v[4] as u64)
}

struct Stages;

impl Sink for Stages {
    fn one(&self, _: &str, m: Message) -> Result<(), Message> {
        Err(m)
    }
    fn all(&self, _: &str, _: &Message) -> usize {
        0
    }
    fn to(&self, _: usize, _: Message) -> Result<(), Message> {
        Ok(())
    }
    fn lock(&self, _: LockOp, _: &str, _: &str, _: Arc<SenderInfo>, _: Vec<Value>) {}
    fn local(&self) -> Vec<StageLoad> {
        vec![StageLoad {
            stage: "db".into(),
            instances: 1,
            load: 0,
        }]
    }
}

fn cfg(port: u16, peers: Vec<u16>) -> ClusterConfig {
    ClusterConfig {
        port,
        peers: peers
            .iter()
            .map(|p| format!("127.0.0.1:{p}").parse().unwrap())
            .collect(),
        failover: vec![],
        advertise: [127, 0, 0, 1].into(),
        key: Some(KEY.as_bytes().to_vec()),
        accept: vec![],
        sync: Duration::from_millis(1500),
    }
}

/// Detection times (ms) of `KILLS` silent deaths with the default `#router [1500]`.
fn detection() -> Vec<f64> {
    let (px, py) = (free_port(), free_port());
    let x = Node::start(cfg(px, vec![py])).unwrap();
    x.engine.set_sink(Arc::new(Stages));
    let name = format!("127.0.0.1:{py}");
    let routed = |x: &Node| {
        x.engine
            .members()
            .iter()
            .any(|m| m.0 == name && m.1 != stage::cluster::State::Down && !m.2.is_empty())
    };
    let mut out = vec![];
    for _ in 0..KILLS {
        let y = Node::start(cfg(py, vec![px])).unwrap();
        y.engine.set_sink(Arc::new(Stages));
        let t = Instant::now();
        while !routed(&x) && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        y.halt();
        while routed(&x) && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(2));
        }
        out.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    out
}

fn main() {
    for n in IN_FLIGHT {
        println!("cluster: two nodes on loopback, {n} requests in flight, {SECONDS} s per phase");
        let local = run("ldb:who", n);
        let remote = run("db:who", n);
        for (name, r) in [("local  (same node) ", local), ("remote (other node)", remote)] {
            println!(
                "  {name}: {:>9.0} round trips/s   p50 {:>6.0} µs   p99 {:>6.0} µs   CPU {:>5.1} µs per round trip   {} failed",
                r.0, r.1, r.2, r.3, r.4
            );
        }
        if local.0 > 0.0 {
            println!("  remote / local: {:.2}", remote.0 / local.0);
        }
    }
    let mut d = detection();
    d.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| d[((d.len() as f64 * p).ceil() as usize).clamp(1, d.len()) - 1];
    println!(
        "detection after a silent death (#router [1500], {KILLS} kills): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        pct(0.5),
        pct(0.99),
        d[d.len() - 1]
    );
}
