-- A remote LB's handle has a local LB's surface: add, remove (drain, maint, del), update
-- (blue-green onto a new VM), on_change from the VM's show stat, lb.list / lb.info. The VMs
-- are the Vultr emulator's, each "booted" by tests/lb_remote.rs (a real HAProxy started from
-- the VM's user data, its runtime API on the VM's private loopback address 127.0.x.y).
-- LB_ENV comes from tests/lb_remote.rs: backends, names, pids, port, home.
local E = LB_ENV
local function sleep_until(f, seconds, what)
    local limit = process.tick + seconds
    while not f() do
        if process.tick > limit then fail("not within " .. seconds .. " s: " .. what) end
        stage.sleep(100)
    end
end
local function get(ip)
    local p = io.popen("curl -s -m 5 http://" .. ip .. ":" .. E.port .. "/")
    local body = p:read("a")
    p:close()
    return body
end
-- The LB's record as the node persists it: a row of stage_lb_remote in HOME/var/lb/state.db.
local function record(name)
    return odbc.new("DRIVER={SQLite3};DATABASE=" .. E.home .. "/var/lb/state.db;Timeout=5000", function (adp)
        local rows = adp.query("SELECT record FROM stage_lb_remote WHERE name = ?", name)
        check(rows[1], "a stage_lb_remote row for " .. name)
        return bundle.json(rows[1].record)
    end)
end
local function backend(info, address)
    for _, b in ipairs(info.backends) do if b.address == address then return b end end
end
local events = {}
stage.addtask(0, function ()
    local ip = vultr.reserved_ip_create { region = "icn", label = "edge" }
    local edge = lb.create {
        name = "edge", listen = "0.0.0.0:" .. E.port, backends = { E.backends[1], E.backends[2] },
        health = { protocol = "http", path = "/healthz", interval = 0.3, timeout = 0.2,
                   healthy = 1, unhealthy = 1 },
        drain = 2,
        placement = { provider = "vultr", region = "icn", plan = "vc2-1c-1gb", reserved_ip = ip.id,
                      boot_timeout = 20, confirm = 0.5, interval = 0.2 },
        on_change = function (ev)
            events[#events + 1] = ev
            logger.info("on_change " .. ev.backend .. " " .. tostring(ev.previous) .. " -> " .. ev.state)
        end,
    }
    eq(edge.name, "edge"); eq(edge.remote, true)
    sleep_until(function ()
        local i = edge.info()
        return i.state == "up" and backend(i, E.backends[1]).state == "UP"
            and backend(i, E.backends[2]).state == "UP"
    end, 15, "the VM serving with both backends UP")
    local info = edge.info()
    local vm, vip = info.vm, info.internal_ip
    check(vip:find("^127%.0%.%d+%.%d+$") and vip ~= "127.0.0.1", "a private address: " .. vip)
    eq(info.remote, true); eq(info.reserved_ip, ip.id); eq(info.algorithm, "roundrobin")
    local seen = {}
    for _ = 1, 8 do seen[get(vip)] = true end
    check(seen[E.names[1]] and seen[E.names[2]], "both backends serve: " .. bundle.json(seen))

    -- lb.list and lb.info show the remote LB with its placement, VM and reserved IP.
    local list = lb.list()
    eq(#list, 1); eq(list[1].name, "edge"); eq(list[1].remote, true); eq(list[1].vm, vm)
    eq(list[1].state, "up"); eq(list[1].placement.region, "icn"); eq(list[1].reserved_ip, ip.id)
    eq(lb.info("edge").vm, vm)
    eq(lb.get("edge").remote, true, "lb.get finds it")

    -- add: live over the VM's runtime API, and recorded.
    check(edge.add(E.backends[3]))
    sleep_until(function ()
        local b = backend(edge.info(), E.backends[3])
        return b and b.state == "UP"
    end, 5, "the added backend UP")
    seen = {}
    for _ = 1, 9 do seen[get(vip)] = true end
    check(seen[E.names[3]], "the added backend serves: " .. bundle.json(seen))
    local rec = record("edge")
    eq(#rec.spec.backends, 3, "recorded")
    eq(edge.info().vm, vm, "no new VM for an add")
    local ok, e = pcall(edge.add, E.backends[3])
    check(not ok and e:find("edge.add: " .. E.backends[3] .. " is already a backend", 1, true), e)
    ok, e = pcall(edge.add, "nowhere")
    check(not ok and e:find("edge.add: \"nowhere\" is not an ip:port", 1, true), e)

    -- on_change: a backend killed goes DOWN.
    os.execute("kill " .. E.pids[2])
    sleep_until(function ()
        for _, ev in ipairs(events) do
            if ev.backend == E.backends[2] and ev.state == "DOWN" then return true end
        end
    end, 5, "on_change DOWN for the killed backend")
    for _, ev in ipairs(events) do eq(ev.lb, "edge"); eq(ev.kind, "backend") end

    -- remove: drain, maint, del; REMOVED; no longer served, no longer recorded.
    check(edge:remove(E.backends[1]))
    eq(events[#events].state, "REMOVED"); eq(events[#events].backend, E.backends[1])
    for _ = 1, 6 do eq(get(vip), E.names[3], "only the remaining UP backend serves") end
    rec = record("edge")
    eq(#rec.spec.backends, 2, "removal recorded")
    ok, e = pcall(edge.remove, E.backends[1])
    check(not ok and e:find("is not a backend of edge", 1, true), e)

    -- update: a config HAProxy rejects changes nothing (no VM created).
    ok, e = pcall(edge.update, { options = { "bogus-keyword on" } })
    check(not ok and e:find("edge.update: haproxy -c rejected the config", 1, true), e)
    ok, e = pcall(edge.update, { placement = { provider = "vultr" } })
    check(not ok and e:find("placement cannot change", 1, true), e)
    eq(#vultr.instances { tag = "stage-lb-edge" }, 1)
    -- A structural update rolls out on a new VM, keeping the runtime-added backend.
    info = edge.update { algorithm = "leastconn" }
    eq(info.algorithm, "leastconn")
    check(info.vm ~= vm, "a new VM")
    eq(vultr.reserved_ip(ip.id).instance_id, info.vm, "the reserved IP moved")
    eq(#vultr.instances { tag = "stage-lb-edge" }, 1, "the old VM is destroyed")
    local ud = vultr.user_data(info.vm)
    check(ud:find("balance leastconn", 1, true), ud)
    check(ud:find(" " .. E.backends[3] .. " ", 1, true), "the added backend is rendered: " .. ud)
    check(not ud:find(" " .. E.backends[1] .. " ", 1, true), "the removed one is not: " .. ud)
    sleep_until(function ()
        local i = edge.info()
        return backend(i, E.backends[3]).state == "UP" and backend(i, E.backends[2]).state == "DOWN"
    end, 10, "the new VM's checks")
    eq(get(info.internal_ip), E.names[3], "the new VM serves")
    -- A change that does not touch the config is only recorded.
    eq(edge.update { drain = 5 }.vm, info.vm)

    eq(edge.delete(), true)
    eq(lb.get("edge"), nil)
    eq(#lb.list(), 0)
    eq(#vultr.instances { tag = "stage-lb-edge" }, 0)
    vultr.reserved_ip_delete(ip.id)
    done()
end)
