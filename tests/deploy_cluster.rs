//! Package deploy across a 3-node cluster on loopback (`PUT /packages`, `GET /packages`,
//! `POST /packages/rollback`; docs/admin.md), with curl against real `stage run` processes
//! and bundles made by Python's `tarfile`: a deploy sent to one node reaches all three (each
//! node's HTTP handler answers the new value, `GET /packages` shows one hash everywhere); a
//! bundle that fails to load on one node only (its home lacks the library the new script
//! requires) is rolled back on all, naming that node; a rollback across all; bad bundles
//! (path traversal, symlink, oversize) refused with nothing written on any node, also when
//! sent straight to a node's prepare phase; no token → 401, a wrong one → 403; a node that
//! cannot be reached fails the deploy before any commit, and a node that is down is skipped.

mod harness;

use harness::{curl_status, free_tcp_port, free_udp_port, stage_bin, wait_with_output, TestHome};
use serde_json::Value as Json;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "admin-token-0123456789abcdef";

/// `curl` with `args`; returns (status, body).
fn curl(args: &[&str], url: &str) -> (u16, String) {
    curl_status(args, url, 60)
}
const KEY: &str = "test cluster key 0123456789";

fn json(body: &str) -> Json {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    harness::wait_for(limit, || f().then_some(())).is_some()
}

/// The bundles, made with Python's tarfile in `argv[1]`; `argv[2]` is start.lua.
const MAKE: &str = r#"
import io, os, sys, tarfile
d = sys.argv[1]
start = open(sys.argv[2]).read().encode()
def bundle(name, entries):
    with tarfile.open(f"{d}/{name}", "w:gz") as t:
        for e in entries:
            kind, path = e[0], e[1]
            info = tarfile.TarInfo(path)
            if kind == "file":
                info.size = len(e[2]); t.addfile(info, io.BytesIO(e[2]))
            elif kind == "dir":
                info.type = tarfile.DIRTYPE; t.addfile(info)
            elif kind == "sym":
                info.type = tarfile.SYMTYPE; info.linkname = e[2]; t.addfile(info)
base = [("dir", "package"), ("file", "package/start.lua", start)]
bundle("v2.tgz", base + [("file", "package/answer.lua", b"return 'v2'\n")])
# Compiles everywhere, but needs lib/extra.lua, which one node's home lacks.
bundle("needs_extra.tgz", base + [("file", "package/answer.lua",
       b"local extra = stage.require('extra')\nreturn 'v3-' .. extra\n")])
# Compiles, but raises when loaded, on every node.
bundle("boom.tgz", base + [("file", "package/answer.lua", b"error('boom')\nreturn 'v4'\n")])
bundle("traversal.tgz", base + [("file", "package/../../escaped.lua", b"return 1\n")])
bundle("symlink.tgz", base + [("sym", "package/answer.lua", "/etc/passwd")])
bundle("oversize.tgz", base + [("file", "package/big.lua", b"-" * 65536)])
"#;

struct Cluster {
    children: Vec<Option<Child>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().filter_map(Option::take) {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Cluster {
    fn kill(&mut self, i: usize) -> String {
        match self.children[i].take() {
            Some(mut c) => {
                let _ = c.kill();
                wait_with_output(c, Duration::from_secs(5)).1
            }
            None => String::new(),
        }
    }
    fn logs(&mut self) -> String {
        (0..self.children.len())
            .map(|i| format!("--- node {i} ---\n{}", self.kill(i)))
            .collect()
    }
}

#[test]
fn deploy_reaches_every_node_and_is_rolled_back_on_all_when_one_fails() {
    let cports: Vec<u16> = (0..3).map(|_| free_udp_port()).collect();
    let aports: Vec<u16> = (0..3).map(|_| free_tcp_port()).collect();
    let hports: Vec<u16> = (0..3).map(|_| free_tcp_port()).collect();
    let names: Vec<String> = cports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    // The same start.lua on every node (so that their trees hash alike): the port is in
    // the node's environment.
    let start_lua = "broker.ready(\"http://127.0.0.1:\" .. os.getenv(\"HTTP_PORT\"), \
                     function(req) return stage.load(\"answer\") end)\n";
    let homes: Vec<TestHome> = (0..3)
        .map(|i| {
            let h = TestHome::new();
            let peers: Vec<Json> = std::iter::once(Json::from(cports[i]))
                .chain(names.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, n)| Json::from(n.clone())))
                .collect();
            let conf = serde_json::json!({
                "#cluster": peers,
                "#cluster-key": "env:STAGE_CLUSTER_KEY",
                "#router": [600],
                "#startup": [["lua+web"]],
                "#admin": {"listen": format!("127.0.0.1:{}", aports[i]), "token": "env:STAGE_ADMIN_TOKEN", "packages": "32k"},
            });
            h.write("conf/stage.json", &conf.to_string());
            h.write("package/start.lua", start_lua);
            h.write("package/answer.lua", "return 'v1'\n");
            // Node 2 lacks the library the `needs_extra` bundle requires.
            if i != 2 {
                h.write("lib/extra.lua", "return 'extra'\n");
            }
            h
        })
        .collect();
    let bundles = homes[0].path().join("bundles");
    std::fs::create_dir(&bundles).unwrap();
    let start_copy = bundles.join("start.lua");
    std::fs::write(&start_copy, start_lua).unwrap();
    let made = Command::new("python3")
        .args(["-c", MAKE])
        .arg(&bundles)
        .arg(&start_copy)
        .output()
        .expect("python3");
    assert!(
        made.status.success(),
        "making bundles: {}",
        String::from_utf8_lossy(&made.stderr)
    );

    let spawn = |i: usize, h: &TestHome| {
        Command::new(stage_bin())
            .env("HTTP_PORT", hports[i].to_string())
            .arg("run")
            .arg(h.path())
            .env("STAGE_LOG", "info")
            .env("STAGE_ADMIN_TOKEN", TOKEN)
            .env("STAGE_CLUSTER_KEY", KEY)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start stage")
    };
    let mut cluster = Cluster {
        children: homes.iter().enumerate().map(|(i, h)| Some(spawn(i, h))).collect(),
    };
    let auth = format!("user: {TOKEN}");
    let admin = |i: usize| format!("http://127.0.0.1:{}", aports[i]);
    let answer = |i: usize| curl(&[], &format!("http://127.0.0.1:{}/", hports[i])).1;
    let get = |i: usize, path: &str| {
        let (code, body) = curl(&["-H", &auth], &format!("{}{path}", admin(i)));
        assert_eq!(code, 200, "GET {path} on node {i}: {body}");
        json(&body)
    };

    // Every node answers v1 and sees the two others alive with their admin addresses.
    for i in 0..3 {
        if !wait_for(Duration::from_secs(20), || answer(i) == "v1") {
            panic!("node {i} did not answer v1:\n{}", cluster.logs());
        }
    }
    let ready = wait_for(Duration::from_secs(20), || {
        (0..3).all(|i| {
            let n = get(i, "/nodes/all");
            let nodes = n["nodes"].as_array().cloned().unwrap_or_default();
            nodes.len() == 3
                && nodes
                    .iter()
                    .all(|m| m["state"] == "alive" && m["admin"].is_string())
        })
    });
    if !ready {
        panic!(
            "the cluster did not form with admin addresses:\n{}\n{}",
            get(0, "/nodes/all"),
            cluster.logs()
        );
    }
    let all = get(1, "/nodes/all");
    for (i, name) in names.iter().enumerate() {
        let m = all["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["node"] == name.as_str())
            .unwrap();
        assert_eq!(m["admin"], format!("127.0.0.1:{}", aports[i]).as_str(), "{all}");
    }

    // GET /packages: one version on all three.
    let hashes = |i: usize| {
        let v = get(i, "/packages");
        let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
        assert_eq!(nodes.len(), 3, "{v}");
        let mut out = vec![];
        for name in &names {
            let n = nodes
                .iter()
                .find(|n| n["node"] == name.as_str())
                .unwrap_or_else(|| panic!("{name} missing: {v}"));
            out.push(
                n["running"]["hash"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{v}"))
                    .to_string(),
            );
        }
        (v, out)
    };
    let (v, h1) = hashes(0);
    assert_eq!(v["same"], true, "{v}");
    assert!(h1.iter().all(|h| *h == h1[0] && h.len() == 64), "{v}");
    let v1 = h1[0].clone();

    let put = |i: usize, file: &str, token: Option<&str>| {
        let data = format!("@{}", bundles.join(file).display());
        let header = token.map(|t| format!("user: {t}"));
        let mut args = vec!["-X", "PUT", "--data-binary", data.as_str()];
        if let Some(h) = &header {
            args.extend(["-H", h.as_str()]);
        }
        curl(&args, &format!("{}/packages", admin(i)))
    };
    let dirs_clean = |what: &str| {
        for (i, h) in homes.iter().enumerate() {
            for d in ["package.next", "package.undo"] {
                assert!(!h.path().join(d).exists(), "{what}: node {i} left {d}");
            }
        }
    };

    // Token missing → 401, wrong → 403, on a deploy and on GET; nothing changes.
    let (code, body) = put(0, "v2.tgz", None);
    assert_eq!(code, 401, "{body}");
    let (code, body) = put(0, "v2.tgz", Some("wrong-token-0123456789abcdef"));
    assert_eq!(code, 403, "{body}");
    let (code, body) = curl(&[], &format!("{}/packages", admin(1)));
    assert_eq!(code, 401, "{body}");
    let (code, body) = curl(
        &[
            "-X",
            "POST",
            "-H",
            "Authorization: Bearer wrong-token-0123456789abcdef",
        ],
        &format!("{}/packages/rollback", admin(2)),
    );
    assert_eq!(code, 403, "{body}");
    assert_eq!(hashes(0).1, h1);

    // Bad bundles: refused by the receiving node, nothing written on any node.
    let bad: &[(&str, u16, &str)] = &[
        ("traversal.tgz", 400, "package/../../escaped.lua"),
        ("symlink.tgz", 400, "symbolic link"),
        ("oversize.tgz", 413, "decompressed"),
    ];
    for (file, status, says) in bad {
        let (code, body) = put(1, file, Some(TOKEN));
        assert_eq!(code, *status, "{file}: {body}");
        assert!(body.contains(says), "{file}: {body:?} does not say {says:?}");
        assert_eq!(hashes(2).1, h1, "{file} changed a node");
        dirs_clean(file);
        for h in &homes {
            assert!(!h.path().join("escaped.lua").exists() && !h.path().join("package.prev").exists());
        }
        // Each node checks again: the same bundle sent straight to a node's prepare phase.
        let data = format!("@{}", bundles.join(file).display());
        let (code, body) = curl(
            &["-X", "PUT", "-H", &auth, "--data-binary", &data],
            &format!("{}/packages?phase=prepare&deploy=direct", admin(2)),
        );
        assert_eq!(code, *status, "prepare of {file} on node 2: {body}");
        dirs_clean(file);
    }

    // A phase of a deploy that was never prepared is refused (and a phase needs an id).
    let (code, body) = curl(
        &["-X", "PUT", "-H", &auth],
        &format!("{}/packages?phase=commit&deploy=nope", admin(0)),
    );
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("not prepared"), "{body}");
    let (code, body) = curl(
        &["-X", "PUT", "-H", &auth],
        &format!("{}/packages?phase=commit", admin(0)),
    );
    assert_eq!(code, 400, "{body}");
    let (code, body) = curl(
        &["-X", "PUT", "-H", &auth],
        &format!("{}/packages?phase=cancel&deploy=nope", admin(0)),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["cancel"], "nothing to cancel", "{body}");

    // A good bundle sent to node 1 reaches all three.
    let t = Instant::now();
    let (code, body) = put(1, "v2.tgz", Some(TOKEN));
    println!("a deploy to 3 nodes took {:?} (curl included)", t.elapsed());
    if code != 200 {
        panic!("deploy of v2: {code} {body}\n{}", cluster.logs());
    }
    let d = json(&body);
    assert_eq!(d["nodes"].as_array().map(Vec::len), Some(3), "{d}");
    let v2 = d["running"]["hash"].as_str().unwrap().to_string();
    assert_ne!(v2, v1);
    assert_eq!(d["previous"]["hash"], v1.as_str(), "{d}");
    for i in 0..3 {
        // The commit waited for the reload: the new answer is there at once.
        assert_eq!(answer(i), "v2", "node {i} after the deploy");
    }
    let (v, h2) = hashes(2);
    assert_eq!(v["same"], true, "{v}");
    assert!(h2.iter().all(|h| *h == v2), "{v}");
    dirs_clean("v2");

    // A bundle that fails to load on node 2 only: rolled back on all, node 2 named.
    let t = Instant::now();
    let (code, body) = put(0, "needs_extra.tgz", Some(TOKEN));
    println!(
        "a deploy failing on the third node, rolled back on all, took {:?}",
        t.elapsed()
    );
    assert_eq!(code, 422, "{body}");
    let e = json(&body);
    let msg = e["error"].as_str().unwrap_or_default();
    assert_eq!(e["node"], names[2].as_str(), "{e}");
    assert!(
        msg.contains(&names[2]) && msg.contains("extra") && msg.contains("rolled back on every node"),
        "{msg}"
    );
    for i in 0..3 {
        assert_eq!(answer(i), "v2", "node {i} after the failed deploy");
    }
    let (v, h3) = hashes(1);
    assert_eq!(v["same"], true, "{v}");
    assert!(h3.iter().all(|h| *h == v2), "{v}");
    for n in v["nodes"].as_array().unwrap() {
        assert_eq!(
            n["previous"]["hash"],
            v1.as_str(),
            "the previous version changed: {v}"
        );
    }
    dirs_clean("needs_extra");

    // A script that raises at its top level fails on the first node to commit (the
    // coordinator): no other node commits, all discard what they staged.
    let (code, body) = put(1, "boom.tgz", Some(TOKEN));
    assert_eq!(code, 422, "{body}");
    let e = json(&body);
    assert_eq!(e["node"], names[1].as_str(), "{e}");
    let msg = e["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("boom") && msg.contains("none had committed"),
        "{msg}"
    );
    for i in 0..3 {
        assert_eq!(answer(i), "v2", "node {i} after the boom deploy");
    }
    assert!(hashes(0).1.iter().all(|h| *h == v2));
    dirs_clean("boom");

    // Rollback across all, sent to node 2: v1 everywhere.
    let (code, body) = curl(
        &["-X", "POST", "-H", &auth],
        &format!("{}/packages/rollback", admin(2)),
    );
    assert_eq!(code, 200, "{body}");
    let r = json(&body);
    assert_eq!(r["running"]["hash"], v1.as_str(), "{r}");
    assert_eq!(r["nodes"].as_array().map(Vec::len), Some(3), "{r}");
    for i in 0..3 {
        assert_eq!(answer(i), "v1", "node {i} after the rollback");
    }
    let (v, h4) = hashes(0);
    assert!(h4.iter().all(|h| *h == v1), "{v}");

    // A node that cannot be reached fails the deploy before any commit, named; once the
    // membership has it down, it is skipped (and listed).
    let log2 = cluster.kill(2);
    let (code, body) = put(0, "v2.tgz", Some(TOKEN));
    assert_eq!(code, 502, "{body}");
    assert!(
        body.contains(&names[2]) && body.contains("nothing changed"),
        "{body}"
    );
    for i in 0..2 {
        assert_eq!(answer(i), "v1", "node {i} after the unreachable deploy");
    }
    dirs_clean("unreachable");
    let down = wait_for(Duration::from_secs(10), || {
        get(0, "/nodes/all")["nodes"].as_array().is_some_and(|n| {
            n.iter()
                .any(|m| m["node"] == names[2].as_str() && m["state"] == "down")
        })
    });
    assert!(down, "node 2 not down:\n{}", get(0, "/nodes/all"));
    let (code, body) = put(0, "v2.tgz", Some(TOKEN));
    assert_eq!(code, 200, "{body}");
    let d = json(&body);
    assert_eq!(d["skipped"], serde_json::json!([names[2]]), "{d}");
    for i in 0..2 {
        assert_eq!(answer(i), "v2", "node {i} after the deploy with node 2 down");
    }
    let v = get(1, "/packages");
    let n2 = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == names[2].as_str())
        .unwrap()
        .clone();
    assert_eq!(n2["state"], "down", "{v}");

    // Every change is logged on the coordinating node with who and what.
    let logs = cluster.logs();
    assert!(
        logs.contains(&format!(
            "(token) deploy: package/ is now {v2} (previous {v1}) on 3 node(s)"
        )),
        "{logs}"
    );
    // Node 2 coordinated the rollback, and refused the commit of `needs_extra`.
    assert!(
        log2.contains(&format!(
            "(token) rollback: package/ is now {v1} (previous {v2}) on 3 node(s)"
        )),
        "{log2}"
    );
    assert!(
        log2.contains("commit failed: the new version failed to load"),
        "{log2}"
    );
    assert!(Path::new(&homes[2].path().join("package")).is_dir());
}
