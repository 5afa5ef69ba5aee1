-- A Rain-style provisioning service on densefog: an action-routed JSON API whose
-- RunInstances is a job, run by a worker against Vultr (or `stage vultr-emulator`).
--
--   {"action":"RunInstances","region":"icn","plan":"vc2-1c-1gb","os_id":1743,"project_id":"p-1"}
--                                   → {"ret_code":0,"job_id":"job-..."}  (the worker creates the
--                                     instance and waits until it is really ready)
--   {"action":"DescribeJobs","job_id":"job-..."}  → {"ret_code":0,"job_set":[{status, result, ...}]}
--   {"action":"DescribeInstances"}               → {"ret_code":0,"instance_set":[...]} (the project's)
--   {"action":"TerminateInstances","instance_id":"..."} → {"ret_code":0,"job_id":"job-..."}
--
-- Start it from an entry script; the API is JSON over HTTP (POST, any path):
--
--   local api = stage.load("iaas").serve{ listen = "http://0.0.0.0:8080", db = "GAME" }
--   api.listen("tcp://0.0.0.0:8081?bson")     -- optional: the same API over BSON
--
--   $ curl -s -H 'x-project-id: p-1' -d '{"action":"DescribeInstances"}' http://127.0.0.1:8080/
--   {"ret_code":0,"action":"DescribeInstancesResponse","request_id":"req-...","instance_set":[...]}
--   (errors: 4100 → HTTP 400, 4104 → 404, 5001 → 500; GET → 405; header x-request-id)
local densefog = require("densefog")
local E = densefog.error
local M = {}

local function need(params, name, kind)
    local v = params[name]
    if type(v) ~= kind or v == "" then
        error(E.InvalidRequestParameter(name .. " is required (a " .. kind .. ")"))
    end
    return v
end

-- An empty Lua table is encoded as a JSON object; a list decoded from "[]" keeps its array mark,
-- so an empty list answers [] (clients iterate it as a list).
local function list(t)
    if next(t) == nil then return bundle.json("[]") end
    return t
end

local function project_tag(ctx)
    return "project:" .. (ctx.project_id or "none")
end

-- Calls the provider; its failures become 5001 with the provider's message.
local function provider(f, ...)
    local ok, r, why = pcall(f, ...)
    if not ok then error(E.IaasProviderActionError(tostring(r):match("^[^\n]*")), 0) end
    return r, why
end

M.routes = {
    RunInstances = function (params, ctx)
        local spec = { region = need(params, "region", "string"), plan = need(params, "plan", "string"),
            os_id = need(params, "os_id", "number"), label = params.label }
        return { job_id = ctx.jobs.add("RunInstances", spec, { try_max = 3, try_period = 10 }) }
    end,
    TerminateInstances = function (params, ctx)
        local id = need(params, "instance_id", "string")
        return { job_id = ctx.jobs.add("TerminateInstances", { instance_id = id }, { try_max = 3, try_period = 10 }) }
    end,
    DescribeJobs = function (params, ctx)
        local job = ctx.jobs.get(need(params, "job_id", "string"))
        if not job or job.project_id ~= ctx.project_id then
            error(E.ResourceNotFound("job " .. params.job_id .. " not found"))
        end
        job.params = job.params and bundle.json(job.params) or nil
        job.result = job.result and job.result:match("^%s*{") and bundle.json(job.result) or job.result
        return { job_set = { job } }
    end,
    DescribeInstances = function (params, ctx)
        return { instance_set = list(provider(vultr.instances, { tag = project_tag(ctx) })) }
    end,
}

function M.actions(opts)
    opts = opts or {}
    return {
        RunInstances = function (params, ctx)
            local inst = provider(vultr.create, { region = params.region, plan = params.plan, os_id = params.os_id,
                label = params.label, tags = { "densefog", project_tag(ctx) } })
            ctx.log.info("created " .. inst.id .. ", waiting until it is ready")
            local ready, why = provider(vultr.wait, inst.id, { timeout = opts.wait_timeout or 540000, interval = opts.interval or 5000 })
            if not ready then error(E.IaasProviderActionError(why)) end
            return { instance_id = ready.id, main_ip = ready.main_ip, status = "running" }
        end,
        TerminateInstances = function (params)
            provider(vultr.delete, params.instance_id)
            return { instance_id = params.instance_id, status = "terminated" }
        end,
    }
end

--- Serves the API on `o.listen` and runs a worker in this instance.
--- o: { listen, db, exec_size = 10, exec_timeout = 600, interval = 2, wait_timeout, wait_interval }
function M.serve(o)
    local api = densefog.api{ listen = o.listen, db = o.db }
    api.route(M.routes)
    local worker = densefog.worker{ db = o.db, pick_size = o.exec_size or 10, exec_size = o.exec_size or 10,
        exec_timeout = o.exec_timeout or 600, interval = o.interval or 2,
        actions = M.actions{ wait_timeout = o.wait_timeout, interval = o.wait_interval },
        notify = function (job, err) logger.error("iaas: job " .. job.id .. " " .. job.action .. " failed: " .. err) end }
    return api, worker
end

return M
