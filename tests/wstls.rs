//! `ws://`, `wss://` and `tls://` in the broker, served and joined, driven by clients no one
//! here wrote: Python `websockets` (WebSocket, also over TLS), Python `ssl` (tls://), a CA
//! made by `openssl` in the test, and raw sockets for what those will not send (an invalid
//! UTF-8 text frame, garbage instead of a TLS ClientHello). Bad input is closed with the
//! right code and a log line while a well-behaved client, connected at the same time, is
//! still served.

mod harness;

use harness::{wait_with_output, TestHome};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A node started from a script; killed on drop. The script writes its ports, separated by
/// spaces, to `PORTFILE`.
struct Node {
    home: TestHome,
    child: Option<Child>,
}

impl Node {
    fn start(home: TestHome, script: &str) -> Node {
        let portfile = home.path().join("port");
        home.write(
            "package/start.lua",
            &format!(
                "PORTFILE = {:?}\nDIR = {:?}\n{script}",
                portfile.to_str().unwrap(),
                home.path().to_str().unwrap()
            ),
        );
        let child = home.spawn();
        Node {
            home,
            child: Some(child),
        }
    }

    fn ports(&mut self, n: usize) -> Vec<u16> {
        let path = self.home.path().join("port");
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(15) {
            if let Ok(s) = std::fs::read_to_string(&path) {
                let p: Vec<u16> = s.split_whitespace().filter_map(|w| w.parse().ok()).collect();
                if p.len() == n {
                    return p;
                }
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("node exited early ({st}):\n{}", self.stop());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("node did not write its ports:\n{}", self.stop());
    }

    /// Waits until the home holds `rel` (written by the script); its contents.
    fn file(&mut self, rel: &str) -> String {
        let path = self.home.path().join(rel);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(15) {
            if let Ok(s) = std::fs::read_to_string(&path) {
                if !s.is_empty() {
                    return s;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the script did not write {rel}:\n{}", self.stop());
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

/// The Python clients: `websockets` (sync API) and `ssl`, BSON by pymongo's `bson`.
const CLIENT: &str = r#"
import sys, ssl, socket, time, bson
from websockets.sync.client import connect

def ctx(ca):
    return ssl.create_default_context(cafile=ca)

mode, args = sys.argv[1], sys.argv[2:]
if mode == "ws-bson":
    # url n pause_ms [ca]: n documents sent at once, the echoes checked in order, then
    # n more one at a time with a pause between (a client kept busy while others misbehave).
    url, n, pause = args[0], int(args[1]), int(args[2]) / 1000
    kw = {"ssl": ctx(args[3])} if url.startswith("wss") else {}
    with connect(url, max_size=None, open_timeout=10, close_timeout=10, **kw) as ws:
        for i in range(n):
            ws.send(bson.encode({"i": i, "s": "x" * i, "t": {"a": [1, 2]}}))
        for i in range(n):
            d = bson.decode(ws.recv(timeout=10))["echo"]
            assert d["i"] == i and d["s"] == "x" * i and d["t"] == {"a": [1, 2]}, d
        for i in range(n):
            ws.send(bson.encode({"i": i}))
            d = bson.decode(ws.recv(timeout=10))
            assert d["echo"]["i"] == i, d
            time.sleep(pause)
    print("ok", n)
elif mode == "ws-text":
    url = args[0]
    kw = {"ssl": ctx(args[1])} if url.startswith("wss") else {}
    with connect(url, open_timeout=10, close_timeout=10, **kw) as ws:
        for w in ["hello", "héllo wörld", "a\nb"]:
            ws.send(w)
            r = ws.recv(timeout=10)
            assert r == "re:" + w, r
    print("ok text")
elif mode == "ws-refused":
    try:
        with connect(args[0], open_timeout=10) as ws:
            print("unexpected: connected")
    except Exception as e:
        print("refused:", e)
elif mode == "tls-lines":
    # port ca n pause_ms: n lines at once, then n one at a time.
    port, ca, n, pause = int(args[0]), args[1], int(args[2]), int(args[3]) / 1000
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with ctx(ca).wrap_socket(s, server_hostname="localhost") as t:
            f = t.makefile("rwb")
            for i in range(n):
                f.write(b"line %d\n" % i)
            f.flush()
            for i in range(n):
                r = f.readline()
                assert r == b"tls:line %d\n" % i, r
            for i in range(n):
                f.write(b"one %d\n" % i)
                f.flush()
                assert f.readline() == b"tls:one %d\n" % i
                time.sleep(pause)
            print("ok tls", t.version())
elif mode == "tls-untrusted":
    port = int(args[0])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            with ssl.create_default_context().wrap_socket(s, server_hostname="localhost") as t:
                print("unexpected: trusted")
    except ssl.SSLCertVerificationError as e:
        print("untrusted:", e.verify_message)
"#;

fn python(args: &[&str]) -> Child {
    Command::new("python3")
        .arg("-c")
        .arg(CLIENT)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/setup installs it and the websockets package)")
}

/// Waits for a Python client; its stdout, or a panic with its stderr.
fn finish(c: Child) -> String {
    let out = c.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Opens a WebSocket by hand, sends `frames` (client frames, zero mask) and returns the
/// status line of the answer and the bytes the server sent after the head until it closed.
fn raw_ws(port: u16, path: &str, frames: &[u8]) -> (String, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap() == 1 {
        head.push(b[0]);
    }
    s.write_all(frames).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let head = String::from_utf8_lossy(&head).into_owned();
    (head.lines().next().unwrap_or("").to_string(), rest)
}

/// A masked client frame with a zero mask (the payload goes as is).
fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    f.extend_from_slice(payload);
    f
}

/// The server frames in `b`: (opcode, payload).
fn server_frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut v = vec![];
    while b.len() >= 2 {
        let (op, len) = (b[0] & 0x0f, (b[1] & 0x7f) as usize);
        assert!(len < 126 && b[1] & 0x80 == 0, "{b:?}");
        v.push((op, b[2..2 + len].to_vec()));
        b = &b[2 + len..];
    }
    v
}

/// The echo servers of these tests: BSON (`{echo = msg, path = socket.path}`), text
/// (`re:` + line), tls:// lines (`tls:` + line).
const SERVERS: &str = r#"
local bsonp = assert(broker.ready("ws://127.0.0.1:0/game?bson", function (socket, addr)
    return function (s, msg) return { echo = msg, path = s.path } end
end))
local textp = assert(broker.ready("ws://127.0.0.1:0/chat?text", function ()
    return function (s, line) return "re:" .. line end
end))
"#;

#[test]
fn ws_bson_and_text_echo_with_bad_frames_while_served() {
    let mut node = Node::start(
        TestHome::new(),
        &format!("{SERVERS}\nwrite(PORTFILE, bsonp.port .. ' ' .. textp.port)\n"),
    );
    let p = node.ports(2);
    let (bp, tp) = (p[0], p[1]);
    // A good client that stays connected (40 messages 25 ms apart after its burst) while
    // the bad ones below come and go.
    let good = python(&["ws-bson", &format!("ws://127.0.0.1:{bp}/game?x=1"), "40", "25"]);
    assert_eq!(
        finish(python(&["ws-text", &format!("ws://127.0.0.1:{tp}/chat")])),
        "ok text\n"
    );
    // Invalid UTF-8 in a text frame: the good line before it is answered, then 1007.
    let mut two = frame(1, b"hi");
    two.extend(frame(1, b"\xff\xfe"));
    let (status, rest) = raw_ws(tp, "/chat", &two);
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    let f = server_frames(&rest);
    assert_eq!(f[0], (1, b"re:hi".to_vec()), "{f:?}");
    assert_eq!(f[1].0, 8, "{f:?}");
    assert_eq!(u16::from_be_bytes([f[1].1[0], f[1].1[1]]), 1007, "{f:?}");
    // Text on a bson socket: 1003; a binary message that is not one document: 1007.
    let (_, rest) = raw_ws(bp, "/game", &frame(1, b"{}"));
    assert_eq!(&server_frames(&rest)[0].1[..2], &1003u16.to_be_bytes());
    let (_, rest) = raw_ws(bp, "/game", &frame(2, &[9, 0, 0, 0, 0]));
    assert_eq!(&server_frames(&rest)[0].1[..2], &1007u16.to_be_bytes());
    // A document whose content is broken (a string running past the end): 1007 as well.
    let (_, rest) = raw_ws(bp, "/game", &frame(2, &[12, 0, 0, 0, 2, b'a', 0, 99, 0, 0, 0, 0]));
    assert_eq!(&server_frames(&rest)[0].1[..2], &1007u16.to_be_bytes());
    // A wrong path: 404, no upgrade; the Python client sees the refusal.
    let (status, _) = raw_ws(bp, "/other", b"");
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    let out = finish(python(&["ws-refused", &format!("ws://127.0.0.1:{bp}/nope")]));
    assert!(out.starts_with("refused:") && out.contains("404"), "{out}");
    // The good client saw every echo, in order, throughout.
    assert_eq!(finish(good), "ok 40\n");
    let log = node.stop();
    for want in [
        "(ws /game, bson)",
        "(ws /chat, text)",
        "text message is not valid UTF-8",
        "(1007)",
        "text message on a bson socket",
        "(1003)",
        "message is not a valid BSON document",
        "websocket handshake refused with 404 Not Found for /other",
    ] {
        assert!(log.contains(want), "log lacks {want:?}:\n{log}");
    }
}

/// A home with a test CA, its certificate in stage.json's `#tls`; returns the CA path.
fn tls_home() -> (TestHome, PathBuf) {
    let home = TestHome::new();
    let (ca, _, _) = stage::net::tls::make_test_ca(home.path()).expect("test CA");
    home.write(
        "conf/stage.json",
        r##"{"#tls": {"cert": "cert.pem", "key": "key.pem", "ca": "ca.pem"}}"##,
    );
    (home, ca)
}

#[test]
fn tls_and_wss_with_a_test_ca_and_garbage_handshakes() {
    let (home, ca) = tls_home();
    let ca = ca.to_str().unwrap().to_string();
    // tls:// with the pair from the options, wss:// with #tls from stage.json.
    let mut node = Node::start(
        home,
        r#"
local tlsp = assert(broker.ready("tls://127.0.0.1:0?text", function ()
    return function (s, line) return "tls:" .. line end
end, { cert = "cert.pem", key = "key.pem" }))
local wssp = assert(broker.ready("wss://127.0.0.1:0/game?bson", function ()
    return function (s, msg) return { echo = msg } end
end))
write(PORTFILE, tlsp.port .. ' ' .. wssp.port)
"#,
    );
    let p = node.ports(2);
    let (tp, wp) = (p[0], p[1]);
    let good_tls = python(&["tls-lines", &tp.to_string(), &ca, "30", "25"]);
    let good_wss = python(&["ws-bson", &format!("wss://localhost:{wp}/game"), "30", "25", &ca]);
    // Garbage instead of a ClientHello, on both ports: closed without an answer, logged.
    for port in [tp, wp] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        let mut v = vec![];
        let _ = s.read_to_end(&mut v);
        assert!(!String::from_utf8_lossy(&v).contains("HTTP/1.1"), "{v:?}");
    }
    // A client without the CA refuses the certificate: it is really checked.
    let out = finish(python(&["tls-untrusted", &tp.to_string()]));
    assert!(out.starts_with("untrusted:"), "{out}");
    assert!(finish(good_tls).starts_with("ok tls TLSv1."));
    assert_eq!(finish(good_wss), "ok 30\n");
    let log = node.stop();
    for want in ["(tls, text)", "(wss /game, bson)", "tls handshake failed"] {
        assert!(log.contains(want), "log lacks {want:?}:\n{log}");
    }
    assert!(
        log.matches("tls handshake failed").count() >= 3,
        "garbage on both ports and the untrusting client:\n{log}"
    );
}

#[test]
fn join_over_tls_ws_and_wss() {
    let (home, _) = tls_home();
    // The node joins its own ports: tls:// and wss:// trust the test CA by #tls.ca (and
    // by options.ca), ws:// needs nothing. Each joined socket sends one frame and writes
    // the reply to a file.
    let mut node = Node::start(
        home,
        &format!(
            r#"{SERVERS}
local tlsp = assert(broker.ready("tls://127.0.0.1:0?text", function ()
    return function (s, line) return "tls:" .. line end
end))
local wssp = assert(broker.ready("wss://127.0.0.1:0/sec?bson", function ()
    return function (s, msg) return {{ echo = msg, path = s.path }} end
end))
local function try(name, uri, first, opts)
    local s, e = broker.join(uri, function (socket, addr)
        return function (s, reply)
            write(DIR .. "/" .. name, type(reply) == "table" and (reply.echo.n .. " " .. reply.path) or reply)
            s.close()
        end
    end, opts)
    if type(s) ~= "table" then write(DIR .. "/" .. name, "error: " .. tostring(e)) return end
    s.commit(first)
end
try("j-tls", "tls://127.0.0.1:" .. tlsp.port .. "?text", "over tls")
try("j-ws", "ws://127.0.0.1:" .. bsonp.port .. "/game?bson", {{ n = 7 }})
try("j-wss", "wss://127.0.0.1:" .. wssp.port .. "/sec?bson", {{ n = 8 }}, {{ ca = "ca.pem" }})
try("j-wtext", "ws://127.0.0.1:" .. textp.port .. "/chat?text", "hey")
-- Refusals come back as errno and message.
try("j-404", "ws://127.0.0.1:" .. bsonp.port .. "/nowhere?bson", {{}})
try("j-name", "tls://127.0.0.1:" .. tlsp.port .. "?text", "x", {{ name = "other.example" }})
try("j-refused", "tls://127.0.0.1:1?text", "x")
-- socket.crypto over ws://: the port's key reaches the connection it accepts; both ways
-- the documents travel encrypted (high bit of the length) and are opened.
local encp = assert(broker.ready("ws://127.0.0.1:0/enc?packet", function ()
    return function (s, msg) return {{ echo = msg, path = s.path }} end
end))
encp.crypto = "ws crypto key"
local es = assert(broker.join("ws://127.0.0.1:" .. encp.port .. "/enc?packet", function ()
    return function (s, reply)
        write(DIR .. "/j-wenc", reply.echo.n .. " " .. reply.path)
        s.close()
    end
end))
es.crypto = "ws crypto key"
es.commit({{ n = 11 }})
write(PORTFILE, "1")
"#
        ),
    );
    node.ports(1);
    // A text line arrives with its newline (STAGE), and the reply keeps it.
    assert_eq!(node.file("j-tls"), "tls:over tls\n");
    assert_eq!(node.file("j-ws"), "7 /game");
    assert_eq!(node.file("j-wss"), "8 /sec");
    assert_eq!(node.file("j-wtext"), "re:hey");
    assert_eq!(node.file("j-wenc"), "11 /enc");
    let e = node.file("j-404");
    assert!(
        e.starts_with("error: broker.join ws://") && e.contains("404"),
        "{e}"
    );
    let e = node.file("j-name");
    assert!(
        e.contains("tls handshake failed") && e.contains("certificate"),
        "{e}"
    );
    let e = node.file("j-refused");
    assert!(e.contains("tls://127.0.0.1:1") && e.contains("refused"), "{e}");
    node.stop();
}

#[test]
fn stage_send_speaks_ws_and_wss() {
    let (home, ca) = tls_home();
    let root = home.path().to_path_buf();
    let mut node = Node::start(
        home,
        &format!(
            r#"{SERVERS}
local wssp = assert(broker.ready("wss://127.0.0.1:0/game?bson", function ()
    return function (s, msg) return {{ echo = msg }} end
end))
write(PORTFILE, bsonp.port .. ' ' .. textp.port .. ' ' .. wssp.port)
"#
        ),
    );
    let p = node.ports(3);
    let send = |args: &[&str]| {
        let out = Command::new(harness::stage_bin())
            .arg("send")
            .args(args)
            .current_dir(&root)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = send(&[&format!("ws://127.0.0.1:{}/game?bson", p[0]), r#"{"a":1}"#]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "{\"echo\":{\"a\":1},\"path\":\"/game\"}\n");
    let (code, out, err) = send(&[&format!("ws://127.0.0.1:{}/chat?text", p[1]), "hello"]);
    assert_eq!((code, out.as_str()), (Some(0), "re:hello\n"), "{err}");
    let ca_arg = format!("--ca={}", ca.display());
    let (code, out, err) = send(&[
        &ca_arg,
        &format!("wss://localhost:{}/game?bson", p[2]),
        r#"{"b":"x"}"#,
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "{\"echo\":{\"b\":\"x\"}}\n");
    // Without the CA: a clear refusal.
    let (code, _, err) = send(&[&format!("wss://localhost:{}/game?bson", p[2]), "{}"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("certificate"), "{err}");
    node.stop();
}
