-- Autoscaling through a Lua provider that starts real backend processes: rising load adds
-- backends up to max (the provider's first call fails and is retried after a back-off);
-- falling load removes them after the stabilisation window, down to min, releasing each.
local E = LB_ENV
local calls, failures, started, released = 0, 0, {}, {}
local spare = 0

local function provider(lbinfo)
    calls = calls + 1
    if calls == 1 then
        failures = failures + 1
        error("quota exceeded (a test failure)")
    end
    spare = spare + 1
    local port = E.spare[spare]
    local p = io.popen(string.format("python3 %s http %d b%d >/dev/null 2>&1 & echo $!", E.backend_py, port, port))
    local pid = p:read("l")
    p:close()
    local addr = "127.0.0.1:" .. port
    for _ = 1, 50 do
        local c = io.popen("curl -s -m 1 http://" .. addr .. "/healthz")
        local ok = c:read("a") == "ok"
        c:close()
        if ok then break end
        stage.sleep(100)
    end
    started[addr] = pid
    logger.info("provider: started " .. addr .. " for " .. lbinfo.name)
    return addr
end

local function release(lbinfo, addr)
    released[#released + 1] = addr
    os.execute("kill " .. started[addr])
    logger.info("provider: released " .. addr)
end

stage.addtask(0, function ()
    local web = lb.create{
        name = "auto", listen = E.listen, backends = { E.backends[1] },
        health = { path = "/healthz", interval = 0.5, timeout = 0.4 },
        autoscale = { min = 1, max = 3, target = { sessions_per_backend = 2 }, cooldown = 1,
                      stabilization = 2, period = 0.3, provider = provider, release = release },
    }
    -- Rising load: 8 concurrent slow requests for 8 s.
    os.execute(string.format("python3 %s http %s 0 8 8 /slow >%s/load.json 2>&1 &", E.load_py, E.listen, E.out))
    local t0 = os.time()
    while #web.info().backends < 3 and os.time() - t0 < 15 do stage.sleep(200) end
    eq(#web.info().backends, 3, "scaled out to max")
    check(failures == 1 and calls >= 3, "the failing provider was retried: calls " .. calls)
    -- Never above max while the load lasts.
    for _ = 1, 10 do
        check(#web.info().backends <= 3, "at most max")
        stage.sleep(200)
    end
    -- The load ends; after the stabilisation window the autoscaled backends go, one by one.
    t0 = os.time()
    while #web.info().backends > 1 and os.time() - t0 < 25 do stage.sleep(200) end
    local info = web.info()
    eq(#info.backends, 1, "scaled in to min")
    eq(info.backends[1].address, E.backends[1], "the user's backend stays")
    eq(#released, 2, "both provider backends released")
    local f = io.open(E.out .. "/load.json")
    local load = bundle.json(f:read("a"))
    f:close()
    eq(load.fail, 0, "no failed request while scaling: " .. bundle.json(load.errors))
    web.delete()
    done()
end)
