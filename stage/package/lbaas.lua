-- LB as a service: the seed's JSON API (shared/seeds/lb-as-a-service.md) over the `lb` module.
--
--   request  {"action": "create"|"info"|"update"|"delete", "type": "project"|"instance", "info": {...}}
--   response {"status": "successful"|"fail", "action": ..., "type": ..., "info": {...}, "message": ...}
--
-- Projects live in a database table (lbaas_project, through odbc); instances are load
-- balancers (lb.create), tagged with their project. Served over HTTP (POST a JSON request,
-- get the JSON response) or BSON (one document per request):
--   stage.load("lbaas").serve("http://127.0.0.1:8810", "GAME")
--   stage.load("lbaas").serve("tcp://127.0.0.1:8811?bson", "GAME")
--   curl -d '{"action":"info","type":"project","info":{"id":1}}' http://127.0.0.1:8810/
local M = {}

M.conn = "GAME"          -- the %odbc connection for projects
M.autoscale = nil        -- the autoscale table used for "auto-scaling": true (needs a provider)

local Fail = {}
local function fail(msg) error(setmetatable({ msg = msg }, Fail), 0) end
local function need(t, field, kind, where)
    local v = t[field]
    if v == nil then fail((where or "info") .. "." .. field .. " is required") end
    if kind and type(v) ~= kind then
        fail((where or "info") .. "." .. field .. " must be a " .. kind .. ", got " .. type(v))
    end
    return v
end
local function known(t, fields, where)
    for k in pairs(t) do
        if not fields[k] then fail((where or "info") .. ": unknown field " .. string.format("%q", tostring(k))) end
    end
end
local function set(...) local s = {} for _, k in ipairs({ ... }) do s[k] = true end return s end

local function db(f)
    return odbc.new(M.conn, function (adp)
        adp.execute([[CREATE TABLE IF NOT EXISTS lbaas_project (
            id INTEGER PRIMARY KEY, username VARCHAR(64) NOT NULL, name VARCHAR(128) NOT NULL)]])
        return f(adp)
    end)
end

local function find_project(adp, info)
    local rows
    if info.id ~= nil then
        rows = adp.query({ "SELECT id, username, name FROM lbaas_project WHERE id = ?", "i" }, info.id)
    elseif info.name ~= nil then
        rows = adp.query({ "SELECT id, username, name FROM lbaas_project WHERE name = ?", "c" }, info.name)
    else
        fail("info.id or info.name is required")
    end
    if #rows == 0 then fail("project " .. tostring(info.id or info.name) .. " does not exist") end
    return rows[1]
end

local function instances_of(project_name)
    local out = bundle.json("[]")   -- a list: JSON [] when empty (an empty {} would be an object)
    for _, i in ipairs(lb.list()) do
        if i.project == project_name then out[#out + 1] = i.name end
    end
    return out
end

local function project_view(row)
    return { type = "project", id = math.tointeger(row.id) or row.id, user = row.username,
             name = row.name, instances = instances_of(row.name) }
end

-- The seed's "health-check" shape → lb's health table.
local function health_of(hc)
    known(hc, set("protocol", "port", "request-path", "criteria"), "info.backend.health-check")
    local h = {}
    if hc.protocol ~= nil then h.protocol = string.lower(tostring(hc.protocol)) end
    if hc.port ~= nil then h.port = hc.port end
    if hc["request-path"] ~= nil then h.path = hc["request-path"] end
    local c = hc.criteria or {}
    known(c, set("interval", "timeout", "health-threshold", "unhealth-threshold"), "info.backend.health-check.criteria")
    h.interval, h.timeout = c.interval, c.timeout
    h.healthy, h.unhealthy = c["health-threshold"], c["unhealth-threshold"]
    return h
end

local function instance_view(i)
    local entities, states = {}, {}
    for _, b in ipairs(i.backends) do
        entities[#entities + 1] = b.address
        states[#states + 1] = { address = b.address, state = b.state, check = b.check, sessions = b.sessions }
    end
    return {
        type = "instance", id = i.name, name = i.name, project = i.project,
        traffic_type = i.protocol, url = (i.protocol == "http" and "http://" or "tcp://") .. i.listen,
        listen = i.listen, running = i.running,
        backend = {
            entities = entities, states = states,
            ["health-check"] = {
                protocol = string.upper(i.health.protocol), port = i.health.port,
                ["request-path"] = i.health.path,
                criteria = { interval = i.health.interval, timeout = i.health.timeout,
                             ["health-threshold"] = i.health.healthy,
                             ["unhealth-threshold"] = i.health.unhealthy },
            },
            ["auto-scaling"] = i.autoscale ~= nil,
        },
    }
end

local function lb_spec(info, creating)
    local spec = {}
    if info.traffic_type ~= nil then spec.protocol = info.traffic_type end
    local b = info.backend
    if b ~= nil then
        if type(b) ~= "table" then fail("info.backend must be a table") end
        known(b, set("entities", "health-check", "auto-scaling"), "info.backend")
        if creating then spec.backends = b.entities or {} end
        if b["health-check"] ~= nil then spec.health = health_of(b["health-check"]) end
        if b["auto-scaling"] == true then
            if not M.autoscale then fail("info.backend.auto-scaling: this service has no autoscaling provider") end
            spec.autoscale = M.autoscale
        end
    end
    return spec
end

local handlers = { project = {}, instance = {} }

function handlers.project.create(info)
    known(info, set("type", "user", "name", "instances"))
    local user, name = need(info, "user", "string"), need(info, "name", "string")
    return db(function (adp)
        if #adp.query({ "SELECT id FROM lbaas_project WHERE name = ?", "c" }, name) > 0 then
            fail("info.name: project " .. string.format("%q", name) .. " exists")
        end
        local next_id = adp.query("SELECT COALESCE(MAX(id), 0) + 1 AS n FROM lbaas_project")[1].n
        adp.execute({ "INSERT INTO lbaas_project (id, username, name) VALUES (?, ?, ?)", "i", "c", "c" }, next_id, user, name)
        return project_view({ id = next_id, username = user, name = name })
    end)
end

function handlers.project.info(info)
    return db(function (adp) return project_view(find_project(adp, info)) end)
end

function handlers.project.update(info)
    known(info, set("type", "id", "name", "user"))
    local id = need(info, "id")
    return db(function (adp)
        local row = find_project(adp, { id = id })
        if info.user ~= nil then row.username = need(info, "user", "string") end
        if info.name ~= nil and info.name ~= row.name then
            if #instances_of(row.name) > 0 then fail("info.name: a project with instances cannot be renamed") end
            row.name = need(info, "name", "string")
        end
        adp.execute({ "UPDATE lbaas_project SET username = ?, name = ? WHERE id = ?", "c", "c", "i" }, row.username, row.name, id)
        return project_view(row)
    end)
end

function handlers.project.delete(info)
    return db(function (adp)
        local row = find_project(adp, info)
        if #instances_of(row.name) > 0 then
            fail("project " .. row.name .. " still has instances: delete them first")
        end
        adp.execute({ "DELETE FROM lbaas_project WHERE id = ?", "i" }, row.id)
        return { type = "project", id = math.tointeger(row.id) or row.id, name = row.name }
    end)
end

function handlers.instance.create(info)
    known(info, set("type", "name", "project", "listen", "traffic_type", "subnet", "backend"))
    local name, project = need(info, "name", "string"), need(info, "project", "string")
    db(function (adp) find_project(adp, { name = project }) end)
    local spec = lb_spec(info, true)
    spec.name, spec.project, spec.listen = name, project, need(info, "listen", "string")
    local ok, e = pcall(lb.create, spec)
    if not ok then fail(tostring(e)) end
    return instance_view(lb.info(name))
end

local function handle_of(info)
    local name = need(info, "name", "string")
    local h = lb.get(name)
    if not h then fail("instance " .. string.format("%q", name) .. " does not exist") end
    return h
end

function handlers.instance.info(info)
    return instance_view(handle_of(info).info())
end

function handlers.instance.update(info)
    known(info, set("type", "name", "project", "listen", "traffic_type", "subnet", "backend"))
    local h = handle_of(info)
    local spec = lb_spec(info, false)
    if info.listen ~= nil then spec.listen = info.listen end
    if next(spec) then
        local ok, e = pcall(h.update, spec)
        if not ok then fail(tostring(e)) end
    end
    local entities = info.backend and info.backend.entities
    if entities ~= nil then
        local want, have = {}, {}
        for _, a in ipairs(entities) do want[a] = true end
        for _, b in ipairs(h.info().backends) do have[b.address] = true end
        for a in pairs(want) do
            if not have[a] then
                local ok, e = pcall(h.add, a)
                if not ok then fail(tostring(e)) end
            end
        end
        for a in pairs(have) do
            if not want[a] then h.remove(a) end
        end
    end
    return instance_view(h.info())
end

function handlers.instance.delete(info)
    local h = handle_of(info)
    h.delete()
    return { type = "instance", id = h.name, name = h.name }
end

-- One request table → one response table. Never raises.
function M.handle(req)
    local res = { action = type(req) == "table" and req.action or nil,
                  type = type(req) == "table" and req.type or nil }
    local ok, out = pcall(function ()
        if type(req) ~= "table" then fail("the request must be a document") end
        known(req, set("action", "type", "info"), "request")
        local by_type = handlers[req.type]
        if not by_type then fail("type: expected \"project\" or \"instance\", got " .. tostring(req.type)) end
        local f = by_type[req.action]
        if not f then
            fail("action: expected \"create\", \"info\", \"update\" or \"delete\", got " .. tostring(req.action))
        end
        local info = req.info
        if type(info) ~= "table" then fail("info: required, a document") end
        return f(info)
    end)
    if ok then
        res.status, res.info = "successful", out
    else
        res.status = "fail"
        res.message = getmetatable(out) == Fail and out.msg or tostring(out)
    end
    return res
end

-- HTTP status of a response: 200 when successful, 404 for what does not exist, 400 otherwise.
local function status_of(res)
    if res.status == "successful" then return 200 end
    if type(res.message) == "string" and res.message:find("does not exist", 1, true) then return 404 end
    return 400
end

local function json_answer(status, res, extra)
    local headers = { ["content-type"] = "application/json" }
    for k, v in pairs(extra or {}) do headers[k] = v end
    return { status = status, headers = headers, body = bundle.json(res) }
end

-- The `broker.ready("http://...")` handler: POST with a JSON request document.
function M.http(req)
    if req.method ~= "POST" then
        return json_answer(405, { status = "fail", message = "use POST with a JSON request" }, { allow = "POST" })
    end
    -- Only JSON object text reaches bundle.json (it reads a file for a name such as "x.json").
    if not req.body:match("^%s*{") then
        return json_answer(400, { status = "fail", message = "the request must be a JSON object" })
    end
    local ok, doc = pcall(bundle.json, req.body)
    if not ok then
        return json_answer(400, { status = "fail", message = "invalid JSON: " .. tostring(doc):match("^[^\n]*") })
    end
    local res = M.handle(doc)
    return json_answer(status_of(res), res)
end

-- Serves the API on a broker endpoint: http(s)://host:port (JSON over HTTP, `opts` passed to
-- broker.ready) or tcp://host:port?bson (BSON frames: one request, one response).
function M.serve(uri, conn, opts)
    if conn then M.conn = conn end
    if type(uri) == "string" and uri:match("^https?://") then
        return broker.ready(uri, M.http, opts)
    end
    return broker.ready(uri, function ()
        return function (_, req) return M.handle(req) end
    end)
end

return M
