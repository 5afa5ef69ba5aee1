-- The example stage home's entry script. It runs in every instance of `stage`
-- listed in conf/stage.json's "#startup".
logger.info("example home started on " .. process.node .. ", instance " .. process.stage)

-- Game logic lives in modules under package/ (hot reloaded) with a last known good copy
-- in rollback/; stage.load picks the first that works.
local greet = stage.load("greeting+hello")
logger.info(greet("operator"))
stage.load("db_example").record_start(process.node)  -- SQLite through odbc: package/db_example.lua

-- A BSON service on tcp 8801 (listed in #services, so every instance and every process
-- running this home shares the port). Try it: stage send 127.0.0.1:8801 '{"cmd":"login","user":"kim"}'
local sp = broker.ready("tcp://0.0.0.0:8801?bson=2k,4k", function (socket, addr)
    logger.info("accept " .. broker.ntoa(addr))
    return function (socket, data)          -- data is the decoded BSON document
        if data.cmd == "login" then return { ok = true, user = data.user } end
        socket.commit({ error = "unknown cmd" })
    end
end)
if type(sp) ~= "table" then
    logger.error("cannot listen on 8801: " .. tostring(select(2, sp)))
else
    sp.expire = 30000
    sp.close = function (socket) logger.info("bye " .. socket.id) end
end

-- A JSON API over HTTP on 8080 (also in #services). Try it:
-- curl -s -d '{"action":"jump"}' http://127.0.0.1:8080/api
local api = broker.ready("http://0.0.0.0:8080", function (req)
    if req.method == "POST" and req.path == "/api" then
        -- Only JSON text goes to bundle.json (it would read a file for a body like "x.json").
        local ok, body = req.body:match("^%s*{") ~= nil, nil
        if ok then ok, body = pcall(bundle.json, req.body) end
        if not ok or type(body) ~= "table" then return { status = 400, body = { error = "expected a JSON object" } } end
        return { body = { ok = true, action = body.action, instance = process.stage } }
    end
    if req.path == "/hello" then return "hello " .. (req.query.name or "world") .. "\n" end
    return { status = 404, body = "not found\n" }
end, { max_body = "64k" })
if type(api) ~= "table" then logger.error("cannot listen on 8080: " .. tostring(select(2, api))) end

-- The same login over WebSocket on 8081 (one BSON document per binary message), for
-- browsers. Try it: stage send ws://127.0.0.1:8081/game?bson '{"cmd":"login","user":"kim"}'
local ws = broker.ready("ws://0.0.0.0:8081/game?bson=2k,4k", function (socket, addr)
    return function (socket, data)
        if data.cmd == "login" then return { ok = true, user = data.user, via = "ws" } end
        return { error = "unknown cmd" }
    end
end)
if type(ws) ~= "table" then logger.error("cannot listen on 8081: " .. tostring(select(2, ws))) end

-- A heartbeat every 30 s: returning the delay runs the task again.
stage.addtask(30000, function ()
    logger.info("alive for " .. math.floor(process.tick) .. " s")
    return 30000
end)
