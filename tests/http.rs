//! HTTP and HTTPS served by Lua handlers, driven by clients no one here wrote: `curl`
//! (HTTP/1.1, HTTP/2 over TLS with a CA made by `openssl` in the test) and raw sockets for
//! what curl will not send (pipelining, slowloris, smuggling, garbage TLS).

mod harness;

use harness::{wait_with_output, TestHome};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A node started from a script; killed on drop. The script writes its port to `PORTFILE`.
struct Node {
    home: TestHome,
    child: Option<Child>,
}

impl Node {
    fn start(script: &str) -> Node {
        Node::start_in(TestHome::new(), script)
    }

    fn start_in(home: TestHome, script: &str) -> Node {
        let portfile = home.path().join("port");
        home.write(
            "package/start.lua",
            &format!("PORTFILE = {:?}\n{script}", portfile.to_str().unwrap()),
        );
        let child = home.spawn();
        Node {
            home,
            child: Some(child),
        }
    }

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
        panic!("node did not write its port:\n{}", self.stop());
    }

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

/// Runs curl with `args`; returns (exit ok, stdout, stderr).
fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl (scripts/setup installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn raw(port: u16, req: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The handler every test serves: it records each path it saw (served at `/seen`).
const APP: &str = r#"
local seen = {}
local function app(req)
    seen[#seen + 1] = req.path
    if req.path == "/seen" then return table.concat(seen, ",") end
    if req.path == "/fail" then error("boom in the handler") end
    if req.path == "/big" then return string.rep("0123456789", tonumber(req.query.n) // 10) end
    if req.path == "/wait" then stage.sleep(100) return "waited" end
    if req.path == "/json" then
        return { status = 201, body = { method = req.method, q = req.query, v = req.version } }
    end
    if req.path == "/stream" then
        local i = 0
        return { headers = { ["content-type"] = "text/csv" }, body = function ()
            i = i + 1
            if i > 3 then return nil end
            stage.sleep(10)
            return "row" .. i .. "\n"
        end }
    end
    local sum = 0
    for i = 1, #req.body do sum = sum + req.body:byte(i) end
    return { headers = { ["x-sum"] = sum, ["set-cookie"] = { "a=1", "b=2" } },
             body = req.method .. " " .. req.path .. " " .. #req.body .. " " .. tostring(req.headers["x-test"]) }
end
"#;

fn app_node(uri: &str, opts: &str) -> Node {
    Node::start(&format!(
        "{APP}\nlocal p, e = broker.ready({uri:?}, app, {opts})\nassert(type(p) == 'table', e)\nwrite(PORTFILE, tostring(p.port))\n"
    ))
}

#[test]
fn curl_keepalive_chunked_continue_large_and_streams() {
    let mut node = app_node("http://127.0.0.1:0", "{ max_body = '4m' }");
    let port = node.port();
    let base = format!("http://127.0.0.1:{port}");
    // Two requests on one connection: the second makes no new connection.
    let (ok, out, err) = curl(&[
        "-H",
        "x-test: yes",
        "-w",
        " [%{num_connects}]\n",
        &format!("{base}/a"),
        &format!("{base}/b"),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("GET /a 0 yes [1]") && out.contains("GET /b 0 yes [0]"),
        "{out}"
    );
    // A chunked upload of 3 MB with Expect: 100-continue.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("up.bin");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let sum: u64 = data.iter().map(|&b| b as u64).sum();
    std::fs::write(&file, &data).unwrap();
    let (ok, out, err) = curl(&[
        "-v",
        "-H",
        "Transfer-Encoding: chunked",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &format!("@{}", file.display()),
        "-D",
        "-",
        &format!("{base}/up"),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("HTTP/1.1 100 Continue"), "no 100 Continue: {err}");
    assert!(out.contains("POST /up 3000000 nil"), "{out}");
    assert!(out.contains(&format!("x-sum: {sum}")), "{out}");
    assert!(
        out.contains("set-cookie: a=1") && out.contains("set-cookie: b=2"),
        "{out}"
    );
    // A large response.
    let (ok, out, _) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{size_download} %{http_code}",
        &format!("{base}/big?n=8000000"),
    ]);
    assert!(ok);
    assert_eq!(out, "8000000 200");
    // JSON body, status and decoded query.
    let (_, out, _) = curl(&[
        "-w",
        " %{http_code} %{content_type}",
        &format!("{base}/json?a=1&a=2&b=x%20y"),
    ]);
    assert!(
        out.contains(r#""q":{"#) && out.contains(r#""a":["1","2"]"#) && out.contains(r#""b":"x y""#),
        "{out}"
    );
    assert!(out.ends_with(" 201 application/json"), "{out}");
    // A streamed body arrives chunked, in order.
    let (_, out, _) = curl(&["-D", "-", &format!("{base}/stream")]);
    assert!(
        out.contains("transfer-encoding: chunked") && out.contains("text/csv"),
        "{out}"
    );
    assert!(out.ends_with("row1\nrow2\nrow3\n"), "{out}");
    // Requests that wait do not hold up the others (each has its coroutine).
    let t = Instant::now();
    let waits: Vec<_> = (0..5)
        .map(|_| {
            let url = format!("{base}/wait");
            std::thread::spawn(move || curl(&[&url]).1)
        })
        .collect();
    for w in waits {
        assert_eq!(w.join().unwrap(), "waited");
    }
    assert!(t.elapsed() < Duration::from_millis(2000), "{:?}", t.elapsed());
    node.stop();
}

#[test]
fn stage_send_speaks_http() {
    let mut node = app_node("http://127.0.0.1:0", "nil");
    let port = node.port();
    let send = |args: &[&str], stdin: &str| {
        let mut c = Command::new(harness::stage_bin())
            .arg("send")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = c.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let url = format!("http://127.0.0.1:{port}/p");
    assert_eq!(send(&[&url], ""), (Some(0), "GET /p 0 nil\n".to_string()));
    assert_eq!(
        send(&[&url, r#"{"a":1}"#], ""),
        (Some(0), "POST /p 7 nil\n".to_string())
    );
    let (code, out) = send(&[&url, "-"], "{\"a\":1}\n\n{\"bb\":22}\n");
    assert_eq!((code, out.as_str()), (Some(0), "POST /p 7 nil\nPOST /p 9 nil\n"));
    let (code, out) = send(&[&format!("http://127.0.0.1:{port}/fail")], "");
    assert_eq!((code, out.as_str()), (Some(1), "internal server error\n"));
    node.stop();
}

#[test]
fn pipelined_requests_answer_in_order() {
    let mut node = app_node("http://127.0.0.1:0", "nil");
    let port = node.port();
    let r = raw(
        port,
        b"GET /1 HTTP/1.1\r\nhost: x\r\n\r\nPOST /2 HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhiGET /3 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    let at = |s: &str| r.find(s).unwrap_or_else(|| panic!("{s} missing in {r}"));
    assert!(
        at("GET /1 0") < at("POST /2 2") && at("POST /2 2") < at("GET /3 0"),
        "{r}"
    );
    assert_eq!(r.matches("HTTP/1.1 200").count(), 3, "{r}");
    node.stop();
}

#[test]
fn bad_input_is_refused_with_a_status_and_a_log_line() {
    let mut node = app_node(
        "http://127.0.0.1:0",
        "{ max_head = 2048, max_body = 1024, timeout = 700 }",
    );
    let port = node.port();
    let base = format!("http://127.0.0.1:{port}");
    // A slowloris client: a byte now and then, never a whole head.
    let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    slow.write_all(b"GET /slow HTTP/1.1\r\n").unwrap();
    let slow_t = std::thread::spawn(move || {
        for _ in 0..20 {
            if slow.write_all(b"x").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut out = Vec::new();
        let _ = slow.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    });
    // Meanwhile a well-behaved client is served.
    let (ok, out, _) = curl(&[&format!("{base}/good")]);
    assert!(ok && out.starts_with("GET /good 0"), "{out}");
    let slow_reply = slow_t.join().unwrap();
    assert!(
        slow_reply.starts_with("HTTP/1.1 408"),
        "slowloris got: {slow_reply:?}"
    );
    // Headers over max_head.
    let big = "a".repeat(4000);
    let (_, code, _) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &format!("x-big: {big}"),
        &format!("{base}/h"),
    ]);
    assert_eq!(code, "431");
    // A body over IN, announced and chunked.
    let (_, code, _) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--data-binary",
        &"b".repeat(2000),
        &format!("{base}/b"),
    ]);
    assert_eq!(code, "413");
    let (_, code, _) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &"c".repeat(2000),
        &format!("{base}/c"),
    ]);
    assert_eq!(code, "413");
    // Smuggling: Content-Length with Transfer-Encoding. The chunked body wins, the
    // connection is closed after the answer and the hidden request is never served.
    let r = raw(
        port,
        b"POST /front HTTP/1.1\r\nhost: x\r\ncontent-length: 40\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
    );
    assert_eq!(r.matches("HTTP/1.1").count(), 1, "{r}");
    assert!(r.contains("connection: close"), "{r}");
    // Not HTTP at all.
    assert!(raw(port, b"\x16\x03\x01\x00\x05hello\r\n\r\n").starts_with("HTTP/1.1 400"));
    // A handler error: 500 with nothing of the error in the answer.
    let (_, out, _) = curl(&["-D", "-", &format!("{base}/fail")]);
    assert!(out.starts_with("HTTP/1.1 500"), "{out}");
    assert!(
        !out.contains("boom") && !out.contains("start.lua") && !out.contains("traceback"),
        "{out}"
    );
    let (_, seen, _) = curl(&[&format!("{base}/seen")]);
    assert!(!seen.contains("smuggled") && seen.contains("/front"), "{seen}");
    assert!(
        !seen.contains("/h,") && !seen.contains("/b,") && !seen.contains("/slow"),
        "{seen}"
    );
    let log = node.stop();
    for want in [
        "408, no complete request head within 700 ms",
        "431, request head over 2048 bytes",
        "413, POST /b: content-length 2000 over IN limit 1024",
        "413, POST /c: body over IN limit 1024",
        "400, bad request",
        "POST /front: content-length and transfer-encoding together",
        "GET /fail from 127.0.0.1",
        "500, error in handler: package/start.lua",
        "boom in the handler",
        "stack traceback:",
    ] {
        assert!(log.contains(want), "log lacks {want:?}:\n{log}");
    }
}

#[test]
fn https_http2_and_garbage_handshakes() {
    let home = TestHome::new();
    let (ca, cert, key) = stage::net::tls::make_test_ca(home.path()).expect("test CA");
    assert!(cert.starts_with(home.path()) && key.starts_with(home.path()));
    // The certificate comes from stage.json's #tls (paths relative to the home).
    home.write(
        "conf/stage.json",
        r##"{"#tls": {"cert": "cert.pem", "key": "key.pem"}}"##,
    );
    let mut node = Node::start_in(
        home,
        &format!("{APP}\nlocal p = assert(broker.ready('https://127.0.0.1:0', app))\nwrite(PORTFILE, tostring(p.port))\n"),
    );
    let port = node.port();
    let url = format!("https://localhost:{port}/x");
    let resolve = format!("localhost:{port}:127.0.0.1");
    let ca = ca.to_str().unwrap();
    let (ok, out, err) = curl(&[
        "--cacert",
        ca,
        "--resolve",
        &resolve,
        "--http2",
        "-w",
        " %{http_version}",
        &url,
    ]);
    assert!(ok, "{err}");
    assert_eq!(out, "GET /x 0 nil 2");
    let (ok, out, err) = curl(&[
        "--cacert",
        ca,
        "--resolve",
        &resolve,
        "--http1.1",
        "-w",
        " %{http_version}",
        "-d",
        "abc",
        &format!("https://localhost:{port}/json"),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains(r#""v":"HTTP/1.1""#) && out.ends_with(" 1.1"),
        "{out}"
    );
    let (_, out, _) = curl(&[
        "--cacert",
        ca,
        "--resolve",
        &resolve,
        "--http2",
        &format!("https://localhost:{port}/json"),
    ]);
    assert!(out.contains(r#""v":"HTTP/2""#), "{out}");
    // Without the CA, curl refuses the certificate: it is really checked.
    let (ok, _, err) = curl(&["--resolve", &resolve, &url]);
    assert!(!ok && err.to_lowercase().contains("certificate"), "{err}");
    // Garbage instead of a ClientHello: closed, logged; the next client is served.
    let r = raw(port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n");
    assert!(!r.contains("200"), "{r}");
    let (ok, out, _) = curl(&["--cacert", ca, "--resolve", &resolve, &url]);
    assert!(ok && out.starts_with("GET /x"), "{out}");
    let log = node.stop();
    assert!(log.contains("tls handshake failed"), "{log}");
    assert!(log.contains("(https)"), "{log}");
}

#[test]
fn ready_errors_name_the_problem() {
    let mut node = Node::start(
        r#"
local p, e = broker.ready("https://127.0.0.1:0", function() end)
print("NOCERT", p, e)
p, e = broker.ready("https://127.0.0.1:0", function() end, { cert = "nope.pem", key = "nope.pem" })
print("MISSING", p, e)
p, e = broker.ready("http://127.0.0.1:0", function() end, { max_body = "lots" })
print("BADSIZE", p, e)
p, e = broker.ready("http://127.0.0.1:0?bson", function() end)
print("QUERY", p, e)
write(PORTFILE, "1")
"#,
    );
    node.port();
    std::thread::sleep(Duration::from_millis(200));
    let log = node.stop();
    for want in [
        "NOCERT\t-1\tbroker.ready https://127.0.0.1:0: TLS needs a certificate and a key",
        "MISSING\t-1\tbroker.ready https://127.0.0.1:0: cannot read certificate",
        "BADSIZE\t-1\tbroker.ready http://127.0.0.1:0: options.max_body: bad size 'lots'",
        "QUERY\t-1\tbad broker uri 'http://127.0.0.1:0?bson': http takes no ?framing",
    ] {
        assert!(log.contains(want), "log lacks {want:?}:\n{log}");
    }
}
