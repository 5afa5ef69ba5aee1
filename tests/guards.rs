//! Reliability guards (issue 13): each test reproduces one way a script, a client or a config
//! value used to take the process down, and asserts what happens now. Attacks run against
//! the real binary over loopback sockets; where memory is the point, RSS is read from
//! /proc/<pid>/status; a well-behaved client is measured during each attack.

#[macro_use]
mod harness;

use harness::{stage_bin, wait_with_output, TestHome};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A node started from a script; killed on drop. The script writes its listening port to
/// the file named by the global `PORTFILE`.
struct Node {
    home: TestHome,
    child: Option<Child>,
}

impl Node {
    fn start(conf: &str, script: &str) -> Node {
        Node::start_with(conf, script, |_| {})
    }

    fn start_with(conf: &str, script: &str, setup: impl FnOnce(&mut Command)) -> Node {
        let home = TestHome::new();
        if !conf.is_empty() {
            home.write("conf/stage.json", conf);
        }
        let portfile = home.path().join("port");
        home.write(
            "package/start.lua",
            &format!("PORTFILE = {:?}\n{script}", portfile.to_str().unwrap()),
        );
        let mut cmd = Command::new(stage_bin());
        cmd.arg("run")
            .arg(home.path())
            .env("STAGE_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        setup(&mut cmd);
        let child = cmd.spawn().expect("start stage");
        Node {
            home,
            child: Some(child),
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits for the port file and returns the port.
    fn port(&mut self) -> u16 {
        let path = self.home.path().join("port");
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(15) {
            if let Some(p) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return p;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("node exited early ({st}):\n{}", self.stop());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("node did not write {}:\n{}", path.display(), self.stop());
    }

    /// Resident memory of the node in KiB, from /proc.
    fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Sends SIGTERM and waits for the exit; returns (code, log).
    fn term(&mut self, limit: Duration) -> (Option<i32>, String) {
        let c = self.child.take().unwrap();
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        wait_with_output(c, limit)
    }

    /// Stops the node and returns its log.
    fn stop(&mut self) -> String {
        match self.child.take() {
            Some(mut c) => {
                let _ = c.kill();
                wait_with_output(c, Duration::from_secs(5)).1
            }
            None => String::new(),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A text-port client: one line out, one line back.
struct LineClient {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl LineClient {
    fn connect(port: u16) -> LineClient {
        let w = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        w.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let r = BufReader::new(w.try_clone().unwrap());
        LineClient { w, r }
    }

    /// Sends `line` and returns the reply line (without the newline), or None on EOF/timeout.
    fn ask(&mut self, line: &str) -> Option<String> {
        self.w.write_all(format!("{line}\n").as_bytes()).ok()?;
        let mut s = String::new();
        match self.r.read_line(&mut s) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(s.trim_end().to_string()),
        }
    }
}

/// The well-behaved client measured during an attack: asks `ping N` on its own connection
/// until `stop` is set; returns (replies, worst latency).
fn good_client(
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u32, Duration, u32)> {
    std::thread::spawn(move || {
        let mut c = LineClient::connect(port);
        let (mut ok, mut bad, mut worst) = (0u32, 0u32, Duration::ZERO);
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            i += 1;
            let t = Instant::now();
            match c.ask(&format!("ping {i}")) {
                Some(r) if r == format!("pong {i}") => ok += 1,
                _ => {
                    bad += 1;
                    c = LineClient::connect(port);
                }
            }
            worst = worst.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(20));
        }
        (ok, worst, bad)
    })
}

/// Lua: a text port whose receiver answers `ping N` with `pong N` and gives everything else
/// to `handle(line)` (without its newline, which text framing hands over as STAGE does),
/// sending back what it returns.
const TEXT_PORT: &str = r#"
local function serve(handle)
    local sp = assert(broker.ready("tcp://127.0.0.1:0?text", function(sock, addr)
        return function(so, line)
            line = line:gsub("\r?\n$", "")
            local n = line:match("^ping (%d+)$")
            if n then return "pong " .. n end
            return handle(line, so)
        end
    end))
    write(PORTFILE, tostring(sp.port))
end
"#;

fn check_home(home: &std::path::Path) -> (bool, String) {
    let out = Command::new(stage_bin()).arg("check").arg(home).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

// ---------------------------------------------------------------------------------------
// 7. Secrets leak into logs

#[test]
fn item7_config_errors_never_print_env_values() {
    let home = TestHome::new();
    home.write("conf/stage.json", r##"{"#threads": ["env:STAGE_GUARD_SECRET"]}"##);
    home.write("package/start.lua", "done()");
    let secret = "sk-guard-7f3a9c1e";
    let out = Command::new(stage_bin())
        .arg("check")
        .arg(home.path())
        .env("STAGE_GUARD_SECRET", secret)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("#threads[0]: expected an integer"), "{text}");
    assert!(!text.contains(secret), "check printed the secret: {text}");
    let child = Command::new(stage_bin())
        .arg("run")
        .arg(home.path())
        .env("STAGE_GUARD_SECRET", secret)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (code, out) = wait_with_output(child, Duration::from_secs(10));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("<env:STAGE_GUARD_SECRET>"), "{out}");
    assert!(!out.contains(secret), "run printed the secret: {out}");
}

#[test]
fn item7_client_text_never_expands_secrets() {
    let secret = "vk-guard-0b1d2e";
    let mut node = Node::start_with(
        r##"{"%logger": {"env": ["STAGE_GUARD_OK_TOKEN"]}}"##,
        &format!(
            r#"{TEXT_PORT}
            serve(function(line)
                logger.info(line)
                logger.info("received", line)
                logger.info("home=%{{STAGE_GUARD_PLAIN}} allowed=%{{STAGE_GUARD_OK_TOKEN}}")
                return "logged"
            end)"#
        ),
        |c| {
            c.env("STAGE_GUARD_API_KEY", secret)
                .env("STAGE_GUARD_PLAIN", "plainvalue")
                .env("STAGE_GUARD_OK_TOKEN", "allowedvalue");
        },
    );
    let port = node.port();
    let mut c = LineClient::connect(port);
    assert_eq!(
        c.ask("%{STAGE_GUARD_API_KEY} and %{STAGE_GUARD_PLAIN}")
            .as_deref(),
        Some("logged")
    );
    assert_eq!(c.ask("ping 1").as_deref(), Some("pong 1"));
    let log = node.stop();
    assert!(!log.contains(secret), "the secret reached the log:\n{log}");
    assert!(log.contains("[hidden] and plainvalue"), "{log}");
    // As a value, the client's text is written as it is.
    assert!(
        log.contains("received\t%{STAGE_GUARD_API_KEY} and %{STAGE_GUARD_PLAIN}"),
        "{log}"
    );
    assert!(log.contains("home=plainvalue allowed=allowedvalue"), "{log}");
}

// ---------------------------------------------------------------------------------------
// 8. #threads is unchecked

#[test]
fn item8_threads_out_of_range_are_refused_by_check_and_run() {
    for (threads, key) in [
        ("[4, 2305843009213693952]", "#threads[1]"),
        ("[4, 1000000000]", "#threads[1]"),
        ("[100000, 8]", "#threads[0]"),
    ] {
        let home = TestHome::new();
        home.write("conf/stage.json", &format!(r##"{{"#threads": {threads}}}"##));
        home.write("package/start.lua", "done()");
        let (ok, text) = check_home(home.path());
        assert!(!ok, "check accepted {threads}: {text}");
        assert!(
            text.contains(&format!("{key}: expected an integer from 1 to")),
            "{text}"
        );
        let started = Instant::now();
        let child = home.spawn();
        let pid = child.id();
        let (code, out) = wait_with_output(child, Duration::from_secs(10));
        assert_eq!(code, Some(2), "{threads}: {out}");
        assert!(out.contains(key), "{out}");
        assert!(!out.contains("panicked"), "{out}");
        assert!(started.elapsed() < Duration::from_secs(5), "{pid}");
    }
}

// ---------------------------------------------------------------------------------------
// 11. A broken conf/log4rs.yaml silently disables logging

#[test]
fn item11_broken_log4rs_yaml_is_reported_and_refused() {
    let home = TestHome::new();
    home.write(
        "conf/log4rs.yaml",
        "appenders:\n  console:\n    kind: consol\n    target: stderr\nroot:\n  level: info\n  appenders: [console]\n",
    );
    home.write("package/start.lua", "done()");
    let (ok, text) = check_home(home.path());
    assert!(!ok, "{text}");
    assert!(text.contains("conf/log4rs.yaml: appender \"console\""), "{text}");
    assert!(text.contains("consol"), "{text}");
    let (code, out) = wait_with_output(home.spawn(), Duration::from_secs(10));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("conf/log4rs.yaml: appender \"console\""), "{out}");
    // The same file with the typo fixed runs and logs.
    home.write(
        "conf/log4rs.yaml",
        "appenders:\n  console:\n    kind: console\n    target: stderr\nroot:\n  level: info\n  appenders: [console]\n",
    );
    let (ok, text) = check_home(home.path());
    assert!(ok, "{text}");
    let (code, out) = wait_with_output(home.spawn(), Duration::from_secs(10));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("PASS"), "{out}");
}

// ---------------------------------------------------------------------------------------
// 6. Hot reload serves half-written files

/// A version of package/svc.lua: a long comment (so a cut file is a valid chunk that
/// returns nothing) and a function that tags its replies with the version.
fn svc_version(v: u32) -> String {
    let pad = "-- padding so that a deploy takes several writes\n".repeat(600);
    format!("{pad}local V = {v}\nreturn function(x) return 'v' .. V .. ':' .. x end\n")
}

#[test]
fn item6_reload_never_serves_a_half_written_file() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut node = Node::start(
        "",
        &format!(
            r#"{TEXT_PORT}
            serve(function(line)
                local svc = stage.load("svc")
                return svc(line)
            end)"#
        ),
    );
    let svc = node.home.path().join("package/svc.lua");
    std::fs::write(&svc, svc_version(0)).unwrap();
    let port = node.port();
    let mut c = LineClient::connect(port);
    // The service is in use (loaded once) before deploys start.
    assert_eq!(c.ask("warm").as_deref(), Some("v0:warm"));
    let stop = Arc::new(AtomicBool::new(false));
    // The deployer: cp-style chunked rewrites, truncate+write with pauses, atomic renames.
    let deployer = {
        let stop = stop.clone();
        let svc = svc.clone();
        std::thread::spawn(move || {
            let mut v = 1;
            let mut kinds = [0u32; 3];
            while !stop.load(Ordering::Relaxed) {
                let text = svc_version(v);
                match v % 3 {
                    0 => {
                        // cp: open with O_TRUNC, then write in 4 KiB chunks.
                        let mut f = std::fs::File::create(&svc).unwrap();
                        for chunk in text.as_bytes().chunks(4096) {
                            f.write_all(chunk).unwrap();
                        }
                    }
                    1 => {
                        // truncate, then write in two halves with pauses in between.
                        let f = std::fs::OpenOptions::new().write(true).open(&svc).unwrap();
                        f.set_len(0).unwrap();
                        std::thread::sleep(Duration::from_millis(3));
                        let mut f = f;
                        let (a, b) = text.as_bytes().split_at(text.len() / 2);
                        f.write_all(a).unwrap();
                        std::thread::sleep(Duration::from_millis(3));
                        f.write_all(b).unwrap();
                    }
                    _ => {
                        let tmp = svc.with_extension("tmp");
                        std::fs::write(&tmp, &text).unwrap();
                        std::fs::rename(&tmp, &svc).unwrap();
                    }
                }
                kinds[(v % 3) as usize] += 1;
                v += 1;
                std::thread::sleep(Duration::from_millis(150));
            }
            (v, kinds)
        })
    };
    // The client: 64 requests in flight on one connection, for 4 s.
    let (mut sent, mut good, mut versions) = (0u64, 0u64, std::collections::BTreeSet::new());
    let mut bad = vec![];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        let mut batch = String::new();
        for i in 0..64 {
            batch.push_str(&format!("m{}\n", sent + i));
        }
        c.w.write_all(batch.as_bytes()).unwrap();
        for i in 0..64 {
            let mut line = String::new();
            match c.r.read_line(&mut line) {
                Ok(n) if n > 0 => {
                    let line = line.trim_end();
                    match line.split_once(':') {
                        Some((ver, m)) if m == format!("m{}", sent + i) && ver.starts_with('v') => {
                            good += 1;
                            versions.insert(ver.to_string());
                        }
                        _ => bad.push(line.to_string()),
                    }
                }
                _ => panic!("connection lost after {good} replies:\n{}", node.stop()),
            }
        }
        sent += 64;
    }
    let rate = sent as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (deploys, kinds) = deployer.join().unwrap();
    let log = node.stop();
    assert!(
        bad.is_empty(),
        "{} wrong replies, e.g. {:?}\n{log}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    assert_eq!(good, sent);
    assert!(kinds.iter().all(|&k| k >= 3), "deploys per kind: {kinds:?}");
    // New versions did take over (not just the first one served throughout).
    assert!(
        versions.len() >= (deploys as usize) / 3,
        "versions {versions:?} of {deploys} deploys\n{log}"
    );
    eprintln!(
        "{sent} requests at {rate:.0}/s, {deploys} deploys {kinds:?}, {} versions served",
        versions.len()
    );
}

// ---------------------------------------------------------------------------------------
// 12. Idle clients and the fd limit

/// The soft `Max open files` of a process, from /proc.
fn soft_nofile(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let nums: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    (nums[0], nums[1])
}

#[test]
fn item12_open_files_soft_limit_is_raised_to_the_hard_limit() {
    use std::os::unix::process::CommandExt;
    let mut node = Node::start_with("", r#"write(PORTFILE, "1")"#, |c| unsafe {
        c.pre_exec(|| {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            lim.rlim_cur = 256.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            Ok(())
        });
    });
    node.port();
    let (soft, hard) = soft_nofile(node.pid());
    let log = node.stop();
    assert_eq!(soft, hard, "{log}");
    if hard > 256 {
        assert!(
            log.contains(&format!("open files limit raised from 256 to {hard}")),
            "{log}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 1. Deep tables abort the process

#[test]
fn item1_deep_tables_are_an_error_not_a_crash() {
    let mut node = Node::start(
        "",
        &format!(
            r#"{TEXT_PORT}
            local history = nil
            serve(function(line)
                local cmd, arg = line:match("^(%a+) ?(.*)$")
                if cmd == "push" then
                    for i = 1, tonumber(arg) do history = {{ msg = "m" .. i, prev = history }} end
                    return "ok"
                elseif cmd == "json" then
                    local ok, err = pcall(bundle.json, history)
                    return ok and ("json " .. #err) or ("error " .. err)
                elseif cmd == "bson" then
                    local ok, err = pcall(bundle.bson, history)
                    return ok and "bson ok" or ("error " .. err)
                elseif cmd == "send" then
                    return stage.signal("nobody:x", history) and "sent" or "not sent"
                elseif cmd == "raw" then
                    return history               -- a table returned on a text port: JSON
                end
            end)"#
        ),
    );
    let port = node.port();
    let mut c = LineClient::connect(port);
    assert_eq!(c.ask("push 50").as_deref(), Some("ok"));
    let small = c.ask("json").unwrap();
    assert!(small.starts_with("json "), "{small}");
    assert_eq!(c.ask("push 3000").as_deref(), Some("ok"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let good = good_client(port, stop.clone());
    let e = c.ask("json").unwrap();
    assert_eq!(e, "error bundle.json: table nested deeper than 100 levels");
    let e = c.ask("bson").unwrap();
    assert!(e.starts_with("error bundle.bson:") && e.contains("100"), "{e}");
    // A table returned on a text port: the reply fails, the connection and the node live on.
    let mut raw = LineClient::connect(port);
    let _ = raw.ask("raw");
    assert_eq!(c.ask("ping 7").as_deref(), Some("pong 7"));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, _worst, bad) = good.join().unwrap();
    assert!(node.alive(), "the node died:\n{}", node.stop());
    let log = node.stop();
    assert!(
        ok > 0 && bad == 0,
        "well-behaved client: {ok} ok, {bad} failed\n{log}"
    );
    assert!(log.contains("nested deeper than 100 levels"), "{log}");
    assert!(!log.contains("overflowed its stack"), "{log}");
}

// ---------------------------------------------------------------------------------------
// 2. The queue bound does not hold when handlers wait

#[test]
fn item2_a_signal_flood_at_sleeping_handlers_keeps_rss_flat() {
    let mut node = Node::start(
        r##"{"#startup": [["lua+stage"], ["lua+sink"]], "#limits": {"handlers": 256}, "#threads": [2, 1024]}"##,
        &format!(
            r#"{TEXT_PORT}
            if process.stage == 1 then
                -- the victim: a handler that waits, and a port its clients use
                local busy, most = 0, 0
                stage.waitfor("slow", function(i)
                    busy = busy + 1
                    most = math.max(most, busy)
                    stage.sleep(2000)
                    busy = busy - 1
                end)
                stage.addtask(100, function() write("busy.txt", tostring(most)) return 100 end)
                serve(function(line) return "?" end)
            else
                -- the attacker: 3 s of signals as fast as it can
                local sent, refused, t0 = 0, 0, process.tick
                stage.addtask(1, function()
                    for i = 1, 2000 do
                        if stage.signal("sink:slow", i) > 0 then sent = sent + 1 else refused = refused + 1 end
                    end
                    if process.tick - t0 < 3 then return 1 end
                    write("flood.txt", sent .. " " .. refused)
                end)
            end"#
        ),
    );
    let port = node.port();
    let base = node.rss_kib();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let good = good_client(port, stop.clone());
    let flood = node.home.path().join("flood.txt");
    let (mut peak, started) = (base, Instant::now());
    while !flood.exists() && started.elapsed() < Duration::from_secs(20) {
        peak = peak.max(node.rss_kib());
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, worst, bad) = good.join().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let result = std::fs::read_to_string(&flood).unwrap_or_default()
        + " "
        + &std::fs::read_to_string(node.home.path().join("busy.txt")).unwrap_or_default();
    let log = node.stop();
    let nums: Vec<u64> = result.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert_eq!(nums.len(), 3, "{result}\n{log}");
    let (sent, refused, busy) = (nums[0], nums[1], nums[2]);
    eprintln!(
        "flood: {sent} delivered, {refused} refused, {busy} handlers in flight; RSS {base} -> peak {peak} KiB; \
         good client {ok} replies, worst {worst:?}"
    );
    assert!(busy <= 256, "{busy} handlers in flight");
    assert!(refused > 0, "the flood was never refused: {sent} sent");
    assert!(
        peak < base + 64 * 1024,
        "RSS grew from {base} to {peak} KiB\n{log}"
    );
    assert!(ok > 20 && bad == 0, "well-behaved client: {ok} ok, {bad} failed");
    assert!(worst < Duration::from_secs(1), "worst reply {worst:?}");
}

// ---------------------------------------------------------------------------------------
// 4. No Lua memory limit

#[test]
fn item4_a_handler_allocating_without_bound_fails_alone() {
    let mut node = Node::start(
        r##"{"#limits": {"memory": "32m"}}"##,
        &format!(
            r#"{TEXT_PORT}
            serve(function(line)
                if line == "hog" then
                    local t = {{}}
                    while true do t[#t + 1] = string.rep("x", 1000000) .. #t end
                elseif line == "pcall" then
                    local ok, err = pcall(function()
                        local t = {{}}
                        while true do t[#t + 1] = string.rep("y", 1000000) .. #t end
                    end)
                    return tostring(ok) .. " " .. tostring(err)
                end
            end)"#
        ),
    );
    let port = node.port();
    let base = node.rss_kib();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let good = good_client(port, stop.clone());
    let mut peak = base;
    for _ in 0..3 {
        let mut hog = LineClient::connect(port);
        hog.w.write_all(b"hog\n").unwrap();
        let mut c = LineClient::connect(port);
        assert_eq!(c.ask("pcall").as_deref(), Some("false not enough memory"));
        peak = peak.max(node.rss_kib());
    }
    std::thread::sleep(Duration::from_millis(300));
    peak = peak.max(node.rss_kib());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, worst, bad) = good.join().unwrap();
    assert!(node.alive(), "the node died:\n{}", node.stop());
    let log = node.stop();
    eprintln!("memory: RSS {base} -> peak {peak} KiB; good client {ok} replies, worst {worst:?}");
    assert!(log.contains("error in receive: not enough memory"), "{log}");
    assert!(peak < base + 160 * 1024, "RSS grew from {base} to {peak} KiB");
    assert!(ok > 5 && bad == 0, "well-behaved client: {ok} ok, {bad} failed");
}

// ---------------------------------------------------------------------------------------
// 5. A runaway loop kills the instance for good

#[test]
fn item5_a_runaway_loop_is_interrupted_and_the_instance_serves_on() {
    let mut node = Node::start(
        r##"{"#limits": {"time": 300}}"##,
        &format!(
            r#"{TEXT_PORT}
            serve(function(line)
                if line == "spin" then
                    while true do end
                elseif line == "trap" then
                    -- catches each interruption and spins again: preempted, not starving others
                    local caught = 0
                    for _ = 1, 4 do
                        if not pcall(function() while true do end end) then caught = caught + 1 end
                    end
                    return "trapped " .. caught
                elseif line == "work" then
                    -- long but yielding work is not interrupted
                    for _ = 1, 8 do local t = os.time() + 0 for i = 1, 2e5 do t = t + i end stage.sleep(1) end
                    return "worked"
                end
            end)
            stage.addtask(50, function() local n = 0 while true do n = n + 1 end end)"#
        ),
    );
    let port = node.port();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let good = good_client(port, stop.clone());
    let mut spin = LineClient::connect(port);
    spin.w.write_all(b"spin\n").unwrap();
    let mut c = LineClient::connect(port);
    let t = Instant::now();
    assert_eq!(c.ask("ping 1").as_deref(), Some("pong 1"));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(c.ask("work").as_deref(), Some("worked"));
    spin.w.write_all(b"spin\n").unwrap();
    assert_eq!(c.ask("ping 2").as_deref(), Some("pong 2"));
    let mut trap = LineClient::connect(port);
    trap.w.write_all(b"trap\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    assert_eq!(c.ask("ping 3").as_deref(), Some("pong 3"));
    assert!(t.elapsed() < Duration::from_millis(1500), "{:?}", t.elapsed());
    let mut line = String::new();
    trap.r.read_line(&mut line).unwrap();
    assert_eq!(line.trim_end(), "trapped 4");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, worst, bad) = good.join().unwrap();
    let (code, log) = node.term(Duration::from_secs(10));
    eprintln!("runaway: good client {ok} replies, worst {worst:?}");
    assert!(
        log.contains("package/start.lua:")
            && log.contains("callback ran for more than 300 ms without yielding"),
        "{log}"
    );
    assert!(log.contains("error in task: package/start.lua:"), "{log}");
    assert!(ok > 5 && bad == 0, "well-behaved client: {ok} ok, {bad} failed");
    assert!(worst < Duration::from_secs(2), "worst reply {worst:?}");
    assert_eq!(code, Some(0), "{log}");
}

// ---------------------------------------------------------------------------------------
// 9. Error floods

#[test]
fn item9_repeated_errors_are_rate_limited_per_call_site() {
    let mut node = Node::start(
        r##"{"#limits": {"errors": 5}}"##,
        &format!(
            r#"{TEXT_PORT}
            serve(function(line)
                if line:sub(1, 3) == "bad" then error("bad input " .. line) end
                if line:sub(1, 5) == "other" then error("other site") end
                return "ok"
            end)"#
        ),
    );
    let port = node.port();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let good = good_client(port, stop.clone());
    // 5,000 erroring messages, pipelined, on one connection.
    let mut flood = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut batch = String::new();
    for i in 0..5000 {
        batch.push_str(&format!("bad {i}\n"));
    }
    flood.write_all(batch.as_bytes()).unwrap();
    let mut c = LineClient::connect(port);
    let _ = c.ask("other");
    assert_eq!(c.ask("x").as_deref(), Some("ok"));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, _worst, bad) = good.join().unwrap();
    let log = node.stop();
    let bad_lines = log.matches("bad input bad").count();
    assert!(bad_lines <= 5, "{bad_lines} lines of the same error");
    assert!(bad_lines >= 1, "{log}");
    assert_eq!(
        log.matches("other site").count(),
        1,
        "another site is not affected\n{log}"
    );
    assert!(log.len() < 64 * 1024, "{} bytes of log", log.len());
    assert!(ok > 0 && bad == 0, "well-behaved client: {ok} ok, {bad} failed");
}

// ---------------------------------------------------------------------------------------
// 3. A large IN is a memory attack

#[test]
fn item3_a_large_in_costs_only_the_bytes_received() {
    // Over #limits.in (64m by default), broker.ready refuses the URI.
    let mut node = Node::start(
        "",
        r#"
        local ok, err = pcall(broker.ready, "tcp://127.0.0.1:0?bson=256m", function() end)
        local p, e = broker.ready("tcp://127.0.0.1:0?bson=256m", function() end)
        write(PORTFILE .. ".err", tostring(ok) .. " " .. tostring(err) .. " | " .. tostring(p) .. " " .. tostring(e))
        write(PORTFILE, "1")
        "#,
    );
    node.port();
    let err = std::fs::read_to_string(node.home.path().join("port.err")).unwrap();
    node.stop();
    assert!(err.contains("#limits.in") && err.contains("64m"), "{err}");
    // Allowed explicitly: 4 clients each announce a 200 MB frame and send 16 KiB of it.
    let mut node = Node::start(
        r##"{"#limits": {"in": "256m"}}"##,
        r#"
        local sp = assert(broker.ready("tcp://127.0.0.1:0?bson=256m", function()
            return function(s, d) return d end
        end))
        write(PORTFILE, tostring(sp.port))
        "#,
    );
    let port = node.port();
    let base = node.rss_kib();
    let mut attackers = vec![];
    for _ in 0..4 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut head = (200_000_000i32).to_le_bytes().to_vec();
        head.extend(std::iter::repeat_n(0x41u8, 16 * 1024 - 4));
        s.write_all(&head).unwrap();
        attackers.push(s);
    }
    // A well-behaved BSON client meanwhile: {"n": i} round trips.
    let mut good = TcpStream::connect(("127.0.0.1", port)).unwrap();
    good.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut worst = Duration::ZERO;
    let mut peak = base;
    for i in 0..50i32 {
        let doc = bson_int_doc("n", i);
        let t = Instant::now();
        good.write_all(&doc).unwrap();
        let mut back = vec![0u8; doc.len()];
        std::io::Read::read_exact(&mut good, &mut back).unwrap();
        worst = worst.max(t.elapsed());
        assert_eq!(back, doc);
        peak = peak.max(node.rss_kib());
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = node.stop();
    eprintln!("large IN: RSS {base} -> peak {peak} KiB, good client worst {worst:?}");
    assert!(
        peak < base + 32 * 1024,
        "RSS grew from {base} to {peak} KiB\n{log}"
    );
    assert!(worst < Duration::from_millis(500), "{worst:?}");
    drop(attackers);
}

/// `{key: i}` as a BSON document.
fn bson_int_doc(key: &str, i: i32) -> Vec<u8> {
    let mut d = vec![0, 0, 0, 0, 0x10];
    d.extend_from_slice(key.as_bytes());
    d.push(0);
    d.extend_from_slice(&i.to_le_bytes());
    d.push(0);
    let len = d.len() as i32;
    d[..4].copy_from_slice(&len.to_le_bytes());
    d
}

// ---------------------------------------------------------------------------------------
// 10. Shutdown

const SLOW_PORT: &str = r#"
serve(function(line, so)
    local ms = tonumber(line:match("^slow (%d+)$"))
    if ms then stage.sleep(ms) return "done " .. ms end
end)
"#;

#[test]
fn item10_sigterm_answers_what_is_in_flight_and_exits_0() {
    let mut node = Node::start(
        r##"{"#limits": {"grace": 5000}}"##,
        &format!("{TEXT_PORT}{SLOW_PORT}"),
    );
    let port = node.port();
    let mut clients: Vec<LineClient> = (0..16).map(|_| LineClient::connect(port)).collect();
    for c in &mut clients {
        c.w.write_all(b"slow 1000\n").unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let pid = node.pid();
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(200));
    // No longer accepting.
    let refused = match TcpStream::connect(("127.0.0.1", port)) {
        Err(_) => true,
        Ok(mut s) => {
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let _ = s.write_all(b"ping 1\n");
            let mut b = [0u8; 16];
            matches!(std::io::Read::read(&mut s, &mut b), Ok(0) | Err(_))
        }
    };
    let mut answered = 0;
    for c in &mut clients {
        let mut line = String::new();
        if c.r.read_line(&mut line).is_ok() && line.trim_end() == "done 1000" {
            answered += 1;
        }
    }
    let (code, log) = node.term(Duration::from_secs(10));
    assert_eq!(answered, 16, "{log}");
    assert!(refused, "a new connection was served while draining");
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn item10_sigterm_with_stuck_requests_exits_non_zero_after_the_grace() {
    let mut node = Node::start(
        r##"{"#limits": {"grace": 500}}"##,
        &format!("{TEXT_PORT}{SLOW_PORT}"),
    );
    let port = node.port();
    let mut c = LineClient::connect(port);
    c.w.write_all(b"slow 30000\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let (code, log) = node.term(Duration::from_secs(10));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(code, Some(3), "{log}");
    assert!(log.contains("still in flight after the grace of 500 ms"), "{log}");
}

// ---------------------------------------------------------------------------------------
// 12. Idle clients and the fd limit

#[test]
fn item12_idle_connections_expire_by_default() {
    let mut node = Node::start(
        r##"{"#limits": {"idle": 800}}"##,
        &format!("{TEXT_PORT}serve(function() end)"),
    );
    let port = node.port();
    let mut idle: Vec<TcpStream> = (0..50)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let t = Instant::now();
    let mut closed = 0;
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 8];
        if matches!(std::io::Read::read(s, &mut b), Ok(0)) {
            closed += 1;
        }
    }
    let log = node.stop();
    assert_eq!(closed, 50, "{log}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
}

#[test]
fn item12_at_the_fd_limit_new_clients_are_refused_and_counted() {
    use std::os::unix::process::CommandExt;
    let mut node = Node::start_with(
        r##"{"#limits": {"idle": 0}}"##,
        &format!("{TEXT_PORT}serve(function() end)"),
        |c| unsafe {
            c.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 64,
                    rlim_max: 64,
                };
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                Ok(())
            });
        },
    );
    let port = node.port();
    let mut good = LineClient::connect(port);
    assert_eq!(good.ask("ping 0").as_deref(), Some("pong 0"));
    // Far more clients than descriptors.
    let mut flood = vec![];
    for _ in 0..120 {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            flood.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(1500));
    // The ones beyond the limit were closed (not left hanging in the backlog).
    let mut refused = 0;
    for s in &mut flood {
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut b = [0u8; 8];
        if matches!(std::io::Read::read(s, &mut b), Ok(0) | Err(_)) {
            refused += 1;
        }
    }
    for i in 1..20 {
        assert_eq!(
            good.ask(&format!("ping {i}")).as_deref(),
            Some(format!("pong {i}").as_str())
        );
    }
    drop(flood);
    std::thread::sleep(Duration::from_millis(300));
    // Once descriptors are free again, new clients are served.
    let mut late = LineClient::connect(port);
    assert_eq!(late.ask("ping 99").as_deref(), Some("pong 99"));
    let log = node.stop();
    assert!(refused >= 40, "{refused} refused\n{log}");
    let warns = log.matches("connection(s) refused").count();
    assert!((1..=3).contains(&warns), "{warns} warnings\n{log}");
}
