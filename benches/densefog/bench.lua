-- scripts/bench densefog: jobs per second through densefog's worker (no-op action) beside a
-- plain INSERT + UPDATE loop through odbc (the limit of the database path), in the same run,
-- on every connection in BENCH_DBS. Prints "BENCH ..." lines; exits when done.
local densefog = require("densefog")
local N = tonumber(process["%BENCH_JOBS"] or "") or 2000

local function line(s) print("BENCH " .. s) end

for _, db in ipairs(BENCH_DBS) do
    -- baseline: per job an INSERT and an UPDATE, one coroutine, autocommit
    odbc.new(db, function (adp)
        adp.execute("DROP TABLE IF EXISTS bench_plain")
        adp.execute("CREATE TABLE bench_plain (id VARCHAR(32) PRIMARY KEY, status VARCHAR(10), result TEXT)")
    end)
    local t0 = process.tick
    for i = 1, N do
        odbc.new(db, function (adp)
            adp.exec("INSERT INTO bench_plain (id, status) VALUES (?, 'pending')", "j" .. i)
        end)
        odbc.new(db, function (adp)
            adp.exec("UPDATE bench_plain SET status = 'finished', result = ? WHERE id = ?", "{}", "j" .. i)
        end)
    end
    local plain = N / (process.tick - t0)

    -- densefog: add N jobs, then one worker runs them (pick_size = exec_size = 50)
    odbc.new(db, function (adp) adp.execute("DROP TABLE IF EXISTS bench_job") end)
    local jobs = densefog.jobs{ db = db, table = "bench_job" }
    jobs.migrate()
    t0 = process.tick
    for i = 1, N do jobs.add("Noop", { n = i }, { try_max = 1 }) end
    local add = N / (process.tick - t0)
    local done_n = 0
    t0 = process.tick
    local w = densefog.worker{ db = db, table = "bench_job", pick_size = 50, exec_size = 50, interval = 0.05,
        actions = { Noop = function () done_n = done_n + 1 return true end } }
    while jobs.counts().finished < N do stage.sleep(10) end
    local run = N / (process.tick - t0)
    w.stop()
    local s = w.stats()
    line(string.format("%-8s plain INSERT+UPDATE %7.0f jobs/s | jobs.add %7.0f/s | worker %7.0f jobs/s (ran %d, pick errors %d) | worker/plain %.2f",
        db, plain, add, run, done_n, s.pick_errors, run / plain))
end
process.exit(0)
