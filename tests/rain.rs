//! The Rain example package (stage/package/rain.lua) end to end: a node serving Rain over
//! BSON TCP against the Vultr emulator, driven by a BSON client written here (independent
//! of the broker's codec) and by Python's `bson` (pymongo, installed by scripts/setup):
//! Ping, List, two concurrent CreateRequests each answered by ResponseCreate then
//! CreateDone, a failing CreateRequest, and ServerList.

mod harness;

use serde_json::{json, Map, Value as Json};
use stage::cloud::vultr_emulator::{Emulator, EmulatorConfig, Lifecycle};
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const KEY: &str = "RAIN-TEST-KEY";

// ---- a small BSON codec for the client side ----------------------------------------

fn cstring(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn encode_doc(entries: Vec<(String, &Json)>) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in entries {
        match v {
            Json::Null => {
                body.push(0x0A);
                cstring(&mut body, &k);
            }
            Json::Bool(b) => {
                body.push(0x08);
                cstring(&mut body, &k);
                body.push(u8::from(*b));
            }
            Json::Number(n) if n.is_i64() => {
                body.push(0x12);
                cstring(&mut body, &k);
                body.extend_from_slice(&n.as_i64().unwrap().to_le_bytes());
            }
            Json::Number(n) => {
                body.push(0x01);
                cstring(&mut body, &k);
                body.extend_from_slice(&n.as_f64().unwrap().to_le_bytes());
            }
            Json::String(s) => {
                body.push(0x02);
                cstring(&mut body, &k);
                body.extend_from_slice(&(s.len() as i32 + 1).to_le_bytes());
                cstring(&mut body, s);
            }
            Json::Array(a) => {
                body.push(0x04);
                cstring(&mut body, &k);
                body.extend(encode_doc(
                    a.iter().enumerate().map(|(i, x)| (i.to_string(), x)).collect(),
                ));
            }
            Json::Object(m) => {
                body.push(0x03);
                cstring(&mut body, &k);
                body.extend(encode(m));
            }
        }
    }
    let mut out = ((body.len() + 5) as i32).to_le_bytes().to_vec();
    out.extend(body);
    out.push(0);
    out
}

fn encode(m: &Map<String, Json>) -> Vec<u8> {
    encode_doc(m.iter().map(|(k, v)| (k.clone(), v)).collect())
}

fn decode(b: &[u8], array: bool) -> Json {
    let mut m = Map::new();
    let mut items = Vec::new();
    let mut i = 4;
    while b[i] != 0 {
        let t = b[i];
        i += 1;
        let end = i + b[i..].iter().position(|&c| c == 0).unwrap();
        let key = String::from_utf8(b[i..end].to_vec()).unwrap();
        i = end + 1;
        let le32 = |at: usize| i32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
        let v = match t {
            0x01 => {
                i += 8;
                json!(f64::from_le_bytes(b[i - 8..i].try_into().unwrap()))
            }
            0x02 => {
                let n = le32(i);
                i += 4 + n;
                json!(String::from_utf8(b[i - n..i - 1].to_vec()).unwrap())
            }
            0x03 | 0x04 => {
                let n = le32(i);
                i += n;
                decode(&b[i - n..i], t == 0x04)
            }
            0x05 => {
                let n = le32(i);
                i += 5 + n;
                json!(String::from_utf8_lossy(&b[i - n..i]))
            }
            0x08 => {
                i += 1;
                json!(b[i - 1] != 0)
            }
            0x0A => Json::Null,
            0x10 => {
                i += 4;
                json!(i32::from_le_bytes(b[i - 4..i].try_into().unwrap()))
            }
            0x12 => {
                i += 8;
                json!(i64::from_le_bytes(b[i - 8..i].try_into().unwrap()))
            }
            other => panic!("unexpected BSON type {other:#x} at {key}"),
        };
        if array {
            items.push(v);
        } else {
            m.insert(key, v);
        }
    }
    if array {
        Json::Array(items)
    } else {
        Json::Object(m)
    }
}

struct RainClient {
    stream: TcpStream,
}

impl RainClient {
    fn send(&mut self, v: Json) {
        self.stream.write_all(&encode(v.as_object().unwrap())).unwrap();
    }

    fn recv(&mut self) -> Json {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).expect("a reply from rain");
        let n = i32::from_le_bytes(len) as usize;
        let mut doc = len.to_vec();
        doc.resize(n, 0);
        self.stream.read_exact(&mut doc[4..]).unwrap();
        decode(&doc, false)
    }
}

/// A node serving stage/package/rain.lua on a free port against its own emulator.
struct RainNode {
    _emu: Emulator,
    _home: harness::TestHome,
    node: Option<std::process::Child>,
    port: u16,
}

impl RainNode {
    fn start() -> RainNode {
        let emu = Emulator::start(
            "127.0.0.1:0".parse().unwrap(),
            EmulatorConfig {
                api_key: KEY.into(),
                lifecycle: Lifecycle::scaled(Duration::from_millis(200)),
                ..Default::default()
            },
        )
        .unwrap();
        let home = harness::TestHome::new();
        home.write(
            "conf/stage.json",
            &json!({"%vultr": {"endpoint": emu.endpoint(), "api_key": KEY}}).to_string(),
        );
        let rain =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/stage/package/rain.lua")).unwrap();
        home.write("package/rain.lua", &rain);
        let port_file = home.path().join("port");
        home.write(
            "package/start.lua",
            &format!(
                r#"local rain = stage.load("rain")
                   local port = check(rain.serve("tcp://127.0.0.1:0?bson=4k,1m", {{ timeout = 15000, interval = 20 }}), "rain listens")
                   write({:?}, tostring(port.port))"#,
                port_file.display().to_string()
            ),
        );
        let mut node = home.spawn();
        let start = Instant::now();
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break p;
            }
            if start.elapsed() > Duration::from_secs(15) || node.try_wait().unwrap().is_some() {
                let (_, log) = harness::wait_with_output(node, Duration::from_millis(1));
                panic!("rain did not start listening:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        RainNode {
            _emu: emu,
            _home: home,
            node: Some(node),
            port,
        }
    }

    /// Runs `f`; if it panics, prints the node's log before passing the panic on.
    fn check(mut self, f: impl FnOnce(u16) + std::panic::UnwindSafe) {
        let result = std::panic::catch_unwind(|| f(self.port));
        let (_, log) = harness::wait_with_output(self.node.take().unwrap(), Duration::from_millis(1));
        if let Err(e) = result {
            eprintln!("node log:\n{log}");
            std::panic::resume_unwind(e);
        }
    }
}

#[test]
fn rain_over_bson() {
    RainNode::start().check(|port| {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = RainClient { stream };

        c.send(json!({"Ping": "hello"}));
        assert_eq!(c.recv(), json!({"Pong": "hello"}));

        c.send(json!({"List": {}}));
        let list = c.recv();
        let all = &list["RespondList"];
        assert!(
            all["regions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["id"] == "icn"),
            "{list}"
        );
        assert!(
            all["plans"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["id"] == "vc2-1c-1gb"),
            "{list}"
        );
        assert!(
            all["os"].as_array().unwrap().iter().any(|o| o["id"] == 1743),
            "{list}"
        );

        // Two creates in flight on one connection, then a Ping that must not wait for them.
        c.send(json!({"CreateRequest": {"region": "icn", "plan": "vc2-1c-1gb", "os_id": 1743}}));
        c.send(json!({"CreateRequest": {"region": "nrt", "plan": "vc2-1c-2gb", "os_id": 2136, "label": "second"}}));
        c.send(json!({"Ping": 7}));
        let mut ids = Vec::new();
        for _ in 0..2 {
            let r = c.recv();
            ids.push(
                r["ResponseCreate"]
                    .as_str()
                    .unwrap_or_else(|| panic!("expected ResponseCreate, got {r}"))
                    .to_string(),
            );
        }
        assert_eq!(
            c.recv(),
            json!({"Pong": 7}),
            "the connection is served while the creates wait"
        );
        let mut done = HashSet::new();
        for _ in 0..2 {
            let r = c.recv();
            let inst = &r["CreateDone"];
            assert_eq!(
                (
                    inst["status"].as_str(),
                    inst["power_status"].as_str(),
                    inst["server_status"].as_str()
                ),
                (Some("active"), Some("running"), Some("ok")),
                "{r}"
            );
            assert_ne!(inst["main_ip"], "0.0.0.0");
            done.insert(inst["id"].as_str().unwrap().to_string());
        }
        assert_eq!(
            done,
            ids.iter().cloned().collect::<HashSet<_>>(),
            "each create completed once"
        );

        c.send(json!({"CreateRequest": {"region": "mars", "plan": "vc2-1c-1gb", "os_id": 1743}}));
        let r = c.recv();
        let reason = r["CreateFailed"]["reason"]
            .as_str()
            .unwrap_or_else(|| panic!("expected CreateFailed, got {r}"));
        assert!(reason.contains("http 400: Invalid region: mars."), "{reason}");

        c.send(json!({"ServerList": {}}));
        let r = c.recv();
        let servers = r["ResponseServerList"]
            .as_array()
            .unwrap_or_else(|| panic!("{r}"));
        let listed: HashSet<String> = servers
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(listed, done);
        assert!(servers
            .iter()
            .all(|s| s["tags"].as_array().unwrap().iter().any(|t| t == "rain")));

        c.send(json!({"Dance": 1}));
        assert!(c.recv()["Error"].as_str().unwrap().starts_with("unknown request Dance"));
    });
}

/// The same server through Python's `bson` (pymongo), a client no one here wrote.
#[test]
fn rain_with_python_bson() {
    RainNode::start().check(|port| {
        let script = r#"
import bson, socket, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.settimeout(20)
def recv():
    hdr = s.recv(4, socket.MSG_WAITALL)
    n = struct.unpack("<i", hdr)[0]
    return bson.decode(hdr + s.recv(n - 4, socket.MSG_WAITALL))
s.sendall(bson.encode({"Ping": "py"}))
assert recv() == {"Pong": "py"}
s.sendall(bson.encode({"CreateRequest": {"region": "fra", "plan": "vc2-1c-1gb", "os_id": 2284}}))
s.sendall(bson.encode({"CreateRequest": {"region": "lax", "plan": "vc2-2c-4gb", "os_id": 1743}}))
ids = [recv()["ResponseCreate"] for _ in range(2)]
done = [recv()["CreateDone"] for _ in range(2)]
assert sorted(d["id"] for d in done) == sorted(ids), (ids, done)
for d in done:
    assert (d["status"], d["power_status"], d["server_status"]) == ("active", "running", "ok"), d
s.sendall(bson.encode({"ServerList": {}}))
servers = recv()["ResponseServerList"]
assert sorted(x["id"] for x in servers) == sorted(ids), servers
print("ok", len(servers))
"#;
        let out = std::process::Command::new("python3")
            .args(["-c", script, &port.to_string()])
            .output()
            .expect("python3 (scripts/setup installs pymongo)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "python client failed: {text}");
        assert_eq!(text.trim(), "ok 2");
    });
}

#[test]
fn example_home_starts_rain() {
    let home = concat!(env!("CARGO_MANIFEST_DIR"), "/stage");
    let out = std::process::Command::new(harness::stage_bin())
        .args(["check", home])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("2 instance(s)"),
        "the example home runs stage and rain: {text}"
    );
    let conf = std::fs::read_to_string(format!("{home}/conf/stage.json")).unwrap();
    assert!(conf.contains(r#""lua+rain": "rain_server""#), "{conf}");
}
