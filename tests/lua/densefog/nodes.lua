-- Driven by tests/densefog.rs (not a scenario of its own): one `stage` process in a test of
-- several nodes sharing one job table. The test writes ROLE and its settings to preload/.
--   seed:   (re)creates `job` and `runs`, adds JOBS jobs of ACTION, exits 0
--   worker: runs a densefog worker in every instance; exits 0 once no job is pending or running
--   verify: checks that every job finished and ran exactly once (EXACT) or at least once, exits 0
local densefog = require("densefog")
local jobs = densefog.jobs{ db = "DB" }
local me = process.node .. "/" .. process.id .. "#" .. process.stage

if ROLE == "seed" then
    odbc.new("DB", function (adp)
        adp.execute("DROP TABLE IF EXISTS job")
        adp.execute("DROP TABLE IF EXISTS runs")
        adp.execute("CREATE TABLE runs (job_id VARCHAR(32) NOT NULL, worker VARCHAR(64) NOT NULL)")
    end)
    jobs.migrate()
    for i = 1, JOBS do jobs.add(ACTION, { n = i }, { try_max = 3, try_period = 0 }) end
    eq(jobs.counts().pending, JOBS, "seeded")
    done()
end

if ROLE == "worker" then
    local function record(params, ctx)
        odbc.new("DB", function (adp) adp.exec("INSERT INTO runs (job_id, worker) VALUES (?, ?)", ctx.job_id, me) end)
    end
    local w = densefog.worker{ db = "DB", pick_size = PICK or 10, exec_size = EXEC or 10, exec_timeout = TIMEOUT or 600,
        lease_margin = MARGIN or 30, interval = 0.2,
        actions = {
            Count = function (params, ctx) record(params, ctx) return { n = params.n } end,
            Slow = function (params, ctx)
                record(params, ctx)
                if ctx.try == 1 then write("busy." .. process.id, "") end
                stage.sleep(SLOW_MS)
                return { n = params.n, by = me }
            end,
        } }
    stage.addtask(200, function ()
        local ok, c = pcall(jobs.counts) -- fails while the database is away
        if ok and c.pending + c.running == 0 then
            logger.info(me .. " sees every job done")
            write("stats." .. process.stage, bundle.json(w.stats()))
            done()
        end
        return 200
    end)
    return
end

if ROLE == "verify" then
    local c = jobs.counts()
    eq(c.finished, JOBS, "finished jobs"); eq(c.error, 0, "failed jobs")
    local runs = odbc.new("DB", function (adp)
        return adp.query("SELECT job_id, COUNT(*) AS n FROM runs GROUP BY job_id")
    end)
    eq(#runs, JOBS, "jobs that ran")
    local more = 0
    for _, r in ipairs(runs) do
        local n = math.tointeger(r.n)
        if n > 1 then more = more + 1 end
        if EXACT then eq(n, 1, "runs of " .. r.job_id) end
    end
    local by = odbc.new("DB", function (adp)
        return adp.query("SELECT worker, COUNT(*) AS n FROM runs GROUP BY worker")
    end)
    local lines = {}
    for _, r in ipairs(by) do lines[#lines + 1] = r.worker .. "=" .. math.tointeger(r.n) end
    write("verified", table.concat(lines, "\n") .. "\nrerun=" .. more .. "\n")
    done()
end
