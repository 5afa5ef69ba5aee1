//! `#metrics`: a node serves its Prometheus exposition; the text passes `promtool check
//! metrics`, counters move as a Python BSON client, a Python WebSocket client and curl drive
//! traffic (ODBC queries on SQLite through the HTTP handler move the query histogram and the
//! pool's gauges), and a real Prometheus server scrapes it.

mod harness;

use harness::{free_tcp_port, wait_for, wait_with_output, TestHome};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A node with `#metrics` on `mport`, two `stage` instances sharing a BSON echo port, a
/// WebSocket echo port (`ws://…/echo?text`, `wport`) and an HTTP port; a frame `{boom: 1}`
/// raises an error in the receive function. On HTTP, `/db` runs an ODBC query on SQLite
/// (`%odbc` DB) and answers its result, `/dberr` a failing one.
struct Node {
    _home: TestHome,
    child: Option<Child>,
}

impl Node {
    fn start(mport: u16, tport: u16, hport: u16) -> Node {
        Node::start_with(mport, tport, hport, free_tcp_port(), free_tcp_port())
    }

    fn start_with(mport: u16, tport: u16, hport: u16, wport: u16, sport: u16) -> Node {
        let home = TestHome::new();
        std::fs::create_dir_all(home.path().join("data")).unwrap();
        stage::net::tls::make_test_ca(home.path()).expect("test CA");
        home.write(
            "conf/stage.json",
            &serde_json::json!({
                "#metrics": format!("127.0.0.1:{mport}"),
                "#services": {"tcp": [format!("127.0.0.1:{tport}"), format!("127.0.0.1:{hport}"),
                                      format!("127.0.0.1:{wport}"), format!("127.0.0.1:{sport}")]},
                "#tls": {"cert": "cert.pem", "key": "key.pem", "ca": "ca.pem"},
                "#startup": [["lua+stage"], ["lua+stage"]],
                "lua": {"%odbc": {"DB": {"DRIVER": "SQLite3", "DATABASE": "data/metrics.db",
                                         ".connectionTimeout": 5000}}},
            })
            .to_string(),
        );
        home.write(
            "package/start.lua",
            &format!(
                r#"
broker.ready("tcp://127.0.0.1:{tport}?bson", function() return function(s, d)
    if d.boom then error("boom on purpose") end
    return d
end end)
broker.ready("ws://127.0.0.1:{wport}/echo?text", function() return function(s, d) return d end end)
broker.ready("tls://127.0.0.1:{sport}?text", function() return function(s, d) return d end end)
broker.ready("http://127.0.0.1:{hport}", function(req)
    if req.path == "/db" then
        return odbc.new("DB", function(adp) return tostring(adp.query("SELECT 41 + 1 AS v")[1].v) end)
    elseif req.path == "/dberr" then
        return odbc.new("DB", function(adp)
            local ok = pcall(adp.execute, "SELECT * FROM no_such_table_x")
            return ok and "no error" or "failed"
        end)
    end
    return "hello"
end)
"#
            ),
        );
        let child = home.spawn();
        Node {
            _home: home,
            child: Some(child),
        }
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

/// `curl -sf URL` → body, or None.
fn curl(url: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "5", url])
        .output()
        .expect("curl");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The sum of every series of `name` (exact metric name, labels ignored).
fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// N lines over the TLS echo (the test CA of the home), each answered; prints OK.
const TLS_CLIENT: &str = r#"
import socket, ssl, sys
port, ca, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ctx = ssl.create_default_context(cafile=ca)
with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        f = s.makefile("rwb")
        for i in range(n):
            f.write(f"line {i:04d}\n".encode())
            f.flush()
            assert f.readline() == f"line {i:04d}\n".encode()
print("OK")
"#;

/// N text messages over the WebSocket echo, each answered; prints OK.
const WS_CLIENT: &str = r#"
import asyncio, sys
import websockets
async def main():
    port, n = sys.argv[1], int(sys.argv[2])
    async with websockets.connect(f"ws://127.0.0.1:{port}/echo", open_timeout=5) as ws:
        for i in range(n):
            await ws.send(f"hello {i:04d}")
            assert await asyncio.wait_for(ws.recv(), 5) == f"hello {i:04d}"
    print("OK")
asyncio.run(main())
"#;

const CLIENT: &str = r#"
import bson, socket, struct, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
s.settimeout(10)
for i in range(n):
    s.sendall(bson.encode({"i": i, "pad": "x" * 100}))
    hdr = s.recv(4, socket.MSG_WAITALL)
    body = s.recv(struct.unpack("<i", hdr)[0] - 4, socket.MSG_WAITALL)
    assert bson.decode(hdr + body)["i"] == i
s.sendall(bson.encode({"boom": 1}))
s.sendall(bson.encode({"i": -1}))
hdr = s.recv(4, socket.MSG_WAITALL)
body = s.recv(struct.unpack("<i", hdr)[0] - 4, socket.MSG_WAITALL)
assert bson.decode(hdr + body)["i"] == -1, "the connection survives the handler error"
print("OK")
"#;

#[test]
fn exposition_passes_promtool_and_counters_move() {
    let (mport, tport, hport) = (free_tcp_port(), free_tcp_port(), free_tcp_port());
    let (wport, sport) = (free_tcp_port(), free_tcp_port());
    let mut node = Node::start_with(mport, tport, hport, wport, sport);
    let url = format!("http://127.0.0.1:{mport}/metrics");
    let Some(before) = wait_for(Duration::from_secs(15), || {
        curl(&url).filter(|t| t.contains("stage_queue_depth"))
    }) else {
        panic!("no metrics at {url}:\n{}", node.stop());
    };
    assert_eq!(sum(&before, "stage_frames_received_total"), 0.0, "{before}");
    // No ODBC pool before the first odbc.new.
    assert!(!before.contains("stage_odbc_"), "{before}");
    // Two instances, each with a queue.
    assert!(
        before.contains("stage_queue_depth{instance=\"stage#0\"} 0"),
        "{before}"
    );
    assert!(
        before.contains("stage_queue_depth{instance=\"stage#1\"} 0"),
        "{before}"
    );

    // Traffic: 50 echoed frames and one that raises, from Python's bson; 3 HTTP requests.
    wait_for(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", tport)).ok()
    })
    .expect("echo port");
    let out = Command::new("python3")
        .args(["-c", CLIENT, &tport.to_string(), "50"])
        .output()
        .expect("python3 (scripts/setup installs pymongo)");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("OK"),
        "client: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        node.stop()
    );
    for _ in 0..3 {
        assert_eq!(
            curl(&format!("http://127.0.0.1:{hport}/")).as_deref(),
            Some("hello")
        );
    }
    // 20 WebSocket messages, echoed.
    let out = Command::new("python3")
        .args(["-c", WS_CLIENT, &wport.to_string(), "20"])
        .output()
        .expect("python3 (scripts/setup installs websockets)");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("OK"),
        "ws client: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        node.stop()
    );
    // 10 lines over TLS, echoed.
    let ca = node._home.path().join("ca.pem");
    let out = Command::new("python3")
        .args(["-c", TLS_CLIENT, &sport.to_string(), ca.to_str().unwrap(), "10"])
        .output()
        .expect("python3");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("OK"),
        "tls client: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        node.stop()
    );
    // ODBC: 4 good queries and one failing one on SQLite.
    for _ in 0..4 {
        assert_eq!(
            curl(&format!("http://127.0.0.1:{hport}/db")).as_deref(),
            Some("42"),
            "{}",
            node.stop()
        );
    }
    assert_eq!(
        curl(&format!("http://127.0.0.1:{hport}/dberr")).as_deref(),
        Some("failed")
    );

    let after = wait_for(Duration::from_secs(5), || {
        curl(&url).filter(|t| sum(t, "stage_connections") == 0.0)
    })
    .unwrap_or_else(|| {
        panic!(
            "the connection stays counted as open:\n{}",
            curl(&url).unwrap_or_default()
        )
    });
    // Per port: the BSON echo's frames, then the WebSocket's messages.
    let port_sum = |name: &str, port: u16| -> f64 {
        let tag = format!("port=\"{port}\"");
        after
            .lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(&tag))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(port_sum("stage_frames_received_total", tport), 52.0, "{after}");
    assert_eq!(port_sum("stage_frames_sent_total", tport), 51.0, "{after}");
    assert_eq!(port_sum("stage_frames_received_total", wport), 20.0, "{after}");
    assert_eq!(port_sum("stage_frames_sent_total", wport), 20.0, "{after}");
    assert_eq!(
        port_sum("stage_received_bytes_total", wport),
        20.0 * 10.0,
        "{after}"
    );
    assert_eq!(port_sum("stage_sent_bytes_total", wport), 20.0 * 10.0, "{after}");
    assert_eq!(
        port_sum("stage_connections_accepted_total", wport),
        1.0,
        "{after}"
    );
    assert_eq!(port_sum("stage_connections", wport), 0.0, "{after}");
    // TLS: frames cut from the decrypted stream, plaintext bytes.
    assert_eq!(port_sum("stage_frames_received_total", sport), 10.0, "{after}");
    assert_eq!(port_sum("stage_frames_sent_total", sport), 10.0, "{after}");
    assert_eq!(
        port_sum("stage_received_bytes_total", sport),
        10.0 * 10.0,
        "{after}"
    );
    assert_eq!(port_sum("stage_sent_bytes_total", sport), 10.0 * 10.0, "{after}");
    assert_eq!(
        port_sum("stage_connections_accepted_total", sport),
        1.0,
        "{after}"
    );
    // The readiness probe's connection and the client's.
    assert_eq!(
        port_sum("stage_connections_accepted_total", tport),
        2.0,
        "{after}"
    );
    assert!(
        sum(&after, "stage_received_bytes_total") > 50.0 * 100.0,
        "{after}"
    );
    assert!(sum(&after, "stage_sent_bytes_total") > 50.0 * 100.0, "{after}");
    assert_eq!(sum(&after, "stage_handler_errors_total"), 1.0, "{after}");
    // ODBC: the pool of "DB", 5 statements timed, one failed, every connection back.
    assert_eq!(
        sum(&after, "stage_odbc_query_duration_seconds_count"),
        5.0,
        "{after}"
    );
    assert!(
        after.contains("stage_odbc_query_duration_seconds_count{name=\"DB\"} 5"),
        "labelled by the connection name: {after}"
    );
    assert!(
        sum(&after, "stage_odbc_query_duration_seconds_sum") > 0.0,
        "{after}"
    );
    assert_eq!(sum(&after, "stage_odbc_query_errors_total"), 1.0, "{after}");
    assert_eq!(sum(&after, "stage_odbc_pool_in_use"), 0.0, "{after}");
    assert_eq!(sum(&after, "stage_odbc_pool_waiting"), 0.0, "{after}");
    assert!(sum(&after, "stage_odbc_pool_size") >= 1.0, "{after}");
    assert!(sum(&after, "stage_odbc_pool_idle") >= 1.0, "{after}");
    assert!(
        sum(&after, "stage_odbc_connections_opened_total") >= 1.0,
        "{after}"
    );
    assert!(
        after.contains(&format!("port=\"{tport}\"")),
        "series are labelled by port: {after}"
    );
    assert_eq!(
        sum(&after, "stage_http_request_duration_seconds_count"),
        3.0 + 5.0,
        "{after}"
    );
    assert!(sum(&after, "stage_uptime_seconds") > 0.0, "{after}");

    // promtool reads the exposition as Prometheus does.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &after).unwrap();
    let check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .expect("promtool (scripts/setup installs Debian's prometheus)");
    assert!(
        check.status.success(),
        "promtool check metrics failed: {}{}\n{after}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    // A wrong path and a wrong method are refused plainly.
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://127.0.0.1:{mport}/nope"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    node.stop();
}

#[test]
fn a_real_prometheus_scrapes_the_node() {
    let (mport, tport, hport, pport) = (free_tcp_port(), free_tcp_port(), free_tcp_port(), free_tcp_port());
    let mut node = Node::start(mport, tport, hport);
    wait_for(Duration::from_secs(15), || {
        curl(&format!("http://127.0.0.1:{mport}/metrics"))
    })
    .unwrap_or_else(|| panic!("no metrics:\n{}", node.stop()));
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("prometheus.yml");
    std::fs::write(
        &conf,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: stage\n    static_configs:\n      - targets: ['127.0.0.1:{mport}']\n"
        ),
    )
    .unwrap();
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", conf.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{pport}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prometheus (scripts/setup installs Debian's prometheus)");
    // `up` is 1 once a scrape succeeded; the queue gauges of both instances are stored.
    let q = |expr: &str| {
        let out = Command::new("curl")
            .args([
                "-sfG",
                "--max-time",
                "5",
                &format!("http://127.0.0.1:{pport}/api/v1/query"),
            ])
            .args(["--data-urlencode", &format!("query={expr}")])
            .output()
            .expect("curl");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let got = wait_for(Duration::from_secs(40), || {
        let up = q("up{job=\"stage\"}")?;
        let depth = q("count(stage_queue_capacity)")?;
        (up.contains("\"1\"]") && depth.contains("\"2\"]")).then_some((up, depth))
    });
    let _ = prom.kill();
    let (_, plog) = wait_with_output(prom, Duration::from_secs(5));
    let nlog = node.stop();
    assert!(
        got.is_some(),
        "prometheus never scraped the node\nprometheus:\n{}\nnode:\n{nlog}",
        plog.lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
}
