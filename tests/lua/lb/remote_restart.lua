-- Run twice by tests/lb_remote.rs with a node restart in between: the first run creates a
-- remote LB (a VM in the Vultr emulator); the second finds it with lb.get, restored from its
-- record, on the same VM and with the same reserved IP, and deletes it.
local E = LB_ENV
stage.addtask(0, function ()
    local edge = lb.get("edge", { on_failover = function (ev) logger.warn(ev.state) end })
    if not edge then
        local ip = vultr.reserved_ip_create { region = "icn", label = "edge" }
        edge = lb.create { name = "edge", listen = "0.0.0.0:80", backends = { "10.1.96.10:8080" },
            placement = { provider = "vultr", region = "icn", plan = "vc2-1c-1gb",
                          reserved_ip = ip.id, interval = 0.2 } }
        local info = edge.info()
        write(E.out .. "/first", info.instance.id .. " " .. ip.id)
    else
        local info = edge.info()
        eq(info.spec.name, "edge")
        eq(info.spec.backends[1].address, "10.1.96.10:8080", "the spec is restored")
        eq(vultr.reserved_ip(info.placement.reserved_ip).instance_id, info.instance.id)
        eq(lb.get("edge").name, "edge", "a second lb.get shares the state")
        local ok, e = pcall(lb.create, { name = "edge", listen = "0.0.0.0:80",
            placement = { provider = "vultr", region = "icn", plan = "vc2-1c-1gb" } })
        check(not ok and e:find('lb "edge" exists', 1, true), e)
        write(E.out .. "/second", info.instance.id .. " " .. info.placement.reserved_ip)
        eq(edge.delete(), true)
        eq(lb.get("edge"), nil, "deleted for good")
        write(E.out .. "/deleted", "yes")
    end
end)
