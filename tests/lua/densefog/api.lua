-- densefog.api: routing by action, the error table's codes, JSON errors, 5000 without
-- internals, ctx fields, ctx.jobs, concurrent requests and a handler that yields on odbc.
-- Runs on every database (DB is the %odbc connection the test configures).
local densefog = require("densefog")
check(require("densefog") == densefog, "require caches the library")

odbc.new("DB", function (adp) adp.execute("DROP TABLE IF EXISTS job") end)
local api = densefog.api{ db = "DB" }
local seen = {}
api.route{
    Echo = function (params, ctx)
        seen.ctx = ctx
        return { echoed = params.value }
    end,
    Missing = function (params) error(densefog.error.ResourceNotFound("instance " .. tostring(params.id) .. " not found")) end,
    Crash = function () local t = nil; return t.field end,
    Secret = function () error("password=hunter2 in /etc/secret") end,
    Scalar = function () return 42 end,
    Slow = function (params)
        stage.sleep(params.ms)
        return { slept = params.ms }
    end,
    Query = function (params)
        local rows = odbc.new("DB", function (adp)
            if SQL_SLEEP then adp.query(SQL_SLEEP) end
            return adp.query("SELECT COUNT(*) AS n FROM job")
        end)
        return { n = math.tointeger(rows[1].n) }
    end,
    Partial = function ()
        error(densefog.error.ActionsPartialSuccessError("1 of 2 failed", { succeeded = { "i-1" }, failed = { "i-2" } }))
    end,
    AddJob = function (params, ctx)
        return { job_id = ctx.jobs.add("RunInstances", { plan = params.plan }, { try_max = 2, try_period = 5 }) }
    end,
}

-- success: ret_code 0, the handler's fields merged, the action's response name, a request id
local status, r = api.handle('{"action":"Echo","value":"hi","project_id":"p-1"}')
eq(status, 200, "status"); eq(r.ret_code, 0, "ret_code"); eq(r.echoed, "hi", "echoed")
eq(r.action, "EchoResponse", "action")
check(type(r.request_id) == "string" and r.request_id:match("^req%-%x+$"), "request id " .. tostring(r.request_id))
eq(seen.ctx.request_id, r.request_id, "ctx.request_id"); eq(seen.ctx.project_id, "p-1", "ctx.project_id")
eq(seen.ctx.action, "Echo", "ctx.action")
check(seen.ctx.log.prefix:find(r.request_id, 1, true), "log prefix names the request")
check(type(seen.ctx.jobs.add) == "function", "ctx.jobs")
local _, r2 = api.handle('{"action":"Echo"}')
check(r2.request_id ~= r.request_id, "request ids differ")
-- the project may come from a header
api.handle('{"action":"Echo"}', { headers = { ["x-project-id"] = "p-9" } })
eq(seen.ctx.project_id, "p-9", "project from x-project-id")
-- a decoded table (the BSON path) works the same
status, r = api.handle({ action = "Echo", value = 7 })
eq(r.echoed, 7, "table body")
status, r = api.handle('{"action":"Scalar"}')
eq(r.data, 42, "a non-table result is data")

-- bad input: 4100 with the seed's shape
for _, body in ipairs({ "not json", "{broken", "[1,2]", "", "x.json", '"text"' }) do
    status, r = api.handle(body)
    eq(status, 400, "status for " .. body); eq(r.ret_code, 4100, "ret_code for " .. body)
    check(type(r.message) == "string" and #r.message > 0, "message for " .. body)
end
status, r = api.handle('{"value":1}')
eq(r.ret_code, 4100, "missing action"); check(r.message:find("action"), r.message)
status, r = api.handle('{"action":42}')
eq(r.ret_code, 4100, "action not a string")
status, r = api.handle('{"action":"Nope"}')
eq(status, 404, "unknown action status"); eq(r.ret_code, 4104, "unknown action code")
check(r.message:find("Nope", 1, true), r.message)

-- the error table: each class answers its code and message
local want = {
    IaasProviderActionError = 5001, InvalidRequestParameter = 4100, ResourceNotFound = 4104,
    ResourceNotBelongsToProject = 4103, ResourceActionForbiden = 4105, ResourceActionUnsupported = 4106,
    ResourceIsBusy = 4105, ResourceQuotaNotEnough = 4113, ProjectDuplicated = 4600, ProjectNotFound = 4604,
    AccessKeyExpired = 4101, AccessKeyInvalid = 4101, ManageAccessKeyInvalid = 4601,
    AccessKeyNotFound = 4614, AccessKeyDuplicated = 4611, ActionsPartialSuccessError = 5001,
}
for name, code in pairs(want) do
    api.route{ ["Raise" .. name] = function () error(densefog.error[name]("because " .. name)) end }
    status, r = api.handle('{"action":"Raise' .. name .. '"}')
    eq(r.ret_code, code, name); eq(r.message, "because " .. name, name .. " message")
    eq(status, densefog.http_status(code), name .. " status")
    check(densefog.error.is(densefog.error[name]("x")), name .. " is an error object")
end
status, r = api.handle('{"action":"Missing","id":"i-7"}')
eq(r.ret_code, 4104, "ResourceNotFound"); eq(r.message, "instance i-7 not found", "message")
status, r = api.handle('{"action":"Partial"}')
eq(r.ret_code, 5002, "partial success with some succeeded"); eq(r.data.failed[1], "i-2", "data travels")
eq(tostring(densefog.error.ResourceIsBusy("busy")), "ResourceIsBusy (4105): busy", "tostring")
-- custom classes
densefog.error.define("QuotaExceeded", 4199)
api.route{ Quota = function () error(densefog.error.QuotaExceeded("too many")) end }
status, r = api.handle('{"action":"Quota"}'); eq(r.ret_code, 4199, "custom code")
check(not pcall(densefog.error.define, "Bad", 12), "a bad code is refused")

-- unexpected errors: 5000, no internals
for _, a in ipairs({ "Crash", "Secret" }) do
    status, r = api.handle('{"action":"' .. a .. '"}')
    eq(status, 500, a .. " status"); eq(r.ret_code, 5000, a .. " code")
    check(not r.message:find("hunter2") and not r.message:find("nil value") and not r.message:find("%.lua"),
        "no internals in " .. r.message)
    check(r.message:find(r.request_id, 1, true), "the message names the request id")
end

-- route validation
check(not pcall(api.route, { X = 1 }), "a non-function route is refused")

-- ctx.jobs: a job row for the request's project
status, r = api.handle('{"action":"AddJob","plan":"vc2","project_id":"p-42"}')
eq(r.ret_code, 0, "AddJob ok")
local job = api.jobs.get(r.job_id)
check(job, "job row exists")
eq(job.project_id, "p-42", "job project"); eq(job.status, "pending", "job status")
eq(job.action, "RunInstances", "job action"); eq(math.tointeger(job.try_max), 2, "try_max")
eq(math.tointeger(job.try_period), 5, "try_period"); eq(math.tointeger(job.trys), 0, "trys")
eq(bundle.json(job.params).plan, "vc2", "params as JSON")
check(job.created and job.run_at and job.updated, "times set")

-- concurrent requests: 20 handlers that wait overlap (the total is far less than the sum)
local n, t0 = 0, process.tick
for i = 1, 20 do
    stage.submit(0, function ()
        local _, rr = api.handle('{"action":"Slow","ms":300}')
        eq(rr.slept, 300, "slow " .. i)
        n = n + 1
    end)
end
-- and handlers that yield on odbc at the same time
local q = 0
for i = 1, 8 do
    stage.submit(0, function ()
        local _, rr = api.handle('{"action":"Query"}')
        eq(rr.ret_code, 0, "query " .. i .. ": " .. tostring(rr.message)); eq(rr.n, 1, "one job counted")
        q = q + 1
    end)
end
while n < 20 or q < 8 do stage.sleep(20) end
check(process.tick - t0 < 3, "20 requests of 300 ms ran concurrently (" .. (process.tick - t0) .. " s)")
done()
