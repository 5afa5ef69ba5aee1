//! `stage-bench echo`: the broker's echo benchmark. In one run it starts a raw tokio echo
//! server (same framing, same thread-per-core SO_REUSEPORT shape, no decoding, no Lua) and
//! a `stage` home whose handler is `return function(socket, data) return data end`, drives
//! both with the same loopback load (64 connections x 16 frames in flight, and 64 x 1; small
//! and 1 KiB documents), and prints msgs/s, p50/p99 latency, server CPU per message (from
//! `/proc/<pid>/stat`) and the ratio stage / raw. Every load loop is bounded in time and count.
//!
//! `stage-bench raw-server PORT THREADS` runs only the baseline server (used by `echo`).
//!
//! `stage-bench http`: a Lua handler answering `{"hello":"world"}` vs a plain hyper server
//! with the same response and the same thread-per-core shape, 64 keep-alive connections
//! with one request in flight each; requests/s, latency and server CPU per request. Then
//! the BSON echo over `ws://` vs the same echo over `tcp://` (stage both, same documents,
//! 64 connections x 16 and x 1 in flight): msgs/s, CPU per message and their ratios.

use stage::net::framing::{next_frame, Framing};
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SERVER_THREADS: usize = 2;
const CONNS: usize = 64;
const WARMUP: Duration = Duration::from_millis(500);
const MEASURE: Duration = Duration::from_secs(3);
/// Upper bound of frames per case, whatever the speed.
const MAX_FRAMES: u64 = 20_000_000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("raw-server") => {
            let port: u16 = args.get(1).and_then(|p| p.parse().ok()).expect("port");
            let threads: usize = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(SERVER_THREADS);
            raw_server(port, threads);
        }
        Some("load") => {
            // stage-bench load PORT PID small|1k DEPTH: one case against a running server.
            let port: u16 = args.get(1).and_then(|p| p.parse().ok()).expect("port");
            let pid: u32 = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(0);
            let doc = if args.get(3).map(String::as_str) == Some("1k") {
                kib_doc()
            } else {
                small_doc()
            };
            let depth = args.get(4).and_then(|p| p.parse().ok()).unwrap_or(16);
            let r = run_case(pid, ([127, 0, 0, 1], port).into(), &doc, depth);
            println!(
                "{:.0} msgs/s p50 {} us p99 {} us cpu {:.2} us/msg errors {}",
                r.rate, r.p50, r.p99, r.cpu_us, r.errors
            );
        }
        Some("hyper-server") => {
            let port: u16 = args.get(1).and_then(|p| p.parse().ok()).expect("port");
            let threads: usize = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(SERVER_THREADS);
            hyper_server(port, threads);
        }
        Some("http") => http(),
        Some("echo") | None => echo(),
        Some("hook") => hook(),
        Some("loop") => lua_loop(args.get(1).map(String::as_str) != Some("off")),
        Some(other) => {
            eprintln!("usage: stage-bench [echo | http | raw-server PORT THREADS | hyper-server PORT THREADS] (got '{other}')");
            std::process::exit(2);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The time budget's hook, in-process: the same Lua work with and without it, measured in
// this thread's CPU time (robust to other load on the machine), rounds interleaved.

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct passed to it.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn hook() {
    // A handler-like workload: table reads and writes, string keys, a call per item.
    const WORK: &str = r#"
        local function handle(d) local r = {} for k, v in pairs(d) do r[k] = v end r.n = (d.n or 0) + 1 return r end
        local d = {cmd = "login", user = "kim", n = 1}
        for i = 1, 200000 do d = handle(d) end
        return d.n
    "#;
    let run = |hooked: bool| -> Duration {
        std::thread::spawn(move || {
            let lua = mlua::Lua::new();
            if hooked {
                stage::host::budget::install(&lua, 0, Duration::from_secs(3600)).unwrap();
            }
            let f = lua.load(WORK).into_function().unwrap();
            let t0 = thread_cpu();
            stage::host::budget::timed_sync(&lua, || f.call::<i64>(()).unwrap());
            thread_cpu() - t0
        })
        .join()
        .unwrap()
    };
    let (mut with, mut without) = (vec![], vec![]);
    for _ in 0..9 {
        without.push(run(false));
        with.push(run(true));
    }
    with.sort();
    without.sort();
    let (w, wo) = (with[4], without[4]);
    println!("time budget (watchdog; no hook unless a slice overruns), Lua workload, median of 9 interleaved rounds (thread CPU):");
    println!("  without hook {:>8.2} ms", wo.as_secs_f64() * 1e3);
    println!(
        "  with hook    {:>8.2} ms   overhead {:+.1}%",
        w.as_secs_f64() * 1e3,
        (w.as_secs_f64() / wo.as_secs_f64() - 1.0) * 100.0
    );
    // The workload runs about 50 VM instructions per iteration.
    let per_instr = (w.as_secs_f64() - wo.as_secs_f64()) / (200_000.0 * 50.0) * 1e9;
    println!("  about {per_instr:.1} ns per VM instruction");
}

/// `stage-bench loop [on|off]`: one callback summing 1..1e7 in pure Lua, run the way the
/// host runs callbacks (a coroutine polled under `budget::timed`), with the time budget on
/// (1 s) or off. Meant for `valgrind --tool=callgrind`, whose instruction counts do not
/// depend on the load of the machine; also prints the thread CPU time.
fn lua_loop(budget: bool) {
    std::thread::spawn(move || {
        let lua = mlua::Lua::new();
        let limit = if budget { 3_600_000 } else { 0 };
        stage::host::budget::install(&lua, 0, Duration::from_millis(limit)).unwrap();
        let f = lua
            .load("local s = 0 for i = 1, 1e7 do s = s + i end return s")
            .into_function()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let t0 = thread_cpu();
        let s = rt
            .block_on(stage::host::budget::timed(f.call_async::<i64>(())))
            .unwrap();
        let t = thread_cpu() - t0;
        println!(
            "pure-Lua loop (sum 1..1e7), time budget {}: {:.1} ms thread CPU (sum {s})",
            if budget { "on (1 h)" } else { "off" },
            t.as_secs_f64() * 1e3
        );
    })
    .join()
    .unwrap();
}

// ---------------------------------------------------------------------------------------
// Documents, encoded by hand so the load generator does no work the servers would not.

fn cstring(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

struct Doc(Vec<u8>);

impl Doc {
    fn new() -> Doc {
        Doc(vec![0; 4])
    }
    fn str(mut self, k: &str, v: &str) -> Doc {
        self.0.push(0x02);
        cstring(&mut self.0, k);
        self.0.extend_from_slice(&((v.len() + 1) as i32).to_le_bytes());
        cstring(&mut self.0, v);
        self
    }
    fn int(mut self, k: &str, v: i32) -> Doc {
        self.0.push(0x10);
        cstring(&mut self.0, k);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn dbl(mut self, k: &str, v: f64) -> Doc {
        self.0.push(0x01);
        cstring(&mut self.0, k);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn sub(mut self, k: &str, ty: u8, d: Doc) -> Doc {
        self.0.push(ty);
        cstring(&mut self.0, k);
        self.0.extend_from_slice(&d.end());
        self
    }
    fn end(mut self) -> Vec<u8> {
        self.0.push(0);
        let n = self.0.len() as i32;
        self.0[..4].copy_from_slice(&n.to_le_bytes());
        self.0
    }
}

fn small_doc() -> Vec<u8> {
    Doc::new()
        .str("cmd", "move")
        .int("seq", 12345)
        .str("name", "player-0042")
        .sub("pos", 0x03, Doc::new().dbl("x", 10.5).dbl("y", -3.25))
        .end()
}

/// 1 KiB: the small document plus an inventory array of small documents, padded to 1024.
fn kib_doc() -> Vec<u8> {
    let build = |pad: usize| {
        let mut items = Doc::new();
        for i in 0..26 {
            items = items.sub(
                &i.to_string(),
                0x03,
                Doc::new().int("id", 1000 + i).str("kind", "potion"),
            );
        }
        Doc::new()
            .str("cmd", "inventory")
            .int("seq", 12345)
            .str("name", "player-0042")
            .sub("pos", 0x03, Doc::new().dbl("x", 10.5).dbl("y", -3.25))
            .sub("items", 0x04, items)
            .str("note", &"n".repeat(pad))
            .end()
    };
    let pad = 1024usize.saturating_sub(build(0).len());
    build(pad)
}

// ---------------------------------------------------------------------------------------
// The baseline server

fn raw_server(port: u16, threads: usize) {
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
                    let l = stage::net::sock::tcp_listener(addr, true).unwrap();
                    let l = TcpListener::from_std(l).unwrap();
                    loop {
                        let (s, _) = l.accept().await.unwrap();
                        let _ = s.set_nodelay(true);
                        tokio::task::spawn_local(raw_conn(s));
                    }
                });
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
}

/// Reads, cuts frames, copies each frame to the output (no decoding), writes.
async fn raw_conn(mut s: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut filled = 0;
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        let n = match s.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        filled += n;
        let mut pos = 0;
        while let Ok(Some(f)) = next_frame(Framing::Bson, &buf[pos..filled], 64 * 1024) {
            out.extend_from_slice(&buf[pos + f.start..pos + f.end]);
            pos += f.consumed;
        }
        buf.copy_within(pos..filled, 0);
        filled -= pos;
        if s.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
    }
}

// ---------------------------------------------------------------------------------------
// The load generator

#[derive(Default)]
struct Stats {
    frames: u64,
    errors: u64,
    /// Latencies in microseconds of frames sent after the warm-up.
    lat: Vec<u32>,
}

async fn load_conn(addr: SocketAddr, doc: Rc<Vec<u8>>, depth: usize, start: Instant, stop: Instant) -> Stats {
    let mut st = Stats::default();
    let mut s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(_) => {
            st.errors += 1;
            return st;
        }
    };
    let _ = s.set_nodelay(true);
    let mut sent: std::collections::VecDeque<Instant> = Default::default();
    let mut burst = Vec::with_capacity(doc.len() * depth);
    for _ in 0..depth {
        burst.extend_from_slice(&doc);
        sent.push_back(Instant::now());
    }
    if s.write_all(&burst).await.is_err() {
        st.errors += 1;
        return st;
    }
    let mut buf = vec![0u8; 256 * 1024];
    let mut filled = 0;
    let warm = start + WARMUP;
    let mut budget = MAX_FRAMES / CONNS as u64;
    'outer: loop {
        let n = match tokio::time::timeout_at(stop.into(), s.read(&mut buf[filled..])).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                st.errors += 1;
                break;
            }
            Ok(Ok(n)) => n,
            Err(_) => break, // time is up
        };
        filled += n;
        let mut pos = 0;
        let mut again = 0;
        loop {
            match next_frame(Framing::Bson, &buf[pos..filled], 256 * 1024) {
                Ok(Some(f)) => {
                    if f.end - f.start != doc.len() {
                        st.errors += 1;
                    }
                    pos += f.consumed;
                    let t0 = sent.pop_front().unwrap_or(start);
                    let now = Instant::now();
                    if t0 >= warm {
                        st.frames += 1;
                        st.lat.push((now - t0).as_micros().min(u32::MAX as u128) as u32);
                    }
                    if now < stop && budget > 0 {
                        budget -= 1;
                        again += 1;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    st.errors += 1;
                    break 'outer;
                }
            }
        }
        buf.copy_within(pos..filled, 0);
        filled -= pos;
        if again > 0 {
            burst.clear();
            let now = Instant::now();
            for _ in 0..again {
                burst.extend_from_slice(&doc);
                sent.push_back(now);
            }
            if s.write_all(&burst).await.is_err() {
                st.errors += 1;
                break;
            }
        } else if sent.is_empty() {
            break;
        }
    }
    st
}

struct Result1 {
    rate: f64,
    p50: u32,
    p99: u32,
    cpu_us: f64,
    errors: u64,
    /// CPU use of each busy server thread during the measurement, e.g. "61% 100%": shows
    /// how evenly SO_REUSEPORT spread the connections.
    threads: String,
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the file, i.e. 12 and 13 after the name.
    f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
}

/// CPU ticks of each thread of `pid`, by thread id.
fn thread_ticks(pid: u32) -> Vec<(String, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    let mut out: Vec<(String, u64)> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let tid: u32 = e.file_name().to_str()?.parse().ok()?;
            let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            let t = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some((tid.to_string(), t))
        })
        .collect();
    out.sort();
    out
}

fn run_case(pid: u32, addr: SocketAddr, doc: &[u8], depth: usize) -> Result1 {
    let doc = Rc::new(doc.to_vec());
    measure(pid, move |start, stop| {
        Box::pin(load_conn(addr, doc.clone(), depth, start, stop))
    })
}

type ConnFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Stats>>>;

/// Runs `CONNS` connections made by `conn(start, stop)` and measures the server `pid`.
fn measure(pid: u32, conn: impl Fn(Instant, Instant) -> ConnFuture) -> Result1 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    local.block_on(&rt, async move {
        let start = Instant::now();
        let stop = start + WARMUP + MEASURE;
        let tasks: Vec<_> = (0..CONNS)
            .map(|_| tokio::task::spawn_local(conn(start, stop)))
            .collect();
        tokio::time::sleep_until((start + WARMUP).into()).await;
        let c0 = cpu_ticks(pid);
        let th0 = thread_ticks(pid);
        let t0 = Instant::now();
        let mut all = Stats::default();
        let mut c1 = None;
        for t in tasks {
            let st = t.await.unwrap();
            c1.get_or_insert_with(|| (cpu_ticks(pid), Instant::now(), thread_ticks(pid)));
            all.frames += st.frames;
            all.errors += st.errors;
            all.lat.extend(st.lat);
        }
        let (c1, t1, th1) = c1.unwrap();
        let secs = (t1 - t0).as_secs_f64().max(1e-3);
        all.lat.sort_unstable();
        let pct = |p: f64| {
            all.lat
                .get(((all.lat.len() as f64 * p) as usize).min(all.lat.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        Result1 {
            rate: all.frames as f64 / secs,
            p50: pct(0.50),
            p99: pct(0.99),
            cpu_us: (c1 - c0) as f64 / tick * 1e6 / (all.frames.max(1) as f64),
            errors: all.errors,
            threads: th1
                .iter()
                .filter_map(|(tid, t)| {
                    let before = th0.iter().find(|(t0, _)| t0 == tid).map(|x| x.1).unwrap_or(0);
                    let pct = (t - before) as f64 / tick / secs * 100.0;
                    (pct >= 5.0).then(|| format!("{pct:.0}%"))
                })
                .collect::<Vec<_>>()
                .join(" "),
        }
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(addr: SocketAddr, child: &mut Child) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("server exited early: {st}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("server did not listen on {addr} within 10 s");
}

struct Server {
    child: Child,
    _home: Option<tempfile_like::Dir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny temporary directory (the bench avoids dev-dependencies).
mod tempfile_like {
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn start_raw(port: u16) -> Server {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["raw-server", &port.to_string(), &SERVER_THREADS.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .expect("start raw server");
    wait_port(([127, 0, 0, 1], port).into(), &mut child);
    Server { child, _home: None }
}

fn start_stage(port: u16) -> Server {
    start_stage_with(port, "")
}

/// `extra` is added to the top level of conf/stage.json (`"#limits": {...}`).
fn start_stage_with(port: u16, extra: &str) -> Server {
    start_stage_lua(
        port,
        extra,
        &format!(
            "local p = broker.ready('tcp://127.0.0.1:{port}?bson=64k,1m', function(socket, addr)\n\
             \x20   return function(socket, data) return data end\nend)\n\
             assert(type(p) == 'table', 'listen failed')\n"
        ),
    )
}

/// A stage home on `port` running `script` on each of its instances.
fn start_stage_lua(port: u16, extra: &str, script: &str) -> Server {
    let exe = std::env::current_exe().unwrap().with_file_name("stage");
    let dir = std::env::temp_dir().join(format!("stage-bench-{}-{port}", std::process::id()));
    for d in ["conf", "package", "logs"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let startup: Vec<&str> = (0..SERVER_THREADS).map(|_| r#"["lua+stage"]"#).collect();
    std::fs::write(
        dir.join("conf/stage.json"),
        format!(
            r##"{{"#services": {{"tcp": ["127.0.0.1:{port}"]}}, "#startup": [{}]{extra}}}"##,
            startup.join(", ")
        ),
    )
    .unwrap();
    std::fs::write(dir.join("package/start.lua"), script).unwrap();
    let mut child = Command::new(exe)
        .arg("run")
        .arg(&dir)
        .env("STAGE_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start stage (build it with cargo build --release)");
    wait_port(([127, 0, 0, 1], port).into(), &mut child);
    // Every instance must be listening before the load starts, or the kernel sends all
    // connections to the first one.
    std::thread::sleep(Duration::from_millis(500));
    Server {
        child,
        _home: Some(tempfile_like::Dir(dir)),
    }
}

fn echo() {
    let small = small_doc();
    let kib = kib_doc();
    println!(
        "echo benchmark: {CONNS} connections, {SERVER_THREADS} server threads, loopback, {} s per case after {} ms warm-up",
        MEASURE.as_secs(),
        WARMUP.as_millis()
    );
    println!("documents: small {} bytes, 1k {} bytes", small.len(), kib.len());
    println!(
        "{:<14} {:<6} {:>11} {:>8} {:>8} {:>9} {:>7}  busy server threads",
        "case", "server", "msgs/s", "p50 us", "p99 us", "cpu us/m", "errors"
    );
    let mut failed = false;
    for (name, doc) in [("small", &small), ("1k", &kib)] {
        for depth in [16usize, 1] {
            let case = format!("{CONNS}x{depth} {name}");
            let raw = {
                let port = free_port();
                let srv = start_raw(port);
                run_case(srv.child.id(), ([127, 0, 0, 1], port).into(), doc, depth)
            };
            let stg = {
                let port = free_port();
                let srv = start_stage(port);
                run_case(srv.child.id(), ([127, 0, 0, 1], port).into(), doc, depth)
            };
            // The same server without the time budget (#limits.time 0): the budget's cost.
            let t0 = {
                let port = free_port();
                let srv = start_stage_with(port, r##", "#limits": {"time": 0}"##);
                run_case(srv.child.id(), ([127, 0, 0, 1], port).into(), doc, depth)
            };
            for (who, r) in [("raw", &raw), ("stage", &stg), ("time0", &t0)] {
                println!(
                    "{case:<14} {who:<6} {:>11.0} {:>8} {:>8} {:>9.2} {:>7}  {}",
                    r.rate, r.p50, r.p99, r.cpu_us, r.errors, r.threads
                );
            }
            println!(
                "{case:<14} ratio stage/raw msgs/s = {:.2}; time budget (on vs time 0): cpu us/msg {:+.1}%",
                stg.rate / raw.rate.max(1.0),
                (stg.cpu_us / t0.cpu_us.max(1e-9) - 1.0) * 100.0
            );
            failed |= raw.errors + stg.errors > 0;
            let _ = std::io::stdout().flush();
        }
    }
    if failed {
        eprintln!("stage-bench: errors occurred");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------
// HTTP: a plain hyper baseline and a keep-alive load generator.

const HELLO: &str = r#"{"hello":"world"}"#;

fn hyper_server(port: u16, threads: usize) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
                    let l =
                        TcpListener::from_std(stage::net::sock::tcp_listener(addr, true).unwrap()).unwrap();
                    loop {
                        let (s, _) = l.accept().await.unwrap();
                        let _ = s.set_nodelay(true);
                        tokio::task::spawn_local(async move {
                            let svc = hyper::service::service_fn(|_req| async {
                                let mut r =
                                    hyper::Response::new(Full::new(Bytes::from_static(HELLO.as_bytes())));
                                r.headers_mut()
                                    .insert("content-type", "application/json".parse().unwrap());
                                Ok::<_, std::convert::Infallible>(r)
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                                .await;
                        });
                    }
                });
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
}

/// One keep-alive connection sending `GET /` and reading each response (its head and its
/// `content-length` body) before the next.
async fn http_conn(addr: SocketAddr, start: Instant, stop: Instant) -> Stats {
    let mut st = Stats::default();
    let Ok(mut s) = TcpStream::connect(addr).await else {
        st.errors += 1;
        return st;
    };
    let _ = s.set_nodelay(true);
    let req = b"GET /hello HTTP/1.1\r\nhost: bench\r\n\r\n";
    let mut buf = vec![0u8; 64 * 1024];
    let warm = start + WARMUP;
    let mut budget = MAX_FRAMES / CONNS as u64;
    while Instant::now() < stop && budget > 0 {
        budget -= 1;
        let t0 = Instant::now();
        if s.write_all(req).await.is_err() {
            st.errors += 1;
            break;
        }
        let mut filled = 0;
        let ok = loop {
            let n = match tokio::time::timeout_at(
                (stop + Duration::from_secs(2)).into(),
                s.read(&mut buf[filled..]),
            )
            .await
            {
                Ok(Ok(n)) if n > 0 => n,
                _ => break false,
            };
            filled += n;
            let Some(end) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if filled >= end + 4 + len {
                break head.starts_with("http/1.1 200") && &buf[end + 4..end + 4 + len] == HELLO.as_bytes();
            }
        };
        if !ok {
            st.errors += 1;
            break;
        }
        if t0 >= warm {
            st.frames += 1;
            st.lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
        }
    }
    st
}

fn start_hyper(port: u16) -> Server {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["hyper-server", &port.to_string(), &SERVER_THREADS.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .expect("start hyper server");
    wait_port(([127, 0, 0, 1], port).into(), &mut child);
    Server { child, _home: None }
}

fn start_stage_http(port: u16) -> Server {
    let exe = std::env::current_exe().unwrap().with_file_name("stage");
    let dir = std::env::temp_dir().join(format!("stage-bench-http-{}-{port}", std::process::id()));
    for d in ["conf", "package", "logs"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let startup: Vec<&str> = (0..SERVER_THREADS).map(|_| r#"["lua+stage"]"#).collect();
    std::fs::write(
        dir.join("conf/stage.json"),
        format!(
            r##"{{"#services": {{"tcp": ["127.0.0.1:{port}"]}}, "#startup": [{}]}}"##,
            startup.join(", ")
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("package/start.lua"),
        format!(
            "local p = broker.ready('http://127.0.0.1:{port}', function(req)\n\
             \x20   return {{ body = {{ hello = 'world' }} }}\nend)\n\
             assert(type(p) == 'table', 'listen failed')\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(exe)
        .arg("run")
        .arg(&dir)
        .env("STAGE_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start stage (build it with cargo build --release)");
    wait_port(([127, 0, 0, 1], port).into(), &mut child);
    std::thread::sleep(Duration::from_millis(500));
    Server {
        child,
        _home: Some(tempfile_like::Dir(dir)),
    }
}

fn http() {
    println!(
        "http benchmark: {CONNS} keep-alive connections x 1 request in flight, {SERVER_THREADS} server threads, loopback, {} s after {} ms warm-up",
        MEASURE.as_secs(),
        WARMUP.as_millis()
    );
    println!(
        "{:<8} {:>11} {:>8} {:>8} {:>9} {:>7}  busy server threads",
        "server", "req/s", "p50 us", "p99 us", "cpu us/r", "errors"
    );
    let run = |srv: Server, port: u16| {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let r = measure(srv.child.id(), move |start, stop| {
            Box::pin(http_conn(addr, start, stop))
        });
        drop(srv);
        r
    };
    let port = free_port();
    let hyper = run(start_hyper(port), port);
    let port = free_port();
    let stage = run(start_stage_http(port), port);
    for (who, r) in [("hyper", &hyper), ("stage", &stage)] {
        println!(
            "{who:<8} {:>11.0} {:>8} {:>8} {:>9.2} {:>7}  {}",
            r.rate, r.p50, r.p99, r.cpu_us, r.errors, r.threads
        );
    }
    println!(
        "ratio stage/hyper req/s = {:.2} (target >= 0.5)",
        stage.rate / hyper.rate.max(1.0)
    );
    let ws_failed = ws_vs_tcp();
    if hyper.errors + stage.errors > 0 || ws_failed {
        eprintln!("stage-bench: errors occurred");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------
// WebSocket: the BSON echo over ws:// vs the same echo over tcp://, same documents.

/// One WebSocket connection keeping `depth` BSON messages in flight (as `load_conn`).
async fn ws_conn(addr: SocketAddr, doc: Rc<Vec<u8>>, depth: usize, start: Instant, stop: Instant) -> Stats {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut st = Stats::default();
    let Ok(tcp) = TcpStream::connect(addr).await else {
        st.errors += 1;
        return st;
    };
    let _ = tcp.set_nodelay(true);
    let Ok((ws, _)) = tokio_tungstenite::client_async(format!("ws://{addr}/echo"), tcp).await else {
        st.errors += 1;
        return st;
    };
    let (mut tx, mut rx) = ws.split();
    let msg = Message::Binary(bytes::Bytes::from(doc.to_vec()));
    let mut sent: std::collections::VecDeque<Instant> = Default::default();
    for _ in 0..depth {
        sent.push_back(Instant::now());
        if tx.feed(msg.clone()).await.is_err() {
            st.errors += 1;
            return st;
        }
    }
    if tx.flush().await.is_err() {
        st.errors += 1;
        return st;
    }
    let warm = start + WARMUP;
    let mut budget = MAX_FRAMES / CONNS as u64;
    'outer: loop {
        let first = match tokio::time::timeout_at(stop.into(), rx.next()).await {
            Ok(m) => m,
            Err(_) => break, // time is up
        };
        // This message and those already arrived: answered with one write, as `load_conn`
        // answers what one read brought.
        let mut next = Some(first);
        let mut again = 0;
        while let Some(m) = next.take() {
            let b = match m {
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(_)) => continue,
                _ => {
                    st.errors += 1;
                    break 'outer;
                }
            };
            if b.len() != doc.len() {
                st.errors += 1;
            }
            let t0 = sent.pop_front().unwrap_or(start);
            let now = Instant::now();
            if t0 >= warm {
                st.frames += 1;
                st.lat.push((now - t0).as_micros().min(u32::MAX as u128) as u32);
            }
            if now < stop && budget > 0 {
                budget -= 1;
                again += 1;
            }
            next = futures_util::FutureExt::now_or_never(rx.next());
        }
        if again == 0 {
            if sent.is_empty() {
                break;
            }
            continue;
        }
        let now = Instant::now();
        for _ in 0..again {
            sent.push_back(now);
            if tx.feed(msg.clone()).await.is_err() {
                st.errors += 1;
                break 'outer;
            }
        }
        if tx.flush().await.is_err() {
            st.errors += 1;
            break;
        }
    }
    st
}

/// Prints the WebSocket rows; true when errors occurred.
fn ws_vs_tcp() -> bool {
    let small = small_doc();
    println!();
    println!(
        "websocket echo vs tcp echo: stage both, BSON document of {} bytes, {CONNS} connections",
        small.len()
    );
    println!(
        "{:<14} {:<6} {:>11} {:>8} {:>8} {:>9} {:>7}  busy server threads",
        "case", "proto", "msgs/s", "p50 us", "p99 us", "cpu us/m", "errors"
    );
    let mut failed = false;
    for depth in [16usize, 1] {
        let case = format!("{CONNS}x{depth} small");
        let tcp = {
            let port = free_port();
            let srv = start_stage(port);
            run_case(srv.child.id(), ([127, 0, 0, 1], port).into(), &small, depth)
        };
        let ws = {
            let port = free_port();
            let srv = start_stage_lua(
                port,
                "",
                &format!(
                    "local p = broker.ready('ws://127.0.0.1:{port}/echo?bson=64k,1m', function(socket, addr)\n\
                     \x20   return function(socket, data) return data end\nend)\n\
                     assert(type(p) == 'table', 'listen failed')\n"
                ),
            );
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let doc = Rc::new(small.clone());
            measure(srv.child.id(), move |start, stop| {
                Box::pin(ws_conn(addr, doc.clone(), depth, start, stop))
            })
        };
        for (who, r) in [("tcp", &tcp), ("ws", &ws)] {
            println!(
                "{case:<14} {who:<6} {:>11.0} {:>8} {:>8} {:>9.2} {:>7}  {}",
                r.rate, r.p50, r.p99, r.cpu_us, r.errors, r.threads
            );
        }
        println!(
            "{case:<14} ratio ws/tcp msgs/s = {:.2} (target >= 0.5), cpu us/msg ws/tcp = {:.2}",
            ws.rate / tcp.rate.max(1.0),
            ws.cpu_us / tcp.cpu_us.max(1e-9)
        );
        failed |= tcp.errors + ws.errors > 0;
        let _ = std::io::stdout().flush();
    }
    failed
}
