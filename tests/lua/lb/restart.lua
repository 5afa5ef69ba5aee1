-- Run twice by tests/lb.rs with a node restart in between: the first run creates the LB and
-- adds a backend at runtime; the second finds it restored from the database (lb.get) with
-- the same HAProxy still serving.
local E = LB_ENV
stage.addtask(0, function ()
    local web = lb.get("web", { on_change = function (ev) logger.info("change " .. ev.state) end })
    if not web then
        web = lb.create{ name = "web", listen = E.listen, backends = { E.backends[1], E.backends[2] },
                         health = { path = "/healthz", interval = 0.5, timeout = 0.4 } }
        web.add(E.backends[3])
        write(E.out .. "/first", tostring(web.info().pid))
    else
        local info = web.info()
        eq(#info.backends, 3, "backends restored")
        eq(info.backends[3].address, E.backends[3])
        write(E.out .. "/second", tostring(info.pid))
    end
end)
