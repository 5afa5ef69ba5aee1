-- The lb module's API against a real HAProxy: create, info, list, add, remove, update, get,
-- delete, on_change, and errors that name the field. LB_ENV comes from tests/lb.rs.
local E = LB_ENV
local function get(path)
    local p = io.popen("curl -s -m 5 http://" .. E.listen .. (path or "/"))
    local body = p:read("a")
    p:close()
    return body
end
local events = {}
stage.addtask(0, function ()
    local web = lb.create{
        name = "web", protocol = "http", listen = E.listen, algorithm = "roundrobin",
        backends = { E.backends[1], E.backends[2] },
        health = { protocol = "http", path = "/healthz", interval = 0.5, timeout = 0.4,
                   healthy = 2, unhealthy = 2 },
        on_change = function (ev)
            events[#events + 1] = ev
            logger.info(ev.backend .. " " .. tostring(ev.previous) .. " -> " .. ev.state)
        end,
    }
    eq(web.name, "web")
    -- Both backends answer, in turn.
    local seen = {}
    for _ = 1, 10 do seen[get()] = true end
    check(seen[E.names[1]] and seen[E.names[2]], "both backends serve: " .. bundle.json(seen))
    local info = web.info()
    eq(info.name, "web"); eq(info.listen, E.listen); eq(info.algorithm, "roundrobin")
    eq(#info.backends, 2); check(info.running, "running"); eq(info.reloads, 0)
    eq(info.health.interval, 0.5)
    local list = lb.list()
    eq(#list, 1); eq(list[1].name, "web")

    -- Live add and remove (colon calls work too).
    check(web.add(E.backends[3]))
    check(web:remove(E.backends[1]))
    seen = {}
    for _ = 1, 10 do seen[get()] = true end
    check(seen[E.names[3]] and not seen[E.names[1]], "after add/remove: " .. bundle.json(seen))
    eq(web.info().reloads, 0)

    -- Errors name the field; the LB keeps serving.
    local ok, e = pcall(lb.create, { name = "x", listen = "127.0.0.1:1", colour = "red" })
    check(not ok and e:find("lb.create: unknown field \"colour\"", 1, true), e)
    ok, e = pcall(web.add, "not-an-address")
    check(not ok and e:find("web.add: \"not-an-address\" is not an ip:port", 1, true), e)
    ok, e = pcall(web.add, E.backends[2])
    check(not ok and e:find("already a backend", 1, true), e)
    ok, e = pcall(web.update, { options = { "bogus-keyword on" } })
    check(not ok and e:find("web.update: haproxy -c rejected the config", 1, true), e)
    ok, e = pcall(lb.create, { name = "web", listen = E.listen2 })
    check(not ok and e:find("exists", 1, true), e)
    ok, e = pcall(lb.create, { name = "y", listen = E.listen2, health = { interval = "often" } })
    check(not ok and e:find("health.interval: expected a number", 1, true), e)
    check(get() ~= "", "still serving")

    -- A structural update reloads.
    info = web:update{ algorithm = "leastconn" }
    eq(info.reloads, 1)
    info = web.update{ algorithm = "roundrobin" }
    eq(info.reloads, 2)
    info = web.update{ algorithm = "leastconn" }
    eq(info.algorithm, "leastconn"); eq(info.reloads, 3)

    -- on_change: the removal was reported; a backend killed goes DOWN.
    eq(events[1].backend, E.backends[1]); eq(events[1].state, "REMOVED")
    events = {}
    os.execute("kill " .. E.pids[2])
    local t0 = os.time()
    while #events == 0 and os.time() - t0 < 5 do stage.sleep(100) end
    check(#events > 0, "on_change fired")
    eq(events[1].backend, E.backends[2]); eq(events[1].state, "DOWN"); eq(events[1].previous, "UP")
    eq(events[1].lb, "web")
    for _ = 1, 6 do check(get() == E.names[3], "only the healthy backend serves") end

    -- lb.get reaches an existing LB; delete stops it.
    local again = lb.get("web")
    eq(again.info().name, "web")
    eq(lb.get("nope"), nil)
    check(web.delete())
    eq(#lb.list(), 0)
    eq(get(), "")
    done()
end)
