-- Rain: the seed's provisioning server (Rain.js + VultrMaker.py), rebuilt on the `broker`
-- and `vultr` modules. Clients speak BSON over TCP, one document per message:
--
--   {Ping = x}                                 → {Pong = x}
--   {List = {}}                                → {RespondList = {regions = [...], plans = [...], os = [...]}}
--   {CreateRequest = {region, plan, os_id [, label, tags]}}
--                                              → {ResponseCreate = id} at once, then, on the same
--                                                connection, {CreateDone = instance} once the
--                                                server is really ready (active, running, ok), or
--                                                {CreateFailed = {id = id, reason = "..."}}
--   {ServerList = {}}                          → {ResponseServerList = [instance, ...]}
--   anything else                              → {Error = "..."}
--
-- Several CreateRequests may be in flight on one connection: each wait runs as its own
-- callback, so the connection keeps serving Ping, List and more CreateRequests meanwhile.
--
-- Start it from an entry script (the key and endpoint come from %vultr or VULTR_API_KEY):
--
--   local rain = stage.load("rain")
--   rain.serve("tcp://0.0.0.0:8802?bson=4k,1m", { timeout = 600000, interval = 5000 })
local M = {}

-- At most this many creates waiting per connection (a client bug must not flood Vultr).
M.max_in_flight = 16

-- Sends `v` on `socket` unless the connection has gone away meanwhile.
local function send(socket, v)
    local ok, e = pcall(socket.commit, v)
    if not ok then logger.warn("rain: socket " .. tostring(socket.id) .. ": " .. tostring(e)) end
end

local function create(socket, req, opts)
    if type(req) ~= "table" then
        return { CreateFailed = { reason = "CreateRequest needs {region, plan, os_id}" } }
    end
    socket.rain_in_flight = socket.rain_in_flight or 0
    if socket.rain_in_flight >= M.max_in_flight then
        return { CreateFailed = { reason = "too many creates in flight on this connection (limit " .. M.max_in_flight .. ")" } }
    end
    local tags = req.tags or {}
    tags[#tags + 1] = "rain"
    local ok, inst = pcall(vultr.create, {
        region = req.region, plan = req.plan, os_id = req.os_id,
        label = req.label, hostname = req.hostname, tags = tags,
    })
    if not ok then return { CreateFailed = { reason = tostring(inst) } } end
    -- Answer at once with the id, before the wait can possibly finish.
    send(socket, { ResponseCreate = inst.id })
    socket.rain_in_flight = socket.rain_in_flight + 1
    stage.submit(0, function ()
        local ready, reason = vultr.wait(inst.id, {
            timeout = opts.timeout,
            interval = opts.interval,
            on_change = function (i)
                logger.info(("rain: %s %s/%s/%s %s"):format(i.id, i.status, i.power_status, i.server_status, i.main_ip))
            end,
        })
        socket.rain_in_flight = socket.rain_in_flight - 1
        if ready then
            send(socket, { CreateDone = ready })
        else
            send(socket, { CreateFailed = { id = inst.id, reason = reason } })
        end
    end)
end

local handlers = {
    Ping = function (_, x) return { Pong = x } end,
    List = function ()
        local ok, all = pcall(vultr.listall)
        if not ok then return { Error = tostring(all) } end
        return { RespondList = all }
    end,
    CreateRequest = create,
    ServerList = function ()
        local ok, list = pcall(vultr.instances)
        if not ok then return { Error = tostring(list) } end
        return { ResponseServerList = list }
    end,
}
M.handlers = handlers

-- Dispatches one decoded document: its (single) key names the request.
function M.receive(socket, data, opts)
    for name, arg in pairs(data) do
        local h = handlers[name]
        if h then return h(socket, arg, opts) end
        return { Error = "unknown request " .. tostring(name) .. " (expected Ping, List, CreateRequest or ServerList)" }
    end
    return { Error = "empty request" }
end

-- Listens on `uri` (a broker URI with bson framing). `opts.timeout` / `opts.interval` (ms)
-- are passed to vultr.wait. Returns the port, or nil and the reason.
function M.serve(uri, opts)
    opts = opts or {}
    local port, msg = broker.ready(uri, function (socket, addr)
        logger.info("rain: client " .. tostring(socket[1]))
        return function (s, data) return M.receive(s, data, opts) end
    end)
    if type(port) ~= "table" then
        logger.error("rain: cannot listen on " .. uri .. ": " .. tostring(msg))
        return nil, msg
    end
    logger.info("rain: serving on " .. uri)
    return port
end

return M
