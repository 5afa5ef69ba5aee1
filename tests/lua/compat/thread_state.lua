--! {"#threads": [2, 16]}
-- thread.new bodies run in a full stage state: stage, logger, bundle, process, odbc,
-- preload globals and *NAME globals; thread.id and thread.tick.
_SANDBOX[""] = { "*SHARED_T" }
SHARED_T = "from main"
check(math.type(thread.id) == "integer" and thread.id > 0, "thread.id in the instance")
check(math.abs(thread.tick - os.time()) < 5, "thread.tick is wall-clock seconds")
local main_id = thread.id
local got
thread.new(function (a)
    local out = {}
    out.modules = type(stage) .. type(logger) .. type(bundle) .. type(process) .. type(odbc) .. type(broker)
    out.preload = type(check)                      -- a harness preload global
    out.shared = SHARED_T
    out.id = thread.id
    out.tick = thread.tick
    out.json = bundle.json({ a = a })
    stage.sleep(5)                                 -- waiting works inside a thread body
    logger.info("logged from a thread body", a)
    thread.signal("early")
    SHARED_T = "from thread"
    return out
end, 7).waitfor(function (v)
    if v == "early" then return end
    got = v
end)
check(wait_until(function () return got ~= nil end, 5000), "the thread body finished")
eq(got.modules, "tabletabletabletabletabletable")
eq(got.preload, "function", "preload globals exist in the thread's state")
eq(got.shared, "from main", "*NAME globals are shared with the thread")
check(math.type(got.id) == "integer" and got.id ~= main_id, "thread.id is the worker's: " .. tostring(got.id))
check(math.abs(got.tick - os.time()) < 5, "thread.tick in the body")
eq(got.json, '{"a":7}')
eq(SHARED_T, "from thread", "the thread's assignment to *SHARED_T is seen")

-- a thread body's stage.signal is handled by the instance that started it (STAGE's docs)
local from_thread
stage.waitfor("from_thread", function (v) from_thread = v end)
thread.new(function () stage.signal("from_thread", "THREAD") end)
check(wait_until(function () return from_thread ~= nil end, 5000), "the instance got the thread's signal")
eq(from_thread, "THREAD")

-- to.waitfor(nil) removes the callback: later values are dropped
local late = false
local to = thread.new(function () stage.sleep(50) return "late" end)
to.waitfor(function () late = true end)
to.waitfor(nil)
stage.sleep(300)
eq(late, false, "no callback after waitfor(nil)")
done()
