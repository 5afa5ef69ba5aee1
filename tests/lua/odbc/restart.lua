-- PostgreSQL stopped and restarted mid-run (driven by tests/odbc.rs through marker files):
-- queries fail while it is down, and the pool reconnects when it is back, without a restart.
local function query()
    local ok, v = pcall(odbc.new, "DB", function (adp) return adp.query("SELECT 5 AS v")[1].v end)
    -- A connection that cannot be made gives nil (logged), as STAGE; a query on a lost one raises.
    if ok and v == nil then return false, "no connection: odbc.new gave nil" end
    return ok, v
end
local function exists(name) return read(name) ~= nil end
local ok, v = query()
check(ok and v == 5, "first query: " .. tostring(v))
write("up", "")
while not exists("stopped") do stage.sleep(50) end
local failed_ok, err = query()
check(not failed_ok, "a query fails while the server is down")
logger.info("while down: " .. tostring(err))
write("failed", "")
while not exists("started") do stage.sleep(50) end
local deadline = process.tick + 20
while process.tick < deadline do
    local ok2, v2 = query()
    if ok2 then
        eq(v2, 5, "query after the restart")
        done()
    end
    stage.sleep(200)
end
fail("no successful query within 20 s of the restart")
