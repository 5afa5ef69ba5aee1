-- densefog.worker's webhook: a failed job is posted as Slack-style JSON to HOOK .. path
-- (a local HTTP server in tests/densefog.rs records the bodies); a webhook that never
-- answers does not hold the worker, and its failure is logged once.
local densefog = require("densefog")

local function wait_for(what, limit, cond)
    local t0 = process.tick
    while not cond() do
        if process.tick - t0 > limit then fail("timed out waiting for " .. what) end
        stage.sleep(50)
    end
end

local function fresh(name)
    odbc.new("DB", function (adp) adp.execute("DROP TABLE IF EXISTS " .. name) end)
    local jobs = densefog.jobs{ db = "DB", table = name }
    jobs.migrate()
    return jobs
end

-- Bad options are refused with a message that says what is expected.
local ok, e = pcall(densefog.worker, { db = "DB", actions = {}, webhook = "ftp://example.com/x" })
check(not ok and tostring(e):find("webhook must be an http:// or https:// URL", 1, true), tostring(e))
ok, e = pcall(densefog.worker, { db = "DB", actions = {}, webhook = HOOK .. "/hook", webhook_timeout = -1 })
check(not ok and tostring(e):find("webhook_timeout", 1, true), tostring(e))

-- 1. The webhook and the Lua hook both hear of a failed job.
local jobs = fresh("job_wh")
local notified = 0
local w = densefog.worker{ db = "DB", table = "job_wh", exec_size = 2, interval = 0.2,
    webhook = HOOK .. "/hook", notify = function () notified = notified + 1 end,
    actions = { Burn = function () error("disk on fire") end } }
local burn = jobs.add("Burn", { zone = "z1" }, { try_max = 1 })
wait_for("Burn to fail", 10, function () return jobs.get(burn).status == "error" end)
wait_for("notify", 5, function () return notified == 1 end)
w.stop()
print("BURN_ID=" .. burn)

-- 2. A webhook that never answers: the worker goes on with other jobs meanwhile (the
-- Rust side asserts they finished before the post's 4 s timeout).
jobs = fresh("job_slow")
local w2 = densefog.worker{ db = "DB", table = "job_slow", exec_size = 1, interval = 0.2,
    webhook = HOOK .. "/slow/T0KEN-not-for-logs", webhook_timeout = 4,
    actions = { Fail = function () error("no capacity") end, Quick = function () return "ok" end } }
local failing = jobs.add("Fail", {}, { try_max = 1 })
wait_for("Fail to fail", 10, function () return jobs.get(failing).status == "error" end)
local t0 = process.tick -- the post to /slow has started: it hangs for 4 s
local quick = {}
for i = 1, 5 do quick[i] = jobs.add("Quick", { i = i }) end
wait_for("quick jobs", 10, function () return jobs.counts().finished == 5 end)
print(string.format("QUICK_AFTER_FAIL=%.3f", process.tick - t0))

-- 3. A webhook answering 500: logged, not retried.
local w3 = densefog.worker{ db = "DB", table = "job_slow", exec_size = 1, interval = 0.2,
    webhook = HOOK .. "/fail", actions = { Fail = function () error("again") end } }
w2.stop()
local f2 = jobs.add("Fail", {}, { try_max = 1 })
wait_for("second Fail", 10, function () return jobs.get(f2).status == "error" end)
w3.stop()

-- The posts finish on their own (the slow one by its 4 s timeout) before the node stops.
stage.sleep(5000)
done()
