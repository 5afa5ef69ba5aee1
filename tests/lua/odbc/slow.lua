-- PostgreSQL: a slow query in one coroutine does not stall the instance's other callbacks,
-- and .executeTimeout cancels a statement that runs too long.
local ticks, slow_done = 0, false
stage.addtask(10, function ()
    ticks = ticks + 1
    if not slow_done then return 10 end
end)
local t0 = process.tick
odbc.new("DB", function (adp) adp.query("SELECT pg_sleep(1)") end)
slow_done = true
local took = process.tick - t0
check(took >= 0.9, "pg_sleep(1) took " .. took .. " s")
check(ticks >= 50, "a 10 ms task ran only " .. ticks .. " times during pg_sleep(1)")
logger.info("during pg_sleep(1): " .. ticks .. " ticks of a 10 ms task")

-- The attribute-table form, with an option (the test server of scripts/services).
local t1 = process.tick
local ok, err = pcall(odbc.new, { [".executeTimeout"] = 1000, DRIVER = "PostgreSQL Unicode",
    SERVER = "127.0.0.1", PORT = 5432, DATABASE = "stage_test", UID = "stage", PWD = "stage" }, function (adp)
    adp.query("SELECT pg_sleep(5)")
end)
local waited = process.tick - t1
check(not ok, "the statement was cancelled")
check(waited < 4, "cancelled after " .. waited .. " s")
check(tostring(err):find("odbc error [", 1, true), "the timeout error carries a SQLSTATE: " .. tostring(err))
logger.info("timeout after " .. waited .. " s: " .. tostring(err))
done()
