//! The Rain example package (stage/package/rain.lua) end to end: a node serving Rain over
//! BSON TCP against the Vultr emulator, driven by a BSON client written here (independent
//! of the broker's codec): Ping, List, two concurrent CreateRequests each answered by
//! ResponseCreate then CreateDone, a failing CreateRequest, and ServerList.

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn rain_over_bson() {
    let emu = Emulator::start(
        "127.0.0.1:0".parse().unwrap(),
        EmulatorConfig {
            api_key: KEY.into(),
            lifecycle: Lifecycle::scaled(Duration::from_millis(200)),
            ..Default::default()
        },
    )
    .unwrap();
    let port = free_port();
    let home = harness::TestHome::new();
    home.write(
        "conf/stage.json",
        &json!({"%vultr": {"endpoint": emu.endpoint(), "api_key": KEY}}).to_string(),
    );
    let rain =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/stage/package/rain.lua")).unwrap();
    home.write("package/rain.lua", &rain);
    home.write(
        "package/start.lua",
        &format!(
            r#"local rain = stage.load("rain")
               check(rain.serve("tcp://127.0.0.1:{port}?bson=4k,1m", {{ timeout = 15000, interval = 20 }}), "rain listens")"#
        ),
    );
    let node = home.spawn();
    let result = std::panic::catch_unwind(|| {
        let start = Instant::now();
        let stream = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(_) if start.elapsed() < Duration::from_secs(15) => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("rain does not listen on {port}: {e}"),
            }
        };
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
        assert!(c.recv()["Error"]
            .as_str()
            .unwrap()
            .starts_with("unknown request Dance"));
    });
    let (_, log) = harness::wait_with_output(node, Duration::from_millis(1));
    if let Err(e) = result {
        eprintln!("node log:\n{log}");
        std::panic::resume_unwind(e);
    }
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
