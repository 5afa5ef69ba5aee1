-- densefog.worker on one node: exec_size is never exceeded, results are recorded, a handler
-- that never returns is failed after exec_timeout and frees its slot, retries wait try_period
-- (run_at, trys), bad params and unknown actions fail at once, notify runs once per failure.
local densefog = require("densefog")
local D = densefog.dialects[DIALECT]

local function fresh(name)
    odbc.new("DB", function (adp) adp.execute("DROP TABLE IF EXISTS " .. name) end)
    local jobs = densefog.jobs{ db = "DB", table = name }
    jobs.migrate()
    jobs.migrate() -- idempotent
    return jobs
end

local function wait_for(what, limit, cond)
    local t0 = process.tick
    while not cond() do
        if process.tick - t0 > limit then fail("timed out waiting for " .. what) end
        stage.sleep(50)
    end
end

-- 1. 30 jobs, exec_size 4: the concurrency never passes 4 and reaches it.
local jobs = fresh("job_a")
local now_running, most, ran = 0, 0, {}
local ids = {}
for i = 1, 30 do ids[i] = jobs.add("Work", { n = i }, { try_max = 1 }) end
local w = densefog.worker{ db = "DB", table = "job_a", pick_size = 3, exec_size = 4, exec_timeout = 30, interval = 0.2,
    actions = { Work = function (params, ctx)
        now_running = now_running + 1
        if now_running > most then most = now_running end
        check(ctx.job_id and ctx.try == 1, "ctx of a job")
        stage.sleep(60)
        now_running = now_running - 1
        ran[params.n] = (ran[params.n] or 0) + 1
        return { square = params.n * params.n }
    end } }
wait_for("30 jobs", 30, function () return jobs.counts().finished == 30 end)
eq(most, 4, "the most jobs at once is exec_size")
check(w.stats().max_running <= 4, "worker's own count")
for i = 1, 30 do eq(ran[i], 1, "job " .. i .. " ran once") end
local row = jobs.get(ids[7])
eq(row.status, "finished", "status"); eq(bundle.json(row.result).square, 49, "result recorded")
eq(math.tointeger(row.trys), 1, "one attempt")
w.stop()

-- 2. a handler that never returns: failed after exec_timeout, its slot freed for the next job,
-- retried after try_period, then an error with notify called once.
jobs = fresh("job_b")
local notified = {}
local attempts = {}
local w2 = densefog.worker{ db = "DB", table = "job_b", pick_size = 5, exec_size = 1, exec_timeout = 1, interval = 0.2,
    notify = function (job, err) notified[#notified + 1] = { id = job.id, err = err } end,
    actions = {
        Hang = function (params, ctx)
            attempts[#attempts + 1] = { t = process.tick, try = ctx.try }
            stage.sleep(3600 * 1000)
        end,
        Quick = function () return "quick" end,
        Flaky = function (params, ctx)
            attempts.flaky = attempts.flaky or {}
            attempts.flaky[#attempts.flaky + 1] = process.tick
            if ctx.try == 1 then error("transient provider hiccup") end
            return { ok = true }
        end,
        Fail = function () error(densefog.error.IaasProviderActionError("provider said no")) end,
    } }
local hang = jobs.add("Hang", {}, { try_max = 2, try_period = 1 })
wait_for("the hang to start", 10, function () return #attempts == 1 end)
local quick = jobs.add("Quick", {}, { try_max = 1 })
-- exec_size is 1: Quick runs only once Hang's slot is freed by the timeout
wait_for("quick after the timeout", 10, function () return jobs.get(quick).status == "finished" end)
check(process.tick - attempts[1].t >= 0.9, "quick waited for the timeout")
eq(jobs.get(quick).result, '"quick"', "scalar result as JSON")
local r = jobs.get(hang)
check(r.status == "pending" or r.status == "running", "hang is retried, not failed: " .. r.status)
check(tostring(r.error):find("timeout"), "the timeout is recorded: " .. tostring(r.error))
wait_for("the second attempt", 10, function () return #attempts == 2 end)
eq(attempts[2].try, 2, "second try")
check(attempts[2].t - attempts[1].t >= 1.9, "retry waited exec_timeout + try_period: " .. (attempts[2].t - attempts[1].t))
wait_for("hang to fail", 10, function () return jobs.get(hang).status == "error" end)
r = jobs.get(hang)
eq(math.tointeger(r.trys), 2, "two attempts"); check(r.error:find("timeout"), r.error)
wait_for("notify", 5, function () return #notified == 1 end)
eq(notified[1].id, hang, "notified job"); check(notified[1].err:find("timeout"), notified[1].err)
check(w2.stats().timeouts == 2, "two timeouts counted")

-- retries by the clock: fails once, succeeds on the second try after try_period
local flaky = jobs.add("Flaky", {}, { try_max = 3, try_period = 1 })
wait_for("flaky", 10, function () return jobs.get(flaky).status == "finished" end)
r = jobs.get(flaky)
eq(math.tointeger(r.trys), 2, "flaky took two tries"); eq(r.error, nil, "error cleared on success")
check(attempts.flaky[2] - attempts.flaky[1] >= 0.95, "try_period honoured: " .. (attempts.flaky[2] - attempts.flaky[1]))

-- try_max exhausted
local failing = jobs.add("Fail", {}, { try_max = 2, try_period = 0 })
wait_for("fail", 10, function () return jobs.get(failing).status == "error" end)
r = jobs.get(failing)
eq(math.tointeger(r.trys), 2, "try_max attempts"); check(r.error:find("provider said no"), r.error)
check(r.error:find("5001"), "the code is recorded: " .. r.error)
wait_for("notify of fail", 5, function () return #notified == 2 end)

-- bad input in the table: params that are not JSON, an unknown action: failed at once
local n0 = #notified
odbc.new("DB", function (adp)
    local sql = "INSERT INTO job_b (id, action, status, params, created, updated, run_at, try_period, try_max, trys) VALUES (?, ?, 'pending', ?, "
        .. D.now .. ", " .. D.now .. ", " .. D.now .. ", 0, 3, 0)"
    adp.exec(sql, "job-badparams", "Quick", "this is not json")
    adp.exec(sql, "job-nullparams", "Quick", bundle.null)
    adp.exec(sql, "job-unknown", "NoSuchAction", "{}")
end)
w2.wake()
for _, id in ipairs({ "job-badparams", "job-nullparams", "job-unknown" }) do
    wait_for(id, 10, function () return jobs.get(id).status == "error" end)
    eq(math.tointeger(jobs.get(id).trys), 1, id .. " is not retried")
end
check(jobs.get("job-badparams").error:find("JSON"), jobs.get("job-badparams").error)
check(jobs.get("job-unknown").error:find("NoSuchAction"), jobs.get("job-unknown").error)
wait_for("notify of bad input", 5, function () return #notified == n0 + 3 end)
stage.sleep(300)
eq(#notified, 5, "notify runs once per failed job")

-- options are checked
check(not pcall(densefog.worker, { db = "DB", actions = {}, exec_size = 0 }), "exec_size 0 refused")
check(not pcall(densefog.worker, { db = "DB", actions = { X = 1 } }), "non-function action refused")
check(not pcall(densefog.worker, { actions = {} }), "db required")
check(not pcall(jobs.add, "X", "text"), "params must be a table")
check(not pcall(jobs.add, string.rep("a", 51)), "action too long")
check(not pcall(densefog.jobs, { db = "DB", table = "job; DROP TABLE x" }), "table name checked")
w2.stop()
done()
