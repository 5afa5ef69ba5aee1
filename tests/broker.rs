//! The broker: Lua scenarios under tests/lua/broker/, and tests that drive a node from
//! outside with clients no one here wrote (Python's `bson`, `nc`) and raw sockets.

#[macro_use]
mod harness;

use harness::{stage_bin, wait_with_output, TestHome};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

scenarios! {
    broker_join_api => "broker/join_api.lua",
    broker_errors => "broker/errors.lua",
    broker_packet_text => "broker/packet_text.lua",
    broker_udp_ipv6 => "broker/udp_ipv6.lua",
    broker_expire_commit => "broker/expire_commit.lua",
    broker_multicast => "broker/multicast.lua",
    broker_pipeline => "broker/pipeline.lua",
    broker_large_frames => "broker/large_frames.lua",
    broker_crypto => "broker/crypto.lua",
    broker_stage_arrays => "broker/stage_arrays.lua",
}

/// A node started from a script; killed on drop. The script writes its listening port to
/// the file named by the global `PORTFILE` (instances append `process.stage` when several).
struct Node {
    home: TestHome,
    child: Option<Child>,
}

impl Node {
    fn start(conf: &str, script: &str) -> Node {
        let home = TestHome::new();
        if !conf.is_empty() {
            home.write("conf/stage.json", conf);
        }
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

    /// Waits for the port file `port<suffix>` and returns the port.
    fn port(&mut self, suffix: &str) -> u16 {
        let path = self.home.path().join(format!("port{suffix}"));
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

/// One BSON document `{key: int32}`.
fn doc_i32(key: &str, v: i32) -> Vec<u8> {
    let mut d = vec![0; 4];
    d.push(0x10);
    d.extend_from_slice(key.as_bytes());
    d.push(0);
    d.extend_from_slice(&v.to_le_bytes());
    d.push(0);
    let n = d.len() as i32;
    d[..4].copy_from_slice(&n.to_le_bytes());
    d
}

/// Reads one BSON frame (None on EOF or timeout).
fn read_doc(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let n = i32::from_le_bytes(len) as usize;
    let mut body = vec![0u8; n.checked_sub(4)?];
    s.read_exact(&mut body).ok()?;
    Some([&len[..], &body].concat())
}

/// The int32 field `key` of a flat document (enough for these tests).
fn get_i32(doc: &[u8], key: &str) -> Option<i32> {
    let mut at = 4;
    while at < doc.len() - 1 {
        let ty = doc[at];
        let kend = at + 1 + doc[at + 1..].iter().position(|&c| c == 0)?;
        let k = &doc[at + 1..kend];
        at = kend + 1;
        let size = match ty {
            0x10 => 4,
            0x12 | 0x01 | 0x09 => 8,
            0x08 => 1,
            0x02 => 4 + i32::from_le_bytes(doc[at..at + 4].try_into().ok()?) as usize,
            0x03 | 0x04 => i32::from_le_bytes(doc[at..at + 4].try_into().ok()?) as usize,
            _ => return None,
        };
        if ty == 0x10 && k == key.as_bytes() {
            return Some(i32::from_le_bytes(doc[at..at + 4].try_into().ok()?));
        }
        at += size;
    }
    None
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

const ECHO: &str = r#"
local sp = broker.ready("tcp://127.0.0.1:0?bson=1k,64k", function() return function(s, d) return d end end)
sp.expire = 1000
write(PORTFILE, tostring(sp.port))
"#;

#[test]
fn python_bson_client_round_trips_every_type() {
    let mut node = Node::start(
        "",
        r#"
local sp = broker.ready("tcp://127.0.0.1:0?bson=64k,64k", function() return function(s, d)
    local types = {}
    for k, v in pairs(d) do types[k] = (v == bundle.null) and "null" or math.type(v) or type(v) end
    -- STAGE's mapping: a date arrives as integer seconds and goes out as a date by `@D`.
    return { echo = d, types = types, when = { ["d@D"] = d.d }, null = bundle.null }
end end)
write(PORTFILE, tostring(sp.port))
"#,
    );
    let port = node.port("");
    let py = r#"
import bson, socket, struct, sys, datetime
from bson import ObjectId, Int64
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
doc = {"i": 7, "neg": -42, "big": Int64(1 << 40), "f": 1.25, "s": "héllo", "bin": b"\x00\xff\xfe",
       "t": True, "no": False, "n": None,
       "d": datetime.datetime(2024, 5, 6, 7, 8, 9, 123000),
       "o": ObjectId("0123456789abcdef01234567"),
       "sub": {"x": 1, "y": [1, "two", {"z": 3.5}]}, "arr": [10, 20, 30], "e": {}}
s.sendall(bson.encode(doc))
hdr = s.recv(4, socket.MSG_WAITALL); n = struct.unpack("<i", hdr)[0]
reply = bson.decode(hdr + s.recv(n - 4, socket.MSG_WAITALL))
echo, types = reply["echo"], reply["types"]
import calendar
secs = calendar.timegm(doc["d"].timetuple())
for k, v in doc.items():
    if k == "n":
        assert "n" not in echo, "null arrives as nil"
    elif k == "d":
        assert echo[k] == secs, (k, echo[k], secs)
    else:
        assert echo[k] == v, (k, echo[k], v)
want = {"i": "integer", "neg": "integer", "big": "integer", "f": "float", "s": "string", "bin": "string",
        "t": "boolean", "no": "boolean", "d": "integer", "o": "table", "sub": "table",
        "arr": "table", "e": "table"}
assert types == want, types
assert isinstance(echo["bin"], bytes)
assert reply["when"]["d"] == doc["d"].replace(microsecond=0), reply["when"]
assert "null" in reply and reply["null"] is None, "bundle.null goes out as null"
print("OK")
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(py)
        .arg(port.to_string())
        .output()
        .expect("python3 (scripts/setup installs pymongo)");
    let log = node.stop();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("OK"),
        "python client failed: {}\n{}\nnode log:\n{log}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn stage_send_prints_replies_as_json() {
    let mut node = Node::start(
        "",
        r#"
local sp = broker.ready("tcp://127.0.0.1:0?bson=2k,4k", function(socket, addr)
    return function (socket, data)
        if data.cmd == "login" then return { ok = true, user = data.user } end
        socket.commit({ error = "unknown cmd" })
    end
end)
write(PORTFILE, tostring(sp.port))
"#,
    );
    let addr = format!("127.0.0.1:{}", node.port(""));
    let out = Command::new(stage_bin())
        .args(["send", &addr, r#"{"cmd":"login","user":"kim"}"#])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "{\"ok\":true,\"user\":\"kim\"}\n"
    );
    // JSON lines on stdin, one reply each.
    let mut child = Command::new(stage_bin())
        .args(["send", &addr, "--timeout", "3000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"cmd\":\"login\",\"user\":\"lee\"}\n{\"cmd\":\"dance\"}\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "{\"ok\":true,\"user\":\"lee\"}\n{\"error\":\"unknown cmd\"}\n"
    );
    node.stop();
}

#[test]
fn nc_speaks_text_framing() {
    let mut node = Node::start(
        "",
        r#"
local sp = broker.ready("tcp://127.0.0.1:0?text", function() return function(s, line) return "echo:" .. line end end)
write(PORTFILE, tostring(sp.port))
"#,
    );
    let port = node.port("");
    let mut nc = Command::new("nc")
        .args(["-N", "-w", "5", "127.0.0.1", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("nc (netcat-openbsd)");
    nc.stdin.take().unwrap().write_all(b"hello\nworld\n").unwrap();
    let out = nc.wait_with_output().unwrap();
    let log = node.stop();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "echo:hello\necho:world\n",
        "{log}"
    );
}

/// STAGE's wire format spoken by a Python client: `packet` frames are BSON documents
/// decoded into tables (null → nil, dates ↔ integer seconds, `name@X` key hints on the way
/// out); an encrypted `packet` exchange with `cryptography` under STAGE's key and IV rules;
/// no framing = a raw byte stream; `text` hands the line with its newline.
#[test]
fn python_speaks_stage_packet_crypto_raw_and_text() {
    let mut node = Node::start(
        "",
        r#"
local pp = broker.ready("tcp://127.0.0.1:0?packet", function() return function(s, d)
    local types = {}
    for k, v in pairs(d) do types[k] = math.type(v) or type(v) end
    return { echo = d, types = types, ["at@D"] = d.when, ["small@i"] = 5, ["big@l"] = 7,
             ["ratio@d"] = 2, null = bundle.null, crypto = s.crypto }
end end)
local ep = broker.ready("tcp://127.0.0.1:0?packet", function() return function(s, d)
    return { got = d.secret, crypto = s.crypto }
end end)
-- Set on the port: every accepted socket inherits it (STAGE).
ep.crypto = { ["AES/CBC/PKCS5Padding"] = "0123456789abcdef-stage-key" }
local rp = broker.ready("tcp://127.0.0.1:0", function() return function(s, d)
    return "[" .. #d .. ":" .. d:gsub("%z", "0") .. "]"
end end)
local tp = broker.ready("tcp://127.0.0.1:0?text", function() return function(s, line)
    return "len=" .. #line .. (line:sub(-1) == "\n" and " nl" or "")
end end)
write(PORTFILE .. "e", tostring(ep.port))
write(PORTFILE .. "r", tostring(rp.port))
write(PORTFILE .. "t", tostring(tp.port))
write(PORTFILE, tostring(pp.port))
"#,
    );
    let ports: Vec<String> = ["", "e", "r", "t"]
        .iter()
        .map(|s| node.port(s).to_string())
        .collect();
    let py = r#"
import bson, socket, struct, sys, datetime, calendar
from bson.int64 import Int64
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives import padding
pp, ep, rp, tp = map(int, sys.argv[1:5])

def conn(p):
    s = socket.create_connection(("127.0.0.1", p)); s.settimeout(10); return s
def recv_exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        assert c, "connection closed after %d of %d bytes" % (len(b), n)
        b += c
    return b
def recv_frame(s):
    hdr = recv_exact(s, 4)
    n = struct.unpack("<I", hdr)[0] & 0x7FFFFFFF
    return hdr + recv_exact(s, n - 4)

# 1. packet: a BSON document per frame.
s = conn(pp)
when = datetime.datetime(2024, 5, 6, 7, 8, 9)
s.sendall(bson.encode({"msg": "hello", "n": None, "when": when, "list": [1, 2]}))
r = bson.decode(recv_frame(s))
secs = calendar.timegm(when.timetuple())
assert r["echo"] == {"msg": "hello", "when": secs, "list": [1, 2]}, r["echo"]
assert r["types"] == {"msg": "string", "when": "integer", "list": "table"}, r["types"]
assert r["at"] == when, ("@D is a date", r["at"])
assert type(r["small"]) is int and type(r["big"]) is Int64, ("@i int32, @l int64", r)
assert type(r["ratio"]) is float and r["ratio"] == 2.0, ("@d double", r)
assert "null" in r and r["null"] is None, "bundle.null is null"
assert r["crypto"] is False
s.close()

# 2. encrypted packet frames: AES-256-CBC, the key zero-padded to 32 bytes, IV of 16 spaces;
# the length's high bit marks the frame, doc[4:] is what is encrypted.
def aes(key):
    return Cipher(algorithms.AES(key[:32].ljust(32, b"\0")), modes.CBC(b" " * 16))
def seal(key, doc):
    p = padding.PKCS7(128).padder()
    e = aes(key).encryptor()
    ct = e.update(p.update(doc[4:]) + p.finalize()) + e.finalize()
    return struct.pack("<I", (len(ct) + 4) | 0x80000000) + ct
def unseal(key, frame):
    n = struct.unpack("<I", frame[:4])[0]
    assert n & 0x80000000, "the reply is not flagged encrypted"
    assert n & 0x7FFFFFFF == len(frame)
    d = aes(key).decryptor()
    u = padding.PKCS7(128).unpadder()
    body = u.update(d.update(frame[4:]) + d.finalize()) + u.finalize()
    return bson.decode(struct.pack("<i", len(body) + 4) + body)
KEY = b"0123456789abcdef-stage-key"
s = conn(ep)
s.sendall(seal(KEY, bson.encode({"secret": "s3cr3t"})))
assert unseal(KEY, recv_frame(s)) == {"got": "s3cr3t", "crypto": True}
# A plain frame on an encrypted socket is read as it is; the reply is still encrypted.
s.sendall(bson.encode({"secret": "plain"}))
assert unseal(KEY, recv_frame(s))["got"] == "plain"
s.close()
# A wrong key: the frame cannot be opened, the connection is closed.
s = conn(ep)
s.sendall(seal(b"not the key", bson.encode({"secret": "x"})))
assert s.recv(100) == b"", "closed on a frame it cannot decrypt"
s.close()

# 3. no framing: the bytes as they come, strings back as they are.
s = conn(rp)
s.sendall(b"ab\x00cd")
got = b""
while not got.endswith(b"]"):
    c = s.recv(100); assert c; got += c
assert got == b"[5:ab0cd]", got
s.close()

# 4. text: each line with its newline.
s = conn(tp)
s.sendall(b"one\ntwo\r\n")
got = b""
while got.count(b"\n") < 2:
    c = s.recv(100); assert c; got += c
assert got == b"len=4 nl\nlen=5 nl\n", got
s.close()
print("OK")
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(py)
        .args(&ports)
        .output()
        .expect("python3 (scripts/setup installs pymongo and cryptography)");
    let log = node.stop();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("OK"),
        "python client failed: {}\n{}\nnode log:\n{log}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        log.contains("cannot decrypt"),
        "the undecryptable frame is logged:\n{log}"
    );
}

/// Connects `n` clients and returns the `(pid, instance)` each was served by.
fn who_serves(port: u16, n: usize) -> Vec<(i32, i32)> {
    (0..n)
        .map(|i| {
            let mut s = connect(port);
            s.write_all(&doc_i32("i", i as i32)).unwrap();
            let d = read_doc(&mut s).expect("reply");
            (get_i32(&d, "pid").unwrap(), get_i32(&d, "inst").unwrap())
        })
        .collect()
}

fn free_port() -> u16 {
    // A random port in 20000..60000 that is free now (several engineers test at once).
    for _ in 0..100 {
        let p = 20000
            + (std::process::id() as u16)
                .wrapping_mul(7919)
                .wrapping_add(Instant::now().elapsed().subsec_nanos() as u16)
                % 40000;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no free port");
}

fn shared_script(port: u16) -> String {
    format!(
        r#"
local sp = broker.ready("tcp://127.0.0.1:{port}?bson", function() return function(s, d)
    return {{ pid = process.id, inst = process.stage }}
end end)
check(type(sp) == "table", "listen: " .. tostring(sp))
write(PORTFILE .. process.stage, tostring(sp.port))
"#
    )
}

#[test]
fn two_processes_share_a_services_port() {
    let port = free_port();
    let conf = format!(r##"{{"#services": {{"tcp": ["127.0.0.1:{port}"]}}}}"##);
    let mut a = Node::start(&conf, &shared_script(port));
    a.port("0");
    let mut b = Node::start(&conf, &shared_script(port));
    b.port("0");
    let served = who_serves(port, 40);
    let mut pids: Vec<i32> = served.iter().map(|x| x.0).collect();
    pids.sort();
    pids.dedup();
    let (la, lb) = (a.stop(), b.stop());
    assert_eq!(pids.len(), 2, "both processes accept connections:\n{la}\n{lb}");
}

#[test]
fn two_instances_share_a_services_port() {
    let port = free_port();
    let conf = format!(
        r##"{{"#services": {{"tcp": ["127.0.0.1:{port}"]}}, "#startup": [["lua+stage"], ["lua+stage"]]}}"##
    );
    let mut a = Node::start(&conf, &shared_script(port));
    a.port("0");
    a.port("1");
    let mut inst: Vec<i32> = who_serves(port, 40).iter().map(|x| x.1).collect();
    inst.sort();
    inst.dedup();
    let log = a.stop();
    assert_eq!(inst, vec![0, 1], "both instances accept connections:\n{log}");
}

#[test]
fn thousand_concurrent_connections() {
    let mut node = Node::start("", ECHO);
    let port = node.port("");
    let mut conns: Vec<TcpStream> = (0..1000).map(|_| connect(port)).collect();
    for (i, s) in conns.iter_mut().enumerate() {
        s.write_all(&doc_i32("n", i as i32)).unwrap();
    }
    let mut ok = 0;
    for (i, s) in conns.iter_mut().enumerate() {
        if read_doc(s).and_then(|d| get_i32(&d, "n")) == Some(i as i32) {
            ok += 1;
        }
    }
    let log = node.stop();
    assert_eq!(ok, 1000, "{log}");
}

/// True when the server closes `s` within `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 1024];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

#[test]
fn bad_input_closes_only_the_offender() {
    let mut node = Node::start("", ECHO);
    let port = node.port("");
    // A well-behaved client keeps being served throughout.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let good = std::thread::spawn(move || {
        let mut s = connect(port);
        let mut served = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            s.write_all(&doc_i32("n", served)).unwrap();
            assert_eq!(read_doc(&mut s).and_then(|d| get_i32(&d, "n")), Some(served));
            served += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        served
    });
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("over IN", [&2000i32.to_le_bytes()[..], &[0u8; 100]].concat()),
        ("length below 5", 3i32.to_le_bytes().to_vec()),
        // The high bit is STAGE's encrypted flag: -1 is an encrypted frame of 2^31-1 bytes.
        ("negative length", (-1i32).to_le_bytes().to_vec()),
        (
            "encrypted frame on a socket without crypto",
            [&(20u32 | 0x8000_0000).to_le_bytes()[..], &[7u8; 16]].concat(),
        ),
        ("absurd length", i32::MAX.to_le_bytes().to_vec()),
        ("bad bson", vec![12, 0, 0, 0, 0x42, b'a', 0, 1, 0, 0, 0, 0]),
        ("half a frame", vec![20, 0, 0, 0, 0x10, b'a']),
    ];
    for (what, bytes) in &cases {
        let mut s = connect(port);
        s.write_all(bytes).unwrap();
        assert!(
            closed_within(&mut s, Duration::from_secs(5)),
            "{what}: not closed"
        );
    }
    // A flood of idle connections: all closed by port.expire, nobody else disturbed.
    let mut flood: Vec<TcpStream> = (0..300).map(|_| connect(port)).collect();
    std::thread::sleep(Duration::from_millis(1500));
    let closed = flood
        .iter_mut()
        .map(|s| closed_within(s, Duration::from_secs(3)))
        .filter(|c| *c)
        .count();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let served = good.join().expect("the good client was served throughout");
    let log = node.stop();
    assert_eq!(closed, 300, "{log}");
    assert!(served > 50, "good client served {served} times");
    for needle in [
        "exceeds bson IN limit 1024",
        "length field 3 is below the minimum 5",
        "an encrypted frame arrived but socket.crypto is not set",
        "frame of 2147483647 bytes exceeds bson IN limit 1024",
        "invalid bson at byte 4: unknown element type",
        "idle for 1000 ms",
    ] {
        assert!(log.contains(needle), "log lacks '{needle}':\n{log}");
    }
    assert!(log.contains("closed 127.0.0.1:"), "log names the peer:\n{log}");
}

#[test]
fn output_over_out_limit_closes_the_connection() {
    let mut node = Node::start(
        "",
        r#"
local sp = broker.ready("tcp://127.0.0.1:0?bson=1k,64k", function() return function(socket, d)
    local pad = string.rep("x", 1000)
    stage.addtask(1, function()
        for _ = 1, 100 do
            if socket.commit({ pad = pad }) == 0 then
                stage.sleep(200) -- let the connection's task log why it closed
                write(PORTFILE .. "closed", "1")
                return nil
            end
        end
        return 1
    end)
end end)
write(PORTFILE, tostring(sp.port))
"#,
    );
    let port = node.port("");
    let mut s = connect(port); // never reads
    s.write_all(&doc_i32("go", 1)).unwrap();
    node.port("closed");
    let log = node.stop();
    assert!(log.contains("exceeds bson OUT limit 65536"), "{log}");
}
