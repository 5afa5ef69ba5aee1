//! STAGE's message model (shared/reference/stage-compat.md §3): one Lua scenario per row
//! under tests/lua/stagemsg/, the ordered locks under contention, and bare signals from
//! socket handlers staying with the socket's instance.

#[macro_use]
mod harness;

use std::time::Duration;

scenarios! {
    row01_target_stage => "stagemsg/r01_target_stage.lua",
    row02_reply_cb => "stagemsg/r02_reply_cb.lua",
    row03_implicit_reply => "stagemsg/r03_implicit_reply.lua",
    row04_signal_nil => "stagemsg/r04_signal_nil.lua",
    row05_bare_stays_local => "stagemsg/r05_bare_stays_local.lua",
    row06_own_stage_named => "stagemsg/r06_own_stage_named.lua",
    row07_broadcast_other => "stagemsg/r07_broadcast_other.lua",
    row08_broadcast_own => "stagemsg/r08_broadcast_own.lua",
    row09_local_other => "stagemsg/r09_local_other.lua",
    row10_local_own => "stagemsg/r10_local_own.lua",
    row11_remote_other => "stagemsg/r11_remote_other.lua",
    row12_remote_own => "stagemsg/r12_remote_own.lua",
    row13_sync => "stagemsg/r13_sync.lua",
    row14_sender_qualified => "stagemsg/r14_sender_qualified.lua",
    row15_at_routed => "stagemsg/r15_at_routed.lua",
    row16_table_of_messages => "stagemsg/r16_table_of_messages.lua",
    row17_catch_all => "stagemsg/r17_catch_all.lua",
    row18_lock_acquire => "stagemsg/r18_lock_acquire.lua",
    row19_lock_extend => "stagemsg/r19_lock_extend.lua",
    row20_lock_release_expire => "stagemsg/r20_lock_release_expire.lua",
    row21_table_targets => "stagemsg/r21_table_targets.lua",
    row22_waitfor_layout => "stagemsg/r22_waitfor_layout.lua",
    entry_table => "stagemsg/entry_table.lua",
    ticket_docs => "stagemsg/ticket_docs.lua",
    ticket_bound => "stagemsg/ticket_bound.lua",
    route_docs => "stagemsg/route_docs.lua",
    index_docs => "stagemsg/index_docs.lua",
    index_100k => "stagemsg/index_100k.lua",
}

fn run(config: &str, script: &str, limit: u64) -> (Option<i32>, String) {
    let home = harness::TestHome::new();
    home.write("conf/stage.json", config);
    home.write("package/start.lua", script);
    harness::wait_with_output(home.spawn(), Duration::from_secs(limit))
}

/// 8 instances contend for `>L.got`: one holder at a time, granted in the order asked,
/// `>>` keeps a long holder's lease, and an unrenewed lease ends after ~100 ms with a log line.
#[test]
fn locks_under_contention() {
    let config = r##"{"#startup": [["lua+stage"], ["lua+stage"], ["lua+stage"], ["lua+stage"],
        ["lua+stage"], ["lua+stage"], ["lua+stage"], ["lua+stage"]]}"##;
    let script = r#"
_SANDBOX[""] = { "*HOLDER", "*GRANTS", "*FINISHED" }
local me = process.stage
stage.waitfor("got", function()
    if HOLDER ~= nil then fail("instance " .. me .. " granted while " .. HOLDER .. " holds L") end
    HOLDER = me
    GRANTS = (GRANTS or "") .. me .. ","
    if me == 0 then
        stage.signal(">>L.got", 1000)   -- longer than the 100 ms lease: needs the extension
        stage.sleep(400)
    else
        stage.sleep(20)
    end
    if HOLDER ~= me then fail("instance " .. me .. " lost L while holding it") end
    HOLDER = nil
    stage.signal("<L.*")
    FINISHED = (FINISHED or 0) + 1
end)
stage.waitfor("start", function()
    stage.sleep(40 * me)
    stage.signal(">L.got")
end)
if me ~= 0 then return end
stage.sleep(300)          -- every instance has booted
stage.signal("*start")
if not wait_until(function() return FINISHED == 8 end, 10000) then fail("finished " .. tostring(FINISHED)) end
eq(GRANTS, "0,1,2,3,4,5,6,7,", "FIFO")
-- an unrenewed holder loses the lock after ~100 ms
local t_a, t_b
stage.waitfor("a", function() t_a = process.tick end)           -- never releases
stage.waitfor("b", function() t_b = process.tick end)
stage.signal(">E.a")
stage.signal(">E.b")
if not wait_until(function() return t_b ~= nil end, 3000) then fail("E never passed on") end
local held = t_b - t_a
check(held > 0.08 and held < 1.0, "the lease lasted " .. held .. " s")
done()
"#;
    let (code, out) = run(config, script, 60);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("lock 'E' released: the lease of 0@"), "{out}");
}

/// Two instances of one stage serve one port each; a bare `stage.signal("callback", ...)`
/// from a socket handler runs in the instance that owns the socket, 1,000 times of 1,000.
#[test]
fn bare_signal_stays_with_the_socket() {
    let config = r##"{"#startup": [["lua+stage"], ["lua+stage"], ["lua+client"]]}"##;
    let script = r#"
-- one counter per instance: a shared global is replaced, not incremented atomically
_SANDBOX[""] = { "*PORTS", "*RIGHT0", "*RIGHT1", "*WRONG0", "*WRONG1" }
local right, wrong = "RIGHT" .. process.stage, "WRONG" .. process.stage
if process.stage == 2 then
    stage.waitfor("go", function()
        for _, port in ipairs(PORTS) do
            local c = broker.join("tcp://127.0.0.1:" .. port .. "?text", function() return true end)
            for i = 1, 500 do c.commit(i .. "\n") end
        end
    end)
    return
end
stage.waitfor("callback", function(id, owner)
    if owner == process.stage and broker.f(id) ~= nil then
        _G[right] = (_G[right] or 0) + 1
    else
        _G[wrong] = (_G[wrong] or 0) + 1
    end
end)
local port = broker.ready("tcp://127.0.0.1:0?text", function() return true end)
port.receive = function(socket, line)
    stage.signal("callback", socket.id, process.stage)
end
if process.stage == 1 then
    stage.sleep(100)
    PORTS = { PORTS[1], port.port }
    return
end
PORTS = { port.port }
stage.sleep(400)
eq(#PORTS, 2, "both ports known")
stage.signal("client:go")
local function total() return (RIGHT0 or 0) + (RIGHT1 or 0) + (WRONG0 or 0) + (WRONG1 or 0) end
if not wait_until(function() return total() >= 1000 end, 20000) then fail("handled " .. total()) end
stage.sleep(100)
eq((WRONG0 or 0) + (WRONG1 or 0), 0, "handled in another instance")
eq(RIGHT0, 500)
eq(RIGHT1, 500)
done()
"#;
    let (code, out) = run(config, script, 60);
    assert_eq!(code, Some(0), "{out}");
}

/// A small HTTP/1.1 server on loopback for the curl stage: `/ok` (200, a cookie), `/fail`
/// (500), `/slow` (answers after 3 s), `/echo` (the body and header `X-A` back).
fn http_server() -> u16 {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(20) {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                let (mut length, mut xa) = (0usize, String::new());
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                        break;
                    }
                    let lower = h.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if lower.starts_with("x-a:") {
                        xa = h[4..].trim().to_string();
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let (status, extra, text) = match path.as_str() {
                    "/ok" => ("200 OK", "Set-Cookie: a=1; Path=/\r\n", "hello".to_string()),
                    "/fail" => ("500 Internal Server Error", "", "boom".to_string()),
                    "/slow" => {
                        std::thread::sleep(Duration::from_secs(3));
                        ("200 OK", "", "late".to_string())
                    }
                    _ => ("200 OK", "", format!("{} {xa}", String::from_utf8_lossy(&body))),
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
            });
        }
    });
    port
}

/// The curl stage against a local HTTP server: a 200 with cookie and extra, a 500, a
/// timeout, a form POST with a header; the instance keeps running meanwhile.
#[test]
fn curl_stage() {
    let port = http_server();
    let config = r##"{"#startup": [["lua+stage"], ["curl.so+agent"]], "curl.so+agent": {"timeout": 5000}}"##;
    let script = r#"
local BASE = "http://127.0.0.1:PORT"
local got = {}
stage.waitfor("callback", function(r) got.ok = r end)
stage.waitfor("on_fail", function(r) got.fail = r end)
stage.waitfor("on_slow", function(r) got.slow = r end)
stage.waitfor("on_post", function(r) got.post = r end)
stage.signal("agent:callback", { url = BASE .. "/ok", extra = { n = 1 } })
stage.signal("agent:x=on_fail", BASE .. "/fail")
stage.signal("agent:x=on_slow", { url = BASE .. "/slow", timeout = 300 })
stage.signal("agent:x=on_post", { url = BASE .. "/echo", data = { a = "b c" }, header = { ["X-A"] = "hi" } })
local ticks = 0
stage.addtask(10, function() ticks = ticks + 1; return 10 end)
check(wait_until(function() return got.ok and got.fail and got.slow and got.post end, 10000), "4 answers")
eq(got.ok.status, 200)
eq(got.ok.url, BASE .. "/ok")
eq(got.ok.data.content, "hello")
eq(got.ok.data.type, "text/plain")
eq(got.ok.data.charset, "utf-8")
eq(got.ok.data.length, 5)
eq(got.ok.data.result, 0)
eq(got.ok.extra.n, 1)
eq(got.ok.cookie[1], "a=1; Path=/")
eq(got.fail.status, 500)
eq(got.fail.data.content, "boom")
eq(got.slow.status, 0)
eq(got.slow.data.result, 28, "curl's timeout code")
check(got.slow.data.time < 2, "gave up after ~300 ms, not 3 s: " .. got.slow.data.time)
eq(got.post.data.content, "a=b+c hi")
check(ticks > 10, "the instance kept running: " .. ticks)
done()
"#
    .replace("PORT", &port.to_string());
    let (code, out) = run(config, &script, 60);
    assert_eq!(code, Some(0), "{out}");
}
