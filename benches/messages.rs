//! `scripts/bench messages`: messages between two instances of one process through Lua
//! (`stage.request` round trips, the implicit-reply round trip `stage.signal` + reply
//! handler, one-way `stage.signal`), each beside a baseline measured in
//! the same run: two plain threads doing the same exchange through the same router and
//! channel types (`stage::router`), without Lua. Prints the rates and their ratios.
//!
//! Every loop is bounded by a count and by time; everything stays inside the process.

use stage::router::{Direct, Kind, Message, NoRemote, Router, Scope, SenderInfo};
use stage::value::Value;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

// The same allocator as the `stage` binary, so that the baseline differs only by Lua.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Requests in flight at once (one coroutine / task each).
const CONCURRENCY: [usize; 2] = [1, 64];
/// Upper bounds of each phase: messages and seconds.
const REQUESTS: usize = 400_000;
const SIGNALS: usize = 2_000_000;
const SECONDS: f64 = 2.0;
const QUEUE: usize = 4096;

/// Rounds of everything; the best of each is reported, since other work on the machine
/// only ever makes a run slower.
const ROUNDS: usize = 3;

fn main() {
    println!(
        "messages between two instances of one process (queue {QUEUE}; best of {ROUNDS} rounds, each phase bounded by {SECONDS} s)"
    );
    let mut names: Vec<String> = CONCURRENCY
        .iter()
        .map(|c| format!("request/response, {c} in flight"))
        .collect();
    names.push("signal + implicit reply".into());
    names.push("one-way signal".into());
    let mut lua_best = vec![0f64; names.len()];
    let mut base_best = vec![0f64; names.len()];
    for round in 1..=ROUNDS {
        let lua = lua_run();
        let mut base = vec![];
        for c in CONCURRENCY {
            base.push(baseline_requests(c));
        }
        base.push(baseline_implicit());
        base.push(baseline_signals());
        let mut keys: Vec<String> = CONCURRENCY.iter().map(|c| format!("request c={c}")).collect();
        keys.push("implicit".into());
        keys.push("signal".into());
        for (i, key) in keys.iter().enumerate() {
            let got = lua.iter().find(|(k, _)| k == key).map_or(0.0, |(_, v)| *v);
            lua_best[i] = lua_best[i].max(got);
            base_best[i] = base_best[i].max(base[i]);
            println!(
                "  round {round}: {:<34} lua {got:>10.0}/s  baseline {:>10.0}/s",
                names[i], base[i]
            );
        }
    }
    println!(
        "{:<34} {:>14} {:>14} {:>7}",
        "", "lua msg/s", "baseline msg/s", "ratio"
    );
    for (i, name) in names.iter().enumerate() {
        let (g, b) = (lua_best[i], base_best[i]);
        println!("{name:<34} {g:>14.0} {b:>14.0} {:>7.3}", g / b);
    }
}

fn sender() -> Arc<SenderInfo> {
    Arc::new(SenderInfo {
        node: "bench".into(),
        stage: "client".into(),
        instance: 0,
    })
}

fn router() -> Arc<Router> {
    let stages = ["client".to_string(), "server".to_string()];
    Arc::new(Router::new("bench", &stages, QUEUE, Box::new(NoRemote)))
}

/// The server side of the baseline: answers requests with their values, counts signals,
/// and answers a request with no values with the count.
fn serve(r: Arc<Router>) -> std::thread::JoinHandle<()> {
    let mut inbox = r.take_inbox(1).expect("server inbox");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let from = Arc::new(r.sender(1));
            let mut count = 0i64;
            while let Some(msg) = inbox.recv().await {
                match msg.id.as_str() {
                    "stop" => break,
                    "sink" => count += 1,
                    "count" => {
                        r.answer(&msg, &from, Ok(vec![Value::Int(count)]));
                    }
                    _ => {
                        let values = msg.values.clone();
                        r.answer(&msg, &from, Ok(values));
                    }
                }
            }
        });
    })
}

/// Stops the baseline's server thread (it holds the router, so its inbox never closes).
fn stop(r: &Router, server: std::thread::JoinHandle<()>) {
    let mut msg = Message {
        id: "stop".into(),
        from: sender(),
        values: vec![],
        kind: Kind::Reply,
    };
    while let Err(u) = r.send_to(1, msg) {
        msg = u.into_message();
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = server.join();
}

/// The client side: its inbox, where answers arrive, and the requests waiting for them.
struct Client {
    r: Arc<Router>,
    from: Arc<SenderInfo>,
    pending: RefCell<HashMap<String, Direct>>,
    next: std::cell::Cell<u64>,
}

impl Client {
    /// Starts the task that hands answers from the client's inbox to waiting requests.
    fn start(r: &Arc<Router>) -> Rc<Client> {
        let c = Rc::new(Client {
            r: r.clone(),
            from: sender(),
            pending: RefCell::new(HashMap::new()),
            next: std::cell::Cell::new(0),
        });
        let mut inbox = r.take_inbox(0).expect("client inbox");
        let c2 = c.clone();
        tokio::task::spawn_local(async move {
            while let Some(msg) = inbox.recv().await {
                let waiting = c2.pending.borrow_mut().remove(&msg.id);
                if let Some(direct) = waiting {
                    direct.send(Ok(msg.values));
                }
            }
        });
        c
    }

    /// A request as `stage.request` does it: answered through its direct channel (or, as
    /// from another node, as a message to its pending reply id).
    async fn request(&self, id: &str, values: Vec<Value>) -> Vec<Value> {
        let n = self.next.get() + 1;
        self.next.set(n);
        let cb = format!("~request.{n}");
        let (direct, rx) = Direct::channel();
        self.pending.borrow_mut().insert(cb.clone(), direct.clone());
        let msg = Message {
            id: id.into(),
            from: self.from.clone(),
            values,
            kind: Kind::Request {
                cb: cb.clone(),
                direct,
            },
        };
        self.r.deliver(Scope::One, "server", msg).expect("deliver");
        let answer = rx.await.expect("reply").expect("answered");
        self.pending.borrow_mut().remove(&cb);
        answer
    }
}

/// Round trips per second with `c` requests in flight, over the same router and channels.
fn baseline_requests(c: usize) -> f64 {
    let r = router();
    let server = serve(r.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let (n, secs) = local.block_on(&rt, async {
        let client = Client::start(&r);
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(SECONDS);
        let mut tasks = vec![];
        for _ in 0..c {
            let client = client.clone();
            tasks.push(tokio::task::spawn_local(async move {
                let mut n = 0;
                for i in 0..REQUESTS / c {
                    let v = client.request("echo", vec![Value::Int(i as i64)]).await;
                    assert_eq!(v, [Value::Int(i as i64)]);
                    n += 1;
                    if i.is_multiple_of(256) && Instant::now() > deadline {
                        break;
                    }
                }
                n
            }));
        }
        let mut n = 0;
        for t in tasks {
            n += t.await.unwrap();
        }
        (n, start.elapsed().as_secs_f64())
    });
    stop(&r, server);
    n as f64 / secs
}

/// One-way messages per second; a full queue makes the sender sleep 1 ms, as the Lua
/// sender does.
fn baseline_signals() -> f64 {
    let r = router();
    let server = serve(r.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let (n, secs) = local.block_on(&rt, async {
        let client = Client::start(&r);
        let from = sender();
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(SECONDS);
        let mut sent = 0usize;
        while sent < SIGNALS {
            let msg = Message {
                id: "sink".into(),
                from: from.clone(),
                values: vec![Value::Int(sent as i64)],
                kind: Kind::Signal {
                    cb: None,
                    implicit: true,
                },
            };
            if r.deliver(Scope::One, "server", msg).is_ok() {
                sent += 1;
                if sent.is_multiple_of(4096) && Instant::now() > deadline {
                    break;
                }
            } else {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        // Messages from one sender are handled in order: the count answers for all of them.
        let count = client.request("count", vec![]).await;
        assert_eq!(count, [Value::Int(sent as i64)]);
        (sent, start.elapsed().as_secs_f64())
    });
    stop(&r, server);
    n as f64 / secs
}

/// Implicit-reply round trips per second: a signal, answered by the server with its values
/// as a message to the client's inbox, which sends the next one (one in flight).
fn baseline_implicit() -> f64 {
    let r = router();
    let server = serve(r.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut inbox = r.take_inbox(0).expect("client inbox");
    let (n, secs) = rt.block_on(async {
        let from = sender();
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(SECONDS);
        let mut n = 0usize;
        while n < REQUESTS {
            let msg = Message {
                id: "echo".into(),
                from: from.clone(),
                values: vec![Value::Int(n as i64)],
                kind: Kind::Signal {
                    cb: None,
                    implicit: true,
                },
            };
            r.deliver(Scope::One, "server", msg).expect("deliver");
            let answer = inbox.recv().await.expect("answer");
            assert_eq!(answer.values, [Value::Int(n as i64)]);
            n += 1;
            if n.is_multiple_of(256) && Instant::now() > deadline {
                break;
            }
        }
        (n, start.elapsed().as_secs_f64())
    });
    stop(&r, server);
    n as f64 / secs
}

const SERVER: &str = r#"
local count = 0
stage.waitfor("echo", function(x) return x end)
stage.waitfor("sink", function() count = count + 1 end)
stage.waitfor("count", function() return count end)
"#;

const CLIENT: &str = r#"
local REQUESTS, SIGNALS, SECONDS = ...
local function requests(c)
    local done, finished = 0, 0
    local t0 = process.tick
    local deadline = t0 + SECONDS
    for _ = 1, c do
        stage.submit(0, function()
            for i = 1, REQUESTS // c do
                local v = stage.request("server:echo", 10000, i)
                if v ~= i then logger.error("BENCH bad reply " .. tostring(v)); process.exit(2) end
                done = done + 1
                if i % 256 == 0 and process.tick > deadline then break end
            end
            finished = finished + 1
        end)
    end
    while finished < c do stage.sleep(1) end
    print(string.format("BENCH request c=%d %d %.6f", c, done, process.tick - t0))
end
local function implicit()
    local t0 = process.tick
    local deadline = t0 + SECONDS
    local n, finished = 0, false
    -- the server's return values come back as message "echo": send the next one from there
    stage.waitfor("echo", function(v)
        if v ~= n then logger.error("BENCH bad reply " .. tostring(v)); process.exit(2) end
        n = n + 1
        if n < REQUESTS and (n % 256 ~= 0 or process.tick < deadline) then
            stage.signal("server:echo", n)
        else
            finished = true
        end
    end)
    stage.signal("server:echo", 0)
    while not finished do stage.sleep(1) end
    print(string.format("BENCH implicit %d %.6f", n, process.tick - t0))
end
local function signals()
    local t0 = process.tick
    local deadline = t0 + SECONDS
    local sent, signal = 0, stage.signal
    while sent < SIGNALS do
        if signal("server:sink", sent) == 1 then
            sent = sent + 1
            if sent % 4096 == 0 and process.tick > deadline then break end
        else
            stage.sleep(1)
        end
    end
    local count = stage.request("server:count", 10000)
    if count ~= sent then logger.error("BENCH lost signals " .. tostring(count)); process.exit(2) end
    print(string.format("BENCH signal %d %.6f", sent, process.tick - t0))
end
-- warm up
for i = 1, 2000 do stage.request("server:echo", 10000, i) end
for _, c in ipairs({ CONCURRENCY }) do requests(c) end
implicit()
signals()
process.exit(0)
"#;

/// Runs the Lua side in the real binary; returns (phase, messages per second).
fn lua_run() -> Vec<(String, f64)> {
    let home = tempfile::tempdir().expect("tempdir");
    for d in ["conf", "package"] {
        std::fs::create_dir_all(home.path().join(d)).unwrap();
    }
    std::fs::write(
        home.path().join("conf/stage.json"),
        format!(
            r##"{{"#startup": [["lua+client"], ["lua+server"]], "#threads": [2, {QUEUE}], "#usage": 0,
                "lua": {{"lua+client": "client", "lua+server": "server"}}}}"##
        ),
    )
    .unwrap();
    let concurrency: Vec<String> = CONCURRENCY.iter().map(|c| c.to_string()).collect();
    let client = CLIENT.replace("CONCURRENCY", &concurrency.join(", ")).replacen(
        "local REQUESTS, SIGNALS, SECONDS = ...",
        &format!("local REQUESTS, SIGNALS, SECONDS = {REQUESTS}, {SIGNALS}, {SECONDS}"),
        1,
    );
    std::fs::write(home.path().join("package/client.lua"), client).unwrap();
    std::fs::write(home.path().join("package/server.lua"), SERVER).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_stage"))
        .arg("run")
        .arg(home.path())
        .env("STAGE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start stage");
    let start = Instant::now();
    let limit = Duration::from_secs_f64(SECONDS * 6.0 + 30.0);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut log = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut log);
    if status.is_none_or(|s| !s.success()) {
        eprintln!("the Lua run failed ({status:?}):\n{log}");
    }
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find("BENCH ")? + 6..];
            let parts: Vec<&str> = rest.split_whitespace().collect();
            let (name, n, secs) = match parts.as_slice() {
                ["request", c, n, s] => (format!("request {c}"), n, s),
                ["signal", n, s] => ("signal".to_string(), n, s),
                ["implicit", n, s] => ("implicit".to_string(), n, s),
                _ => return None,
            };
            Some((name, n.parse::<f64>().ok()? / secs.parse::<f64>().ok()?))
        })
        .collect()
}
