//! Runtime instances through the admin API (docs/admin.md), with curl against real `stage
//! run` processes on loopback: starting instances of a stage and seeing messages reach them,
//! reloading one (it runs the changed entry script, the others keep the old one), stopping
//! one while requests wait in its queue (each gets "shutting down", none hangs), the error
//! answers, the metrics following instances that come and go; and on a 3-node cluster,
//! stopping and starting an instance on another node through the cluster, with the first
//! node's requests following the membership.

mod harness;

use harness::{curl_status, free_udp_port, stage_bin, wait_for, TestHome};
use serde_json::{json, Value as Json};
use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "test cluster key 0123456789";
const TOKEN: &str = "admin-token-0123456789abcdef";

/// `curl` with `args`; returns (status, body).
fn curl(args: &[&str], url: &str) -> (u16, String) {
    curl_status(args, url, 20)
}

fn addr(p: u16) -> String {
    format!("127.0.0.1:{p}")
}

/// A running node whose log goes to a file (read for failure messages).
struct Node {
    child: Child,
    home: TestHome,
}

impl Node {
    fn start(home: TestHome) -> Node {
        let log = std::fs::File::create(home.path().join("logs/test.log")).unwrap();
        let child = Command::new(stage_bin())
            .arg("run")
            .arg(home.path())
            .env("STAGE_LOG", "info")
            .env("STAGE_CLUSTER_KEY", KEY)
            .env("STAGE_ADMIN_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start stage");
        Node { child, home }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.home.path().join("logs/test.log")).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An admin call: (status, JSON body).
fn admin(method: &str, url: &str, body: Option<&str>) -> (u16, Json) {
    let auth = format!("user: {TOKEN}");
    let mut args = vec!["-X", method, "-H", &auth];
    if let Some(b) = body {
        args.extend(["-H", "content-type: application/json", "--data-binary", b]);
    }
    let (code, text) = curl(&args, url);
    (code, serde_json::from_str(&text).unwrap_or(Json::String(text)))
}

/// The answers of `n` requests to `url` (plain text).
fn answers(url: &str, n: usize) -> Vec<String> {
    (0..n).map(|_| curl(&[], url).1).collect()
}

/// The front instance: HTTP on `port`, `/who` asks one `db` instance who it is, `/slow`
/// waits for a `slow` instance's answer.
fn web(port: u16) -> String {
    format!(
        r#"
broker.ready("http://127.0.0.1:{port}", function (req)
    if req.path == "/who" then
        local who, err = stage.request("db:who", 5000)
        return who and tostring(who) or ("ERR " .. tostring(err))
    elseif req.path == "/slow" then
        local v, err = stage.request("slow:nap", 30000)
        return v and ("OK " .. tostring(v)) or ("ERR " .. tostring(err))
    end
    return 404
end)
"#
    )
}

const DB_V1: &str =
    r#"stage.waitfor("who", function () return "v1/" .. process.node .. "/" .. process.stage end)"#;
const DB_V2: &str =
    r#"stage.waitfor("who", function () return "v2/" .. process.node .. "/" .. process.stage end)"#;

#[test]
fn start_reload_and_stop_instances_on_one_node() {
    let (http, adm, metrics) = (free_udp_port(), free_udp_port(), free_udp_port());
    let h = TestHome::new();
    h.write(
        "conf/stage.json",
        &json!({
            "#startup": [["lua+web"], ["lua+db"], ["lua+slow"]],
            "lua": {"lua+db": "db", "lua+slow": "slow"},
            // One handler at a time: a `slow` message in a handler keeps the others queued.
            "#limits": {"handlers": 1},
            "#admin": {"listen": addr(adm), "token": "env:STAGE_ADMIN_TOKEN"},
            "#metrics": addr(metrics),
        })
        .to_string(),
    );
    h.write("package/start.lua", &web(http));
    h.write("package/db.lua", DB_V1);
    h.write(
        "package/slow.lua",
        r#"stage.waitfor("nap", function () stage.sleep(3000) return "late" end)"#,
    );
    let node = Node::start(h);
    let base = format!("http://{}", addr(adm));
    let who = format!("http://{}/who", addr(http));
    let up = wait_for(Duration::from_secs(20), || {
        let a = curl(&[], &who).1;
        a.starts_with("v1/").then_some(a)
    });
    let me = up.unwrap_or_else(|| panic!("the node never answered /who:\n{}", node.log()));
    let name = me.split('/').nth(1).unwrap().to_string();
    assert_eq!(me, format!("v1/{name}/1"), "db#1 answers");

    // Start one, then two more: new numbers after web#0, db#1, slow#2.
    let (code, one) = admin("POST", &format!("{base}/stages/db/instances"), None);
    assert_eq!(
        (code, &one["started"]),
        (201, &json!([3])),
        "{one}\n{}",
        node.log()
    );
    assert_eq!(one["instances"][0]["name"], "db#3", "{one}");
    let (code, two) = admin(
        "POST",
        &format!("{base}/stages/db/instances"),
        Some(r#"{"count": 2, "node": null}"#),
    );
    assert_eq!((code, &two["started"]), (201, &json!([4, 5])), "{two}");
    let (_, list) = admin("GET", &format!("{base}/instances"), None);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["running"] == true && i["kind"] == "lua")
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["web#0", "db#1", "slow#2", "db#3", "db#4", "db#5"],
        "{list}"
    );
    // Requests reach every db instance (round-robin over the four).
    let seen: BTreeSet<String> = answers(&who, 24).into_iter().collect();
    let want: BTreeSet<String> = [1, 3, 4, 5].iter().map(|i| format!("v1/{name}/{i}")).collect();
    assert_eq!(seen, want, "{}", node.log());
    // The membership this node would advertise, and the metrics, count them.
    let (_, stages) = admin("GET", &format!("{base}/stages"), None);
    let db = stages["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "db")
        .cloned();
    assert_eq!(db.map(|d| d["instances"].clone()), Some(json!(4)), "{stages}");
    let (_, text) = curl(&[], &format!("http://{}/metrics", addr(metrics)));
    assert!(text.contains("stage_queue_depth{instance=\"db#5\"} 0"), "{text}");

    // Reload db#3 after a change of db.lua: it runs the new version, db#1 the old one.
    node.home.write("package/db.lua", DB_V2);
    std::thread::sleep(Duration::from_millis(300));
    let (code, r) = admin("PUT", &format!("{base}/instances/3"), None);
    assert_eq!(
        (code, &r["reloaded"], &r["name"]),
        (200, &json!(true), &json!("db#3")),
        "{r}"
    );
    let seen: BTreeSet<String> = answers(&who, 24).into_iter().collect();
    assert!(seen.contains(&format!("v2/{name}/3")), "reloaded: {seen:?}");
    assert!(seen.contains(&format!("v1/{name}/1")), "not reloaded: {seen:?}");
    assert!(!seen.contains(&format!("v2/{name}/1")), "{seen:?}");

    // Stop slow#2 with one request in its handler and four queued: every requester hears
    // "shutting down", none waits for the 3 s nap.
    let slow = format!("http://{}/slow", addr(http));
    let waiting: Vec<Child> = (0..5)
        .map(|_| {
            Command::new("curl")
                .args(["-s", "--max-time", "20", "-w", " %{http_code}", &slow])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let queued = wait_for(Duration::from_secs(10), || {
        let (_, i) = admin("GET", &format!("{base}/instances/2"), None);
        (i["queue"] == 4).then_some(())
    });
    assert!(
        queued.is_some(),
        "four requests never queued at slow#2:\n{}",
        node.log()
    );
    let t0 = Instant::now();
    let (code, stopped) = admin("DELETE", &format!("{base}/instances/2"), None);
    assert_eq!(
        (code, &stopped["stopped"]),
        (200, &json!(true)),
        "{stopped}\n{}",
        node.log()
    );
    assert_eq!(
        stopped["drained"],
        json!({"requests": 4, "signals": 0}),
        "{stopped}"
    );
    for c in waiting {
        let out = c.wait_with_output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "ERR shutting down 200",
            "{}",
            node.log()
        );
    }
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "answered at once: {:?}",
        t0.elapsed()
    );
    // Gone: no route for its stage, 404 for its id, out of the metrics.
    assert_eq!(curl(&[], &slow).1, "ERR no route");
    let (code, e) = admin("DELETE", &format!("{base}/instances/2"), None);
    assert_eq!(code, 404, "{e}");
    assert_eq!(admin("GET", &format!("{base}/instances/2"), None).0, 404);
    let (_, text) = curl(&[], &format!("http://{}/metrics", addr(metrics)));
    assert!(
        !text.contains("instance=\"slow#2\"") && text.contains("instance=\"db#3\""),
        "{text}"
    );
    // It can be started again, under a new number.
    let (code, again) = admin("POST", &format!("{base}/stages/slow/instances"), Some("{}"));
    assert_eq!((code, &again["started"]), (201, &json!([6])), "{again}");

    // Errors say what is wrong.
    let (code, e) = admin("POST", &format!("{base}/stages/nope/instances"), None);
    assert_eq!(code, 404, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains(r#"no Lua stage "nope""#),
        "{e}"
    );
    assert!(
        e["error"].as_str().unwrap().contains("web, db, slow"),
        "lists the stages: {e}"
    );
    let (code, e) = admin("POST", &format!("{base}/stages/db/instances"), Some("{nope"));
    assert!(
        code == 400 && e["error"].as_str().unwrap().contains("not JSON"),
        "{e}"
    );
    let (code, e) = admin(
        "POST",
        &format!("{base}/stages/db/instances"),
        Some(r#"{"count": 0}"#),
    );
    assert!(
        code == 400 && e["error"].as_str().unwrap().contains("from 1 to 64"),
        "{e}"
    );
    let (code, e) = admin(
        "POST",
        &format!("{base}/stages/db/instances"),
        Some(r#"{"node": "127.0.0.1:1"}"#),
    );
    assert!(
        code == 404 && e["error"].as_str().unwrap().contains("not in a cluster"),
        "{e}"
    );
    let (code, e) = admin("DELETE", &format!("{base}/instances/abc"), None);
    assert!(
        code == 400 && e["error"].as_str().unwrap().contains("not a number"),
        "{e}"
    );
    let (code, e) = admin("PUT", &format!("{base}/instances/99"), None);
    assert!(
        code == 404 && e["error"].as_str().unwrap().contains("no instance 99"),
        "{e}"
    );
    assert_eq!(admin("GET", &format!("{base}/stages/db/instances"), None).0, 405);
    assert_eq!(admin("PUT", &format!("{base}/instances/1?x=1"), None).0, 400);
    // Without the token: refused like every endpoint.
    assert_eq!(
        curl(&["-X", "POST"], &format!("{base}/stages/db/instances")).0,
        401
    );
    let log = node.log();
    assert!(
        log.contains("started 1 instance(s) of db") && log.contains("stopped slow#2"),
        "changes are logged with who:\n{log}"
    );
}

#[test]
fn instances_on_another_node_through_the_cluster() {
    let (pa, pb, pc, adm, http) = (
        free_udp_port(),
        free_udp_port(),
        free_udp_port(),
        free_udp_port(),
        free_udp_port(),
    );
    let conf = |cluster: Json, startup: Json, extra: Json| {
        let h = TestHome::new();
        let mut c = json!({
            "#cluster": cluster,
            "#cluster-key": "env:STAGE_CLUSTER_KEY",
            "#router": [600],
            "#startup": startup,
            "lua": {"lua+db": "db"},
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        h.write("conf/stage.json", &c.to_string());
        h.write("package/db.lua", DB_V1);
        h.write("package/start.lua", &web(http));
        h
    };
    let b = Node::start(conf(json!([pb, addr(pa)]), json!([["lua+db"]]), json!({})));
    let c = Node::start(conf(json!([pc, addr(pa)]), json!([["lua+db"]]), json!({})));
    let a = Node::start(conf(
        json!([pa, addr(pb), addr(pc)]),
        json!([["lua+web"]]),
        json!({"#admin": {"listen": addr(adm), "token": "env:STAGE_ADMIN_TOKEN"}}),
    ));
    let logs = || format!("A:\n{}\nB:\n{}\nC:\n{}", a.log(), b.log(), c.log());
    let base = format!("http://{}", addr(adm));
    let who = format!("http://{}/who", addr(http));
    let (nb, nc) = (addr(pb), addr(pc));
    // A routes db to both B and C.
    let both: BTreeSet<String> = [format!("v1/{nb}/0"), format!("v1/{nc}/0")].into();
    let ready = wait_for(Duration::from_secs(30), || {
        let seen: BTreeSet<String> = answers(&who, 4).into_iter().collect();
        (seen == both).then_some(())
    });
    assert!(
        ready.is_some(),
        "A never reached db on B and C: {:?}\n{}",
        answers(&who, 4),
        logs()
    );
    let db_on_b = || -> Option<u64> {
        let (_, v) = admin("GET", &format!("{base}/nodes/all"), None);
        let n = v["nodes"].as_array()?.iter().find(|n| n["node"] == nb)?.clone();
        Some(
            n["stages"]
                .as_array()?
                .iter()
                .find(|s| s["stage"] == "db")
                .map_or(0, |s| s["instances"].as_u64().unwrap_or(0)),
        )
    };
    assert_eq!(db_on_b(), Some(1));

    // Stop B's only db instance from A: B stops advertising db, A's requests go to C only.
    let (code, s) = admin("DELETE", &format!("{base}/instances/0?node={nb}"), None);
    assert_eq!(
        (code, &s["node"], &s["name"]),
        (200, &json!(nb), &json!("db#0")),
        "{s}\n{}",
        logs()
    );
    let gone = wait_for(Duration::from_secs(10), || (db_on_b() == Some(0)).then_some(()));
    assert!(
        gone.is_some(),
        "B still advertises db: {:?}\n{}",
        db_on_b(),
        logs()
    );
    std::thread::sleep(Duration::from_millis(500));
    let only_c: BTreeSet<String> = answers(&who, 8).into_iter().collect();
    assert_eq!(only_c, [format!("v1/{nc}/0")].into(), "{}", logs());

    // Start one on B from A: a new number there, advertised at the next state push, and
    // A's requests reach it.
    let (code, s) = admin(
        "POST",
        &format!("{base}/stages/db/instances"),
        Some(&json!({"node": nb}).to_string()),
    );
    assert_eq!(
        (code, &s["node"], &s["started"]),
        (201, &json!(nb), &json!([1])),
        "{s}\n{}",
        logs()
    );
    let back = wait_for(Duration::from_secs(10), || (db_on_b() == Some(1)).then_some(()));
    assert!(back.is_some(), "A never saw B's new db instance\n{}", logs());
    let reached = wait_for(Duration::from_secs(10), || {
        answers(&who, 4).contains(&format!("v1/{nb}/1")).then_some(())
    });
    assert!(
        reached.is_some(),
        "A's requests never reached db#1 on B\n{}",
        logs()
    );

    // Reload it from A, after a change of B's db.lua.
    b.home.write("package/db.lua", DB_V2);
    std::thread::sleep(Duration::from_millis(300));
    let (code, s) = admin("PUT", &format!("{base}/instances/1?node={nb}"), None);
    assert_eq!((code, &s["reloaded"]), (200, &json!(true)), "{s}");
    let v2 = wait_for(Duration::from_secs(10), || {
        answers(&who, 4).contains(&format!("v2/{nb}/1")).then_some(())
    });
    assert!(v2.is_some(), "{}", logs());

    // Errors from the other node come back with its name; an unknown node is 404.
    let (code, e) = admin(
        "POST",
        &format!("{base}/stages/nope/instances"),
        Some(&json!({"node": nb}).to_string()),
    );
    assert_eq!((code, &e["node"]), (404, &json!(nb)), "{e}");
    assert!(
        e["error"].as_str().unwrap().contains(r#"no Lua stage "nope""#),
        "{e}"
    );
    let (code, e) = admin("DELETE", &format!("{base}/instances/0?node={nb}"), None);
    assert!(
        code == 404 && e["error"].as_str().unwrap().contains("no instance 0"),
        "{e}"
    );
    let (code, e) = admin(
        "POST",
        &format!("{base}/stages/db/instances"),
        Some(r#"{"node": "127.0.0.1:1"}"#),
    );
    assert!(
        code == 404 && e["error"].as_str().unwrap().contains("no node"),
        "{e}"
    );
    let (log_a, log_b) = (a.log(), b.log());
    assert!(
        log_b.contains(&format!("member {}", addr(pa))),
        "B logs who asked:\n{log_b}"
    );
    assert!(log_a.contains("sent to node"), "{log_a}");
}
