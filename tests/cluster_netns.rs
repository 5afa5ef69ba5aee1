//! The cluster over a real network path between two network namespaces joined by a veth
//! pair (made by this test, torn down after it): a 50 ms delay each way, then 10% datagram
//! loss both ways on top of it (nftables `numgen random`), then a partition (every datagram
//! dropped), then the heal. Requests with deadlines always resolve (an answer or
//! `timeout`/no stage, never a hang, never a wrong answer), the partition is detected, and
//! membership heals.
//!
//! The delay: this machine's kernel has no `sch_netem`, so `tc netem delay` cannot be used.
//! Each namespace sends its UDP packets through a netfilter queue instead (`iptables -j
//! NFQUEUE`), where tests/nfq_delay.py holds each one 50 ms and lets it go unchanged (an
//! authenticated datagram stays valid; a relay that rewrote addresses would break its tag).
//!
//! Needs root, `ip` (iproute2), `nft` (nftables), `iptables` and Python's NetfilterQueue
//! (installed by scripts/setup). Without them it says why and skips, except under CI=true,
//! where it fails.

mod harness;

use harness::{stage_bin, TestHome};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "netns test cluster key";

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two namespaces `<tag>a` (10.231.0.1) and `<tag>b` (10.231.0.2) joined by a veth pair;
/// deleted on drop (which also deletes the veth pair and every nftables table in them).
struct Net {
    a: String,
    b: String,
}

impl Net {
    fn new() -> Result<Net, String> {
        let tag = format!("stg{}", std::process::id() % 100000);
        let net = Net {
            a: format!("{tag}a"),
            b: format!("{tag}b"),
        };
        let (va, vb) = (format!("{tag}va"), format!("{tag}vb"));
        sh(&["ip", "netns", "add", &net.a])?;
        sh(&["ip", "netns", "add", &net.b])?;
        sh(&["ip", "link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        sh(&["ip", "link", "set", &va, "netns", &net.a])?;
        sh(&["ip", "link", "set", &vb, "netns", &net.b])?;
        for (ns, dev, ip) in [(&net.a, &va, "10.231.0.1/24"), (&net.b, &vb, "10.231.0.2/24")] {
            sh(&["ip", "-n", ns, "addr", "add", ip, "dev", dev])?;
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// Replaces the fault rules of both namespaces: `rule` is an nftables statement applied
    /// to every UDP datagram leaving each namespace (None: no fault).
    fn fault(&self, rule: Option<&str>) {
        for ns in [&self.a, &self.b] {
            let _ = sh(&[
                "ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "fault",
            ]);
            if let Some(rule) = rule {
                let nft = |args: &str| {
                    let mut v = vec!["ip", "netns", "exec", ns.as_str(), "nft"];
                    v.extend(args.split(' '));
                    sh(&v).expect("nft rule");
                };
                nft("add table inet fault");
                nft("add chain inet fault out { type filter hook output priority 0 ; policy accept ; }");
                nft(&format!("add rule inet fault out meta l4proto udp {rule}"));
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.a]);
        let _ = sh(&["ip", "netns", "del", &self.b]);
    }
}

/// A delay of every UDP packet leaving either namespace, while it lives: an NFQUEUE rule in
/// each namespace's OUTPUT chain and tests/nfq_delay.py holding the queue's packets.
struct Delay<'a> {
    net: &'a Net,
    holders: Kill,
}

impl Net {
    fn delay(&self, ms: u32) -> Delay<'_> {
        let mut holders = Kill(vec![]);
        for ns in [&self.a, &self.b] {
            // --queue-bypass: should the holder die, packets pass undelayed rather than vanish
            // (the test's latency check then fails with a clear message).
            sh(&[
                "ip",
                "netns",
                "exec",
                ns,
                "iptables",
                "-A",
                "OUTPUT",
                "-p",
                "udp",
                "-j",
                "NFQUEUE",
                "--queue-num",
                "0",
                "--queue-bypass",
            ])
            .expect("iptables NFQUEUE rule");
            let mut c = Command::new("ip")
                .args(["netns", "exec", ns, "python3"])
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nfq_delay.py"))
                .args(["0", &ms.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start tests/nfq_delay.py");
            let mut line = String::new();
            use std::io::BufRead;
            let _ = std::io::BufReader::new(c.stdout.take().expect("stdout")).read_line(&mut line);
            assert_eq!(
                line.trim(),
                "ready",
                "tests/nfq_delay.py did not bind its queue in {ns}"
            );
            holders.0.push(c);
        }
        Delay { net: self, holders }
    }
}

impl Drop for Delay<'_> {
    fn drop(&mut self) {
        for ns in [&self.net.a, &self.net.b] {
            let _ = sh(&["ip", "netns", "exec", ns, "iptables", "-F", "OUTPUT"]);
        }
        for c in &mut self.holders.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn prerequisites() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root: network namespaces need CAP_SYS_ADMIN".into());
    }
    for tool in ["ip", "nft", "iptables"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Err(format!("`{tool}` is not installed (scripts/setup installs it)"));
        }
    }
    let nfq = Command::new("python3")
        .args(["-c", "import netfilterqueue"])
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !nfq.status.success() {
        return Err("Python's NetfilterQueue is not installed (scripts/setup installs it)".into());
    }
    Ok(())
}

fn spawn_in(ns: &str, home: &Path, env: &[(&str, String)]) -> Child {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(stage_bin())
        .arg("run")
        .arg(home)
        .env("STAGE_LOG", "info")
        .env("STAGE_CLUSTER_KEY", KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(home.join("node.log")).expect("node.log"));
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().expect("start stage in a namespace")
}

fn home(cluster: serde_json::Value, stage: &str, script: &str) -> TestHome {
    let h = TestHome::new();
    let conf = serde_json::json!({
        "#cluster": cluster,
        "#cluster-key": "env:STAGE_CLUSTER_KEY",
        "#router": [600],
        "#startup": [[format!("lua+{stage}")]],
        "lua": {"lua+db": "db"},
    });
    h.write("conf/stage.json", &conf.to_string());
    h.write("package/db.lua", include_str!("lua/cluster/db.lua"));
    h.write("package/start.lua", script);
    h
}

#[derive(Debug, Clone, Default, serde::Deserialize)]
struct Stats {
    ok: u64,
    timeout: u64,
    other: u64,
    wrong: u64,
    max_ms: u64,
    /// The sum of every request's time (ms).
    sum_ms: u64,
    state: String,
    /// How many stage ids the other node advertises, as this one sees it.
    stages: u64,
    /// The error strings of requests that ended neither answered nor timed out (shown in
    /// the failure messages).
    #[allow(dead_code)]
    errors: std::collections::BTreeMap<String, bool>,
}

fn stats(p: &Path) -> Stats {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

/// Waits until `f` holds for the stats (up to `limit`); returns them either way.
fn wait_for(p: &Path, limit: Duration, f: impl Fn(&Stats) -> bool) -> (bool, Stats) {
    let end = Instant::now() + limit;
    loop {
        let s = stats(p);
        if f(&s) {
            return (true, s);
        }
        if Instant::now() > end {
            return (false, s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The membership lines of the nodes' logs (for failure messages).
fn cluster_log(homes: &[&TestHome]) -> String {
    homes
        .iter()
        .map(|h| {
            let log = std::fs::read_to_string(h.path().join("node.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().filter(|l| l.contains("cluster")).collect();
            format!("--- {}:\n{}", h.path().display(), lines.join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

struct Kill(Vec<Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn loss_and_a_partition_on_a_real_network_path() {
    if let Err(why) = prerequisites() {
        assert!(
            std::env::var("CI").is_err(),
            "CI=true and the network fault test cannot run: {why}"
        );
        eprintln!("SKIPPED: the network fault test cannot run here: {why}");
        return;
    }
    let net = Net::new().expect("network namespaces with a veth pair");
    let port = 9871;
    let (a, b) = ("10.231.0.1", "10.231.0.2");
    let server = home(serde_json::json!([port, format!("{a}:{port}")]), "db", "");
    let client = home(
        serde_json::json!([port, format!("{b}:{port}")]),
        "stage",
        include_str!("lua/cluster/netns_client.lua"),
    );
    let st = client.path().join("stats.json");
    let mut procs = Kill(vec![]);
    procs.0.push(spawn_in(&net.b, server.path(), &[]));
    procs.0.push(spawn_in(
        &net.a,
        client.path(),
        &[
            ("OTHER", format!("{b}:{port}")),
            ("STATS", st.display().to_string()),
        ],
    ));

    // Healthy: answers flow.
    let (up, s0) = wait_for(&st, Duration::from_secs(20), |s| s.state == "alive" && s.ok >= 50);
    assert!(
        up,
        "the two nodes never formed a cluster over the veth pair: {s0:?}"
    );
    println!("healthy: {s0:?}");

    // 50 ms each way for 5 s: a round trip takes 100 ms, well inside the 300 ms deadline, so
    // requests are answered and the member stays alive with its stage ids.
    let delay = net.delay(50);
    // The client writes its stats every 200 ms: these were written after the delay began.
    std::thread::sleep(Duration::from_millis(500));
    let sd0 = stats(&st);
    std::thread::sleep(Duration::from_secs(5));
    let sd = stats(&st);
    let (ok, to) = (sd.ok - sd0.ok, sd.timeout - sd0.timeout);
    let n = ok + to + (sd.other - sd0.other) + (sd.wrong - sd0.wrong);
    let mean = (sd.sum_ms - sd0.sum_ms) as f64 / n.max(1) as f64;
    println!("50 ms delay each way: {ok} answered, {to} timed out, mean {mean:.0} ms, {sd:?}");
    assert_eq!(sd.wrong, 0, "a wrong answer: {sd:?}");
    assert!(
        (95.0..300.0).contains(&mean),
        "with 50 ms each way a round trip takes 100 ms, not {mean:.0} ms: was the delay applied? {sd:?}"
    );
    // A holder starved on a loaded machine may stretch a few past 300 ms; no more.
    assert!(
        ok >= 20 && to * 10 <= ok,
        "under a 50 ms delay requests are answered: {ok} answered, {to} timeouts\n{}",
        cluster_log(&[&server, &client])
    );
    assert!(
        sd.state == "alive" && sd.stages >= 1,
        "a 50 ms delay made the other node {} with {} stage ids\n{}",
        sd.state,
        sd.stages,
        cluster_log(&[&server, &client])
    );

    // 10% loss each way on top of the delay for 6 s: every request resolves, most are
    // answered, the member stays.
    net.fault(Some("numgen random mod 10 == 0 drop"));
    std::thread::sleep(Duration::from_secs(6));
    let s1 = stats(&st);
    let (ok, to) = (s1.ok - sd.ok, s1.timeout - sd.timeout);
    println!(
        "10% loss and 50 ms delay: {ok} answered, {to} timed out, {:?}",
        s1
    );
    assert_eq!(s1.wrong, 0, "a wrong answer: {s1:?}");
    // One request at a time: each lost one costs its whole 300 ms deadline (an answered one
    // 100 ms), so timeouts take much of the 6 s; still more are answered than lost.
    assert!(
        ok > to,
        "under 10% loss most requests are answered: {ok} vs {to} timeouts"
    );
    assert!(
        to > 0,
        "10% loss each way lost no request at all: was the fault applied? {s1:?}"
    );
    assert!(
        s1.max_ms <= 300 + 250,
        "a request outlived its 300 ms deadline: {s1:?}"
    );
    // Under the same loss answers go on: the member may be suspected, declared down and
    // rejoin, or lose its stage ids for a moment, but within a few sync intervals it is back
    // with its stage ids (issue #14: both nodes renewing their identities at once used to
    // wedge the membership, leaving the other node "alive" with no stage ids for good).
    let (going, s1b) = wait_for(&st, Duration::from_secs(8), |s| {
        s.ok >= s1.ok + 20 && s.stages >= 1
    });
    assert!(
        going,
        "answers stopped under 10% loss: {s1:?} then {s1b:?}\n{}",
        cluster_log(&[&server, &client])
    );
    println!("still answering under 10% loss: {s1b:?}");
    drop(delay);

    // Partition: nothing passes. The other node is detected down; requests keep resolving.
    net.fault(Some("drop"));
    let t = Instant::now();
    let (down, s2) = wait_for(&st, Duration::from_secs(15), |s| {
        s.state == "down" || s.state == "none"
    });
    assert!(
        down,
        "the partition was not detected within 15 s: {s2:?}\n{}",
        cluster_log(&[&server, &client])
    );
    println!("partition detected after {} ms: {s2:?}", t.elapsed().as_millis());
    std::thread::sleep(Duration::from_secs(1));
    let s3 = stats(&st);
    assert!(
        s3.timeout + s3.other > s2.timeout + s2.other,
        "requests during the partition must resolve with an error: {s3:?}"
    );
    assert_eq!(s3.ok, s2.ok, "an answer crossed a full partition: {s3:?}");

    // Heal: the member comes back and answers flow again.
    net.fault(None);
    let t = Instant::now();
    let (healed, s4) = wait_for(&st, Duration::from_secs(20), |s| {
        s.state == "alive" && s.ok >= s3.ok + 50
    });
    assert!(
        healed,
        "membership did not heal within 20 s of the partition's end: {s4:?}\n{}",
        cluster_log(&[&server, &client])
    );
    println!("healed after {} ms: {s4:?}", t.elapsed().as_millis());
    assert_eq!(s4.wrong, 0);
    assert!(s4.max_ms <= 300 + 250, "a request outlived its deadline: {s4:?}");
}
