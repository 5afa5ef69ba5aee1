//! The admin API (`#admin`) with curl against real processes on loopback: a 3-node cluster
//! listed by `/nodes/all` (and its `/rainservers/all` alias), a killed node leaving the
//! alive state, `/stages` and `/instances`, and the authentication rules (401 without a
//! token, 403 with a wrong one, 400 for a token in the query string, both headers), plus a
//! node that refuses to start an open admin API on a non-loopback address.

mod harness;

use harness::{curl_status, free_udp_port, stage_bin, stop, wait_for, wait_with_output, TestHome};
use serde_json::{json, Value as Json};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "test cluster key 0123456789";
const TOKEN: &str = "admin-token-0123456789abcdef";

/// `curl` with `args`; returns (status, body).
fn curl(args: &[&str], url: &str) -> (u16, String) {
    curl_status(args, url, 5)
}

fn node(p: u16) -> String {
    format!("127.0.0.1:{p}")
}

fn home(cluster: Json, stages: &[&str], extra: Json) -> TestHome {
    let h = TestHome::new();
    let mut conf = json!({
        "#cluster": cluster,
        "#cluster-key": "env:STAGE_CLUSTER_KEY",
        "#router": [600],
        "#startup": stages.iter().map(|s| vec![format!("lua+{s}")]).collect::<Vec<_>>(),
        "lua": {"lua+db": "db"},
    });
    for (k, v) in extra.as_object().unwrap() {
        conf[k] = v.clone();
    }
    h.write("conf/stage.json", &conf.to_string());
    h.write(
        "package/db.lua",
        "stage.waitfor('get', function(k) return k end)\n",
    );
    h.write("package/start.lua", "-- idle\n");
    h
}

fn spawn(h: &TestHome) -> Child {
    Command::new(stage_bin())
        .arg("run")
        .arg(h.path())
        .env("STAGE_LOG", "info")
        .env("STAGE_CLUSTER_KEY", KEY)
        .env("STAGE_ADMIN_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start stage")
}

fn get(url: &str) -> (u16, Json) {
    let (code, body) = curl(&["-H", &format!("user: {TOKEN}")], url);
    (code, serde_json::from_str(&body).unwrap_or(Json::Null))
}

/// The state of `name` in a `/nodes/all` answer.
fn state_of(nodes: &Json, name: &str) -> Option<String> {
    nodes["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["node"] == name)
        .map(|n| n["state"].as_str().unwrap_or("").to_string())
}

/// Follows `/events`: refused without a token, then with one prints ALIVE n for the first
/// snapshot and GONE once node argv[3] is not alive (at most 15 s).
const EVENTS: &str = r#"
import asyncio, json, sys, time
import websockets
port, token, victim = sys.argv[1], sys.argv[2], sys.argv[3]
url = f"ws://127.0.0.1:{port}/events"
async def main():
    try:
        async with websockets.connect(url, open_timeout=5):
            print("OPENED WITHOUT TOKEN")
    except websockets.exceptions.InvalidStatus as e:
        print("REFUSED", e.response.status_code)
    async with websockets.connect(url, subprotocols=["stage-admin", "bearer." + token], open_timeout=5) as ws:
        first = True
        end = time.time() + 15
        while time.time() < end:
            s = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if first:
                print("ALIVE", sum(1 for n in s["nodes"] if n["state"] == "alive"), flush=True)
                first = False
            st = [n["state"] for n in s["nodes"] if n["node"] == victim]
            if st and st[0] != "alive":
                print("GONE", st[0], flush=True)
                return
asyncio.run(main())
"#;

#[test]
fn three_nodes_listed_authenticated_and_a_dead_one_seen() {
    let (pa, pb, pc, admin) = (free_udp_port(), free_udp_port(), free_udp_port(), free_udp_port());
    let b = home(json!([pb]), &["db", "db"], json!({}));
    let c = home(json!([pc, node(pa)]), &["db"], json!({}));
    let a = home(
        json!([pa, node(pb), node(pc)]),
        &["web"],
        json!({"#admin": {"listen": node(admin), "token": "env:STAGE_ADMIN_TOKEN"}}),
    );
    let (cb, cc, ca) = (spawn(&b), spawn(&c), spawn(&a));
    let base = format!("http://{}", node(admin));
    let all = format!("{base}/nodes/all");
    let three = wait_for(Duration::from_secs(30), || {
        let (code, v) = get(&all);
        // Alive, and each node's stages pushed (membership comes before the first push).
        let ready = v["nodes"]
            .as_array()?
            .iter()
            .filter(|n| n["state"] == "alive" && n["instances"].as_u64() > Some(0))
            .count();
        (code == 200 && ready == 3).then_some(v)
    });
    let Some(three) = three else {
        panic!(
            "/nodes/all never listed 3 alive nodes: {:?}\nA:\n{}\nB:\n{}\nC:\n{}",
            get(&all),
            stop(ca),
            stop(cb),
            stop(cc)
        );
    };
    let nodes = three["nodes"].as_array().unwrap();
    assert_eq!(nodes[0]["node"], node(pa), "this node first: {three}");
    assert_eq!(nodes[0]["self"], true);
    for n in nodes {
        assert!(n["uptime"].as_u64().is_some(), "uptime of every node: {three}");
        assert!(n["address"].is_string() && n["load"].is_number(), "{three}");
    }
    let nb = nodes.iter().find(|n| n["node"] == node(pb)).unwrap();
    assert_eq!(nb["instances"], 2, "{three}");
    assert_eq!(nb["stages"][0]["stage"], "db", "{three}");

    // The seed's path is an alias.
    let (code, alias) = get(&format!("{base}/rainservers/all"));
    assert_eq!(code, 200);
    assert_eq!(alias["nodes"].as_array().map(Vec::len), Some(3), "{alias}");

    // Stages across the cluster, and this node's instances.
    let (code, stages) = get(&format!("{base}/stages"));
    assert_eq!(code, 200);
    let db = stages["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "db")
        .cloned();
    assert_eq!(
        db.as_ref().map(|d| d["instances"].clone()),
        Some(json!(3)),
        "{stages}"
    );
    assert_eq!(
        db.unwrap()["nodes"].as_object().map(|o| o.len()),
        Some(2),
        "{stages}"
    );
    let (code, inst) = get(&format!("{base}/instances"));
    assert_eq!(code, 200);
    assert_eq!(inst[0]["name"], "web#0", "{inst}");
    assert_eq!(inst[0]["running"], true, "{inst}");
    assert!(inst[0]["capacity"].as_u64().unwrap() > 0, "{inst}");
    let (code, one) = get(&format!("{base}/instances/0"));
    assert_eq!((code, one["stage"].clone()), (200, json!("web")));
    assert_eq!(get(&format!("{base}/instances/7")).0, 404);

    // Authentication.
    let (code, body) = curl(&[], &all);
    assert_eq!(code, 401, "no token: {body}");
    assert!(body.contains("user: TOKEN"), "says what to send: {body}");
    assert_eq!(curl(&["-H", "user: wrong-token-0000000000"], &all).0, 403);
    assert_eq!(curl(&["-H", "Authorization: Bearer nope"], &all).0, 403);
    let bearer = format!("Authorization: Bearer {TOKEN}");
    assert_eq!(curl(&["-H", &bearer], &all).0, 200, "Bearer works too");
    let (code, body) = curl(&["-H", &bearer], &format!("{all}?token={TOKEN}"));
    assert_eq!(code, 400, "token in the query string: {body}");
    assert_eq!(curl(&[], &format!("{all}?access_token=x")).0, 400);
    assert_eq!(curl(&["-H", &bearer, "-X", "DELETE"], &all).0, 405);
    assert_eq!(curl(&["-H", &bearer], &format!("{base}/nope")).0, 404);

    // The map page is embedded HTML; its WebSocket wants the token like every endpoint.
    let (code, page) = curl(&[], &format!("{base}/"));
    assert_eq!(code, 200);
    assert!(
        page.contains("<title>stage: infrastructure map</title>") && !page.contains("http://"),
        "no external asset"
    );
    // A Python websockets client follows /events while C is killed: C turns non-alive
    // within the detection time (#router 600 ms).
    let watcher = Command::new("python3")
        .args(["-c", EVENTS, &admin.to_string(), TOKEN, &node(pc)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/setup installs websockets)");
    std::thread::sleep(Duration::from_millis(1500));
    let killed = Instant::now();
    let out_c = stop(cc);
    let seen = wait_for(Duration::from_secs(10), || {
        let (_, v) = get(&all);
        state_of(&v, &node(pc)).filter(|s| s != "alive")
    });
    let took = killed.elapsed();
    let ev = watcher.wait_with_output().unwrap();
    let ev_out = String::from_utf8_lossy(&ev.stdout).to_string() + &String::from_utf8_lossy(&ev.stderr);
    let (out_a, out_b) = (stop(ca), stop(cb));
    assert!(
        ev_out.contains("REFUSED 401") && ev_out.contains("ALIVE 3"),
        "events: {ev_out}"
    );
    assert!(
        ev_out.contains("GONE"),
        "/events never showed C leave alive: {ev_out}\nA:\n{out_a}"
    );
    assert!(
        seen.is_some(),
        "C still alive after 10 s\nA:\n{out_a}\nB:\n{out_b}\nC:\n{out_c}"
    );
    println!("C seen {} after {} ms", seen.unwrap(), took.as_millis());
    assert!(
        out_a.contains("401") && out_a.contains("403"),
        "refusals are logged:\n{out_a}"
    );
}

#[test]
fn no_token_on_a_public_address_refuses_to_start() {
    let h = TestHome::new();
    h.write(
        "conf/stage.json",
        &json!({"#admin": {"listen": format!("0.0.0.0:{}", free_udp_port())}}).to_string(),
    );
    h.write("package/start.lua", "-- idle\n");
    let (code, out) = wait_with_output(h.spawn(), Duration::from_secs(15));
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}:\n{out}");
    assert!(
        out.contains("no token configured") && out.contains("not loopback"),
        "says why:\n{out}"
    );
    // A token shorter than 16 characters is a configuration error naming the key.
    let h = TestHome::new();
    h.write(
        "conf/stage.json",
        &json!({"#admin": {"listen": "127.0.0.1:0", "token": "short"}}).to_string(),
    );
    let out = Command::new(stage_bin())
        .arg("check")
        .arg(h.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("#admin.token"), "{text}");
}
