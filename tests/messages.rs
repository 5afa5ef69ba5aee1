//! Messages between instances (stage.waitfor / signal / request), thread.new and _SANDBOX:
//! one test per Lua scenario under tests/lua/messages/ and tests/lua/thread/.

#[macro_use]
mod harness;

scenarios! {
    messages_broadcast_roundrobin => "messages/broadcast_roundrobin.lua",
    messages_request_wait => "messages/request_wait.lua",
    messages_fifo => "messages/fifo.lua",
    messages_values => "messages/values.lua",
    messages_full_queue => "messages/full_queue.lua",
    messages_sandbox => "messages/sandbox.lua",
    messages_no_debug => "messages/no_debug.lua",
    thread_new => "thread/new.lua",
    thread_reuse => "thread/reuse.lua",
}

/// A node that stops with requests still queued answers them (`nil, "shutting down"`), so
/// no requester waits forever.
#[test]
fn stop_answers_queued_requests() {
    let home = harness::TestHome::new();
    home.write(
        "conf/stage.json",
        r##"{"#startup": [["lua+stage"], ["lua+b"]], "#threads": [2, 1024]}"##,
    );
    home.write(
        "package/start.lua",
        r#"
if process.stage == 1 then
    stage.waitfor("block", function()
        -- Wall-clock time (process.tick), so a loaded machine does not stretch it.
        local t = process.tick
        while process.tick - t < 0.8 do end
    end)
    stage.waitfor("x", function() return 1 end)
    return
end
stage.signal("b:block")
for _ = 1, 300 do
    stage.submit(0, function() stage.request("b:x", 0) end)
end
stage.sleep(200)
process.exit(0)
"#,
    );
    let (code, out) = harness::wait_with_output(home.spawn(), std::time::Duration::from_secs(30));
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("b#1: answered ") && out.contains(" queued request(s) with \"shutting down\""),
        "{out}"
    );
}
