//! The cluster with real processes on loopback: three `stage run` nodes (requests, `*`,
//! `+`/`=` scopes, 1 MiB values, the direction rule, FIFO), `kill -9` detection, re-route,
//! fail-over and rejoin (times printed), and the key: wrong key, no key, forged, replayed and
//! truncated datagrams refused and counted while the cluster keeps working.

#[macro_use]
mod harness;

scenarios! {
    no_cluster => "cluster/no_cluster.lua",
}

use harness::{free_udp_port, stage_bin, stop, wait_with_output, TestHome};
use stage::cluster::engine::{Engine, Sink, StageLoad, Transport};
use stage::router::{Kind, LockOp, Message, SenderInfo};
use stage::value::Value;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY: &str = "test cluster key 0123456789";

fn node(p: u16) -> String {
    format!("127.0.0.1:{p}")
}

/// A home whose `#startup` runs `stages` (entry `db` for a `db` stage, `start` otherwise).
fn home(cluster: serde_json::Value, stages: &[&str], script: &str, extra: serde_json::Value) -> TestHome {
    let h = TestHome::new();
    let mut conf = serde_json::json!({
        "#cluster": cluster,
        "#cluster-key": "env:STAGE_CLUSTER_KEY",
        "#router": [600],
        "#startup": stages.iter().map(|s| vec![format!("lua+{s}")]).collect::<Vec<_>>(),
        "lua": {"lua+db": "db"},
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            conf.as_object_mut().unwrap().remove(k);
        } else {
            conf[k] = v.clone();
        }
    }
    h.write("conf/stage.json", &conf.to_string());
    h.write("package/db.lua", include_str!("lua/cluster/db.lua"));
    h.write("package/start.lua", script);
    h
}

fn spawn(h: &TestHome, env: &[(&str, String)], key: Option<&str>) -> Child {
    let mut c = Command::new(stage_bin());
    c.arg("run").arg(h.path()).env("STAGE_LOG", "info");
    match key {
        Some(k) => c.env("STAGE_CLUSTER_KEY", k),
        None => c.env_remove("STAGE_CLUSTER_KEY"),
    };
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start stage")
}

fn wait_file(p: &Path, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if p.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn three_nodes_carry_requests_broadcasts_scopes_and_a_mebibyte() {
    let (pa, pb, pc) = (free_udp_port(), free_udp_port(), free_udp_port());
    let idle = "-- serves db only\n";
    let b = home(
        serde_json::json!([pb]),
        &["db", "db"],
        idle,
        serde_json::json!({}),
    );
    let c = home(
        serde_json::json!([pc, node(pa)]),
        &["db"],
        idle,
        serde_json::json!({}),
    );
    let a = home(
        serde_json::json!([pa, node(pb), node(pc)]),
        &["web"],
        include_str!("lua/cluster/three.lua"),
        serde_json::json!({}),
    );
    let env = [("NODE_B", node(pb)), ("NODE_C", node(pc))];
    let (cb, cc) = (spawn(&b, &env, Some(KEY)), spawn(&c, &env, Some(KEY)));
    let ca = spawn(&a, &env, Some(KEY));
    let (code, out) = wait_with_output(ca, Duration::from_secs(60));
    let (ob, oc) = (stop(cb), stop(cc));
    assert_eq!(code, Some(0), "A:\n{out}\nB:\n{ob}\nC:\n{oc}");
    assert!(
        out.contains(&format!("node {} joined", node(pb))),
        "one line per membership change:\n{out}"
    );
}

#[test]
fn kill_9_is_detected_rerouted_failed_over_and_rejoined() {
    let (pa, pb, pc, pf) = (free_udp_port(), free_udp_port(), free_udp_port(), free_udp_port());
    let sync = tempfile::tempdir().unwrap();
    let idle = "-- serves db only\n";
    let b = home(
        serde_json::json!([pb]),
        &["db"],
        idle,
        serde_json::json!({"#router": [1500]}),
    );
    let c = home(
        serde_json::json!([pc]),
        &["db"],
        idle,
        serde_json::json!({"#router": [1500]}),
    );
    let f = home(
        serde_json::json!([pf]),
        &["db"],
        idle,
        serde_json::json!({"#router": [1500]}),
    );
    let a = home(
        serde_json::json!([pa, node(pb), node(pc), format!("={}", node(pf))]),
        &["web"],
        include_str!("lua/cluster/failover.lua"),
        serde_json::json!({"#router": [1500]}),
    );
    let env = [
        ("NODE_B", node(pb)),
        ("NODE_C", node(pc)),
        ("NODE_F", node(pf)),
        ("SYNC_DIR", sync.path().display().to_string()),
    ];
    let mut cb = spawn(&b, &env, Some(KEY));
    let mut cc = spawn(&c, &env, Some(KEY));
    let cf = spawn(&f, &env, Some(KEY));
    let ca = spawn(&a, &env, Some(KEY));
    let step = |name: &str| wait_file(&sync.path().join(name), Duration::from_secs(30));
    let ok = step("ready");
    if ok {
        std::thread::sleep(Duration::from_millis(500));
        cb.kill().unwrap(); // SIGKILL
        let _ = cb.wait();
        std::fs::write(sync.path().join("killed"), "1").unwrap();
        if step("times") {
            cc.kill().unwrap();
            let _ = cc.wait();
            std::fs::write(sync.path().join("killed2"), "1").unwrap();
            if step("failover") {
                cb = spawn(&b, &env, Some(KEY));
            }
        }
    }
    let (code, out) = wait_with_output(ca, Duration::from_secs(60));
    let times = std::fs::read_to_string(sync.path().join("times")).unwrap_or_default();
    eprintln!("kill -9 with #router [1500]: {times}");
    let (ob, _, of) = (stop(cb), stop(cc), stop(cf));
    assert_eq!(code, Some(0), "A:\n{out}\nB:\n{ob}\nF:\n{of}");
}

/// A test-side node: a real engine on its own UDP socket that records every datagram.
struct Tap {
    sock: UdpSocket,
    sent: Mutex<Vec<(SocketAddr, Vec<u8>)>>,
    received: Mutex<Vec<(SocketAddr, Vec<u8>)>>,
}

impl Transport for Tap {
    fn send(&self, to: SocketAddr, d: &[u8]) {
        self.sent.lock().unwrap().push((to, d.to_vec()));
        let _ = self.sock.send_to(d, to);
    }
}

struct NoStages;

impl Sink for NoStages {
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
        vec![]
    }
}

fn status(h: &TestHome) -> serde_json::Value {
    let out = Command::new(stage_bin())
        .args(["cluster", "status", "--json"])
        .arg(h.path())
        .env("STAGE_CLUSTER_KEY", KEY)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn only_holders_of_the_key_join_and_nothing_forged_replayed_or_cut_is_accepted() {
    // Without a key and without "#cluster-insecure", a node refuses to start.
    let p0 = free_udp_port();
    let h0 = home(
        serde_json::json!([p0]),
        &["db"],
        "",
        serde_json::json!({"#cluster-key": null}),
    );
    let (code, out) = wait_with_output(spawn(&h0, &[], None), Duration::from_secs(10));
    assert_ne!(code, Some(0));
    assert!(out.contains("#cluster-key: missing"), "{out}");

    let (pa, pw, pn, pt) = (free_udp_port(), free_udp_port(), free_udp_port(), free_udp_port());
    let mark = tempfile::tempdir().unwrap();
    let mark_file = mark.path().join("mark");
    let a = home(serde_json::json!([pa]), &["db"], "", serde_json::json!({}));
    let w = home(
        serde_json::json!([pw, node(pa)]),
        &["db"],
        "",
        serde_json::json!({}),
    );
    let n = home(
        serde_json::json!([pn, node(pa)]),
        &["db"],
        "",
        serde_json::json!({"#cluster-key": null, "#cluster-insecure": true}),
    );
    let env = [("MARK", mark_file.display().to_string())];
    let ca = spawn(&a, &env, Some(KEY));
    let cw = spawn(&w, &env, Some("another key"));
    let cn = spawn(&n, &env, None);

    // The test's own node, holding the key.
    let sock = UdpSocket::bind(("127.0.0.1", pt)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    let tap = Arc::new(Tap {
        sock: sock.try_clone().unwrap(),
        sent: Mutex::default(),
        received: Mutex::default(),
    });
    let cfg = stage::cluster::ClusterConfig {
        port: pt,
        peers: vec![node(pa).parse().unwrap()],
        failover: vec![],
        advertise: [127, 0, 0, 1].into(),
        key: Some(KEY.as_bytes().to_vec()),
        accept: vec![],
        sync: Duration::from_millis(600),
    };
    let t = Engine::new(cfg, tap.clone());
    t.set_sink(Arc::new(NoStages));
    let pump = |limit: Duration, until: &dyn Fn() -> bool| -> bool {
        let start = Instant::now();
        let mut buf = vec![0u8; 65536];
        while start.elapsed() < limit {
            if until() {
                return true;
            }
            t.tick(Instant::now());
            if let Ok((len, from)) = sock.recv_from(&mut buf) {
                tap.received.lock().unwrap().push((from, buf[..len].to_vec()));
                t.receive(from, &buf[..len]);
            }
        }
        false
    };
    let a_addr: SocketAddr = node(pa).parse().unwrap();
    let a_has_db = || {
        t.members()
            .iter()
            .any(|m| m.0 == node(pa) && m.2.iter().any(|s| s.stage == "db"))
    };
    assert!(pump(Duration::from_secs(15), &a_has_db), "the test node joins A");

    let msg = |v: &str| Message {
        id: "mark".into(),
        from: Arc::new(SenderInfo {
            node: node(pt),
            stage: "tap".into(),
            instance: 0,
        }),
        values: vec![Value::Str(v.as_bytes().to_vec())],
        kind: Kind::Signal {
            cb: None,
            implicit: false,
        },
    };
    let before = tap.sent.lock().unwrap().len();
    t.deliver_one("db", msg("one"), false).unwrap();
    assert!(
        wait_file(&mark_file, Duration::from_secs(5)),
        "a keyed message is delivered"
    );
    let captured: Vec<u8> = tap.sent.lock().unwrap()[before..]
        .iter()
        .find(|(to, d)| *to == a_addr && d.len() > 60)
        .unwrap()
        .1
        .clone();
    std::fs::remove_file(&mark_file).unwrap();

    // Replayed, forged (one bit), truncated: none delivered.
    sock.send_to(&captured, a_addr).unwrap();
    let mut forged = captured.clone();
    forged[40] ^= 1;
    sock.send_to(&forged, a_addr).unwrap();
    sock.send_to(&captured[..20], a_addr).unwrap();
    sock.send_to(&captured[..captured.len() - 1], a_addr).unwrap();
    // A datagram A sent to the test node, replayed to A.
    let from_a = tap
        .received
        .lock()
        .unwrap()
        .iter()
        .find(|(f, _)| *f == a_addr)
        .unwrap()
        .1
        .clone();
    sock.send_to(&from_a, a_addr).unwrap();
    // Keep the test node alive in the cluster while A handles (and refuses) them.
    pump(Duration::from_millis(800), &|| false);
    assert!(
        !mark_file.exists(),
        "a replayed/forged/truncated message was delivered"
    );

    // The cluster keeps working.
    t.deliver_one("db", msg("two"), false).unwrap();
    assert!(wait_file(&mark_file, Duration::from_secs(5)));
    assert_eq!(std::fs::read_to_string(&mark_file).unwrap(), "two");

    let st = status(&a);
    let r = &st["rejected"];
    let (ow, on) = (stop(cw), stop(cn));
    let oa = stop(ca);
    eprintln!("A refused: {r}");
    assert!(r["replayed"].as_u64().unwrap() >= 1, "{st}");
    assert!(r["bad tag"].as_u64().unwrap() >= 3, "{st}");
    assert!(r["truncated"].as_u64().unwrap() >= 1, "{st}");
    assert!(
        r["wrong key"].as_u64().unwrap() >= 2,
        "the wrong-key and the keyless node: {st}"
    );
    let members: Vec<&str> = st["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["state"] != "down")
        .map(|m| m["node"].as_str().unwrap())
        .collect();
    assert!(members.contains(&node(pt).as_str()), "{st}");
    assert!(
        !members.contains(&node(pw).as_str()) && !members.contains(&node(pn).as_str()),
        "{st}\nW:\n{ow}\nN:\n{on}"
    );
    // Logged at most once per peer per minute.
    for p in [pt, pw, pn] {
        let lines = oa
            .lines()
            .filter(|l| l.contains("refused a datagram") && l.contains(&format!(":{p} ")))
            .count();
        assert!(lines <= 1, "{lines} lines for {p}:\n{oa}");
    }
    assert!(on.contains("#cluster-insecure"), "the insecure node warns:\n{on}");
}

#[test]
fn locks_are_cluster_wide() {
    let (pa, pb) = (free_udp_port(), free_udp_port());
    let sync = tempfile::tempdir().unwrap();
    let script = include_str!("lua/cluster/locks.lua");
    // Each instance marks its end as <letter>_<instance> (the script cannot know its letter).
    let fin = |letter: &str| {
        script.replace(
            r#"write(dir .. "/done_" .. me:gsub("[:.]", "_") .. "_" .. process.stage, "1")"#,
            &format!(r#"write(dir .. "/{letter}_" .. process.stage, "1")"#),
        )
    };
    let a = home(
        serde_json::json!([pa, node(pb)]),
        &["w", "w"],
        &fin("A"),
        serde_json::json!({}),
    );
    let b = home(
        serde_json::json!([pb, node(pa)]),
        &["w", "w"],
        &fin("B"),
        serde_json::json!({}),
    );
    let dir = sync.path().display().to_string();
    let ca = spawn(&a, &[("SYNC_DIR", dir.clone()), ("OTHER", node(pb))], Some(KEY));
    let cb = spawn(&b, &[("SYNC_DIR", dir), ("OTHER", node(pa))], Some(KEY));
    let (code_a, oa) = wait_with_output(ca, Duration::from_secs(60));
    let (code_b, ob) = wait_with_output(cb, Duration::from_secs(10));
    assert_eq!((code_a, code_b), (Some(0), Some(0)), "A:\n{oa}\nB:\n{ob}");
}

#[test]
fn two_processes_of_one_home_form_a_cluster() {
    let (p1, p2) = (free_udp_port(), free_udp_port());
    let h = home(
        serde_json::json!(["env:STAGE_CLUSTER_PORT", node(p1), node(p2)]),
        &["w", "x"],
        include_str!("lua/cluster/same_home.lua"),
        serde_json::json!({}),
    );
    let c1 = spawn(
        &h,
        &[("STAGE_CLUSTER_PORT", p1.to_string()), ("OTHER", node(p2))],
        Some(KEY),
    );
    let c2 = spawn(
        &h,
        &[("STAGE_CLUSTER_PORT", p2.to_string()), ("OTHER", node(p1))],
        Some(KEY),
    );
    let (r1, o1) = wait_with_output(c1, Duration::from_secs(30));
    let (r2, o2) = wait_with_output(c2, Duration::from_secs(10));
    assert_eq!((r1, r2), (Some(0), Some(0)), "1:\n{o1}\n2:\n{o2}");
}

/// A key rotation in progress: one process signs with the new key and accepts the old, the
/// other signs with the old and accepts the new. They form one cluster (the key ring's
/// refusals are in the cluster::auth unit tests).
#[test]
fn a_key_rotation_in_progress_keeps_the_cluster_whole() {
    let (p1, p2) = (free_udp_port(), free_udp_port());
    let h = home(
        serde_json::json!(["env:STAGE_CLUSTER_PORT", node(p1), node(p2)]),
        &["w", "x"],
        include_str!("lua/cluster/same_home.lua"),
        serde_json::json!({"#cluster-key": ["env:KEY_SIGN", "env:KEY_ALSO"]}),
    );
    let (old, new) = (
        "the old cluster key".to_string(),
        "the new cluster key".to_string(),
    );
    let c1 = spawn(
        &h,
        &[
            ("STAGE_CLUSTER_PORT", p1.to_string()),
            ("OTHER", node(p2)),
            ("KEY_SIGN", new.clone()),
            ("KEY_ALSO", old.clone()),
        ],
        None,
    );
    let c2 = spawn(
        &h,
        &[
            ("STAGE_CLUSTER_PORT", p2.to_string()),
            ("OTHER", node(p1)),
            ("KEY_SIGN", old),
            ("KEY_ALSO", new),
        ],
        None,
    );
    let (r1, o1) = wait_with_output(c1, Duration::from_secs(30));
    let (r2, o2) = wait_with_output(c2, Duration::from_secs(10));
    assert_eq!((r1, r2), (Some(0), Some(0)), "1:\n{o1}\n2:\n{o2}");
}
