//! `scripts/bench lb`: requests per second and p99 latency through an HAProxy run by the LB
//! controller (3 backends) against the same load straight to one backend, in the same run;
//! the controller's add / remove latency (p50 / p99); and crash fail-over time (p50 / p99
//! over 10 `kill -9`s). The backends are small keep-alive HTTP servers in this process;
//! every loop is bounded in count and time.

use stage::cloud::lb::controller::StoreAt;
use stage::cloud::lb::{Controller, Spec};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

const SECONDS: f64 = 3.0;
const MAX_REQUESTS: usize = 400_000;
const CONNECTIONS: usize = 8;

/// A keep-alive HTTP/1.1 server answering every request with a short body.
fn backend() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || serve(s));
        }
    });
    port
}

fn serve(s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        // Read one request head.
        let mut any = false;
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" {
                break;
            }
            any = true;
        }
        if !any {
            continue;
        }
        if w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .is_err()
        {
            return;
        }
    }
}

/// `CONNECTIONS` keep-alive clients for `SECONDS`: requests per second and p50 / p99 in µs.
fn load(port: u16) -> (f64, u128, u128) {
    let t0 = Instant::now();
    let handles: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_nodelay(true).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = [0u8; 4096];
                let stop = Instant::now() + Duration::from_secs_f64(SECONDS);
                while Instant::now() < stop && lat.len() < MAX_REQUESTS / CONNECTIONS {
                    let t = Instant::now();
                    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
                    let mut got = 0;
                    // The answer is small and fixed: read until its body arrived.
                    while !buf[..got].ends_with(b"ok") {
                        let n = s.read(&mut buf[got..]).unwrap();
                        assert!(n > 0, "closed");
                        got += n;
                    }
                    lat.push(t.elapsed().as_micros());
                }
                lat
            })
        })
        .collect();
    let mut all: Vec<u128> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let secs = t0.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    (all.len() as f64 / secs, pct(0.5), pct(0.99))
}

/// `wrk -t1 -c8 -d3s --latency` against `port` (Debian's wrk, installed by scripts/setup):
/// requests per second and p99 as wrk prints it; `None` without wrk.
fn wrk(port: u16) -> Option<(f64, String)> {
    let out = std::process::Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{CONNECTIONS}"),
            &format!("-d{SECONDS}s"),
            "--latency",
        ])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())?;
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    let errors = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    if let Some(e) = errors {
        eprintln!("  wrk on {port}: {}", e.trim());
    }
    Some((rps, p99))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn pcts(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let at = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)].as_secs_f64() * 1000.0;
    (at(0.5), at(0.99))
}

fn http_ok(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.starts_with("HTTP/1.1 200")
}

fn main() {
    if stage::cloud::lb::haproxy::binary().is_err() {
        eprintln!("haproxy is not installed; run scripts/setup");
        std::process::exit(1);
    }
    let dir = tempfile::tempdir().unwrap();
    let c = Controller::open(dir.path(), StoreAt::Sqlite(dir.path().join("state.db")), false)
        .unwrap()
        .unwrap();
    let ports: Vec<u16> = (0..3).map(|_| backend()).collect();
    let listen_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spec = Spec::from_json(
        "bench",
        &serde_json::json!({"name": "bench", "listen": format!("127.0.0.1:{listen_port}"),
            "backends": ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>(),
            "health": {"protocol": "tcp", "interval": 1, "timeout": 1}}),
    )
    .unwrap();
    c.create(spec).unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&c, listen_port, &ports)));
    c.shutdown(true);
    if result.is_err() {
        std::process::exit(1);
    }
}

fn run(c: &Controller, listen_port: u16, ports: &[u16]) {
    println!("lb benchmark: {CONNECTIONS} keep-alive connections, {SECONDS} s each, HTTP GET");
    let (direct_rps, direct_p50, direct_p99) = load(ports[0]);
    println!(
        "  straight to one backend : {direct_rps:>9.0} req/s  p50 {direct_p50:>5} µs  p99 {direct_p99:>5} µs"
    );
    let (lb_rps, lb_p50, lb_p99) = load(listen_port);
    println!("  through haproxy (3 be)  : {lb_rps:>9.0} req/s  p50 {lb_p50:>5} µs  p99 {lb_p99:>5} µs");
    println!("  ratio lb/direct         : {:>9.2}x", lb_rps / direct_rps);
    match (wrk(ports[0]), wrk(listen_port)) {
        (Some((d, d99)), Some((l, l99))) => {
            println!("  wrk -t1 -c{CONNECTIONS}, direct      : {d:>9.0} req/s  p99 {d99}");
            println!("  wrk -t1 -c{CONNECTIONS}, haproxy     : {l:>9.0} req/s  p99 {l99}");
            println!("  ratio lb/direct (wrk)   : {:>9.2}x", l / d);
        }
        _ => println!("  (wrk is not installed: scripts/setup installs it)"),
    }
    // Where the time goes: the same load through an LB in TCP mode (no HTTP processing),
    // and HAProxy answering by itself (`http-request return`: its per-request ceiling here).
    let tcp_port = free_port();
    let tcp = Spec::from_json(
        "bench",
        &serde_json::json!({"name": "benchtcp", "protocol": "tcp", "listen": format!("127.0.0.1:{tcp_port}"),
            "backends": ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>(),
            "health": {"protocol": "tcp", "interval": 1, "timeout": 1}}),
    )
    .unwrap();
    c.create(tcp).unwrap();
    let ret_port = free_port();
    let ret = Spec::from_json(
        "bench",
        &serde_json::json!({"name": "benchret", "listen": format!("127.0.0.1:{ret_port}"),
            "options": ["http-request return status 200 content-type text/plain string ok"]}),
    )
    .unwrap();
    c.create(ret).unwrap();
    if let (Some((t, t99)), Some((r, r99)), Some((d, _))) = (wrk(tcp_port), wrk(ret_port), wrk(ports[0])) {
        println!(
            "  wrk, haproxy tcp mode    : {t:>9.0} req/s  p99 {t99}  ({:.2}x direct)",
            t / d
        );
        println!(
            "  wrk, haproxy answering   : {r:>9.0} req/s  p99 {r99}  ({:.2}x direct; no backend)",
            r / d
        );
    }
    let _ = c.delete("benchtcp");
    let _ = c.delete("benchret");
    if let Some(secs) = std::env::var("LB_BENCH_HOLD")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        // For investigating: the backends and the LB stay up for SECS seconds.
        let info = c.info("bench").unwrap();
        println!(
            "  holding {secs} s: backends {ports:?}, lb {listen_port}, config {}/haproxy.cfg",
            info.dir
        );
        std::thread::sleep(Duration::from_secs(secs.min(1800)));
    }

    // Controller operations: add and remove one extra backend, 30 times each.
    let extra = format!("127.0.0.1:{}", backend());
    let (mut adds, mut removes) = (Vec::new(), Vec::new());
    for _ in 0..30 {
        let t = Instant::now();
        c.add("bench", &extra, false).unwrap();
        adds.push(t.elapsed());
        let t = Instant::now();
        c.remove("bench", &extra).unwrap();
        removes.push(t.elapsed());
    }
    let (a50, a99) = pcts(adds);
    let (r50, r99) = pcts(removes);
    println!("  add backend             : p50 {a50:>7.1} ms  p99 {a99:>7.1} ms   (haproxy -c + runtime API + store)");
    println!(
        "  remove backend (idle)   : p50 {r50:>7.1} ms  p99 {r99:>7.1} ms   (drain, maint, del + store)"
    );

    // Fail-over: kill -9 the master and its worker; time until a request succeeds again.
    let mut times = Vec::new();
    for _ in 0..10 {
        let info = c.info("bench").unwrap();
        let sock = std::path::PathBuf::from(&info.dir).join("admin.sock");
        let worker = stage::cloud::lb::haproxy::Runtime::new(&sock)
            .worker_pid()
            .unwrap();
        let t = Instant::now();
        unsafe {
            libc::kill(info.pid, libc::SIGKILL);
            libc::kill(worker, libc::SIGKILL);
        }
        while !http_ok(listen_port) {
            assert!(t.elapsed() < Duration::from_secs(10), "no fail-over within 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        times.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(300));
    }
    let (f50, f99) = pcts(times);
    println!("  crash fail-over (10x)   : p50 {f50:>7.1} ms  p99 {f99:>7.1} ms   (kill -9 → serving again)");
}
