//! Messages between instances (stage.waitfor / signal / request), thread.new and _SANDBOX:
//! one test per Lua scenario under tests/lua/messages/ and tests/lua/thread/.

mod harness;

macro_rules! scenarios {
    ($($name:ident => $path:literal,)*) => {
        $(#[test] fn $name() { harness::run_scenario($path); })*
    };
}

scenarios! {
    messages_targets => "messages/targets.lua",
    messages_broadcast_roundrobin => "messages/broadcast_roundrobin.lua",
    messages_request_wait => "messages/request_wait.lua",
    messages_fifo => "messages/fifo.lua",
    messages_values => "messages/values.lua",
    messages_full_queue => "messages/full_queue.lua",
    messages_sandbox => "messages/sandbox.lua",
    thread_new => "thread/new.lua",
    thread_reuse => "thread/reuse.lua",
}
