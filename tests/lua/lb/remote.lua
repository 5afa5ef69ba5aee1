-- lb remote mode against the Vultr emulator: lb.create with a placement creates a VM whose
-- user data carries the rendered config, attaches the reserved IP; a VM that stops is
-- replaced (on_failover fires); delete destroys the VMs and keeps the reserved IP.
local ip = vultr.reserved_ip_create { region = "icn", label = "edge" }
local events = {}
local edge = lb.create {
    name = "edge", listen = "0.0.0.0:80", backends = { "10.1.96.10:8080", "10.1.96.11:8080" },
    placement = { provider = "vultr", region = "icn", plan = "vc2-1c-1gb", reserved_ip = ip.id,
                  boot_timeout = 1, confirm = 0.2, interval = 0.1 },
    on_failover = function(ev) events[#events + 1] = ev end,
}
eq(edge.name, "edge")
local info = edge.info()
local vm = info.instance
eq(vm.status, "active")
eq(vm.label, "lb-edge")
check(vm.internal_ip ~= "", "the VM is in a VPC")
eq(vultr.reserved_ip(ip.id).instance_id, vm.id, "the reserved IP is attached")
local ud = vultr.user_data(vm.id)
check(ud:find("#cloud-config", 1, true) == 1, ud)
check(ud:find("frontend fe_edge", 1, true), "the rendered config is in the user data")
check(ud:find("server s10_1_96_10_8080 10.1.96.10:8080", 1, true), ud)
check(ud:find("stats socket @PRIVATE_IP@:9999 level admin", 1, true), "runtime API on the VPC address")

-- Bad placements name the field.
local ok, e = pcall(lb.create, { name = "x", listen = "0.0.0.0:81",
    placement = { provider = "vultr", region = "icn" } })
check(not ok and e:find("lb.create: placement.plan: required", 1, true), e)
ok, e = pcall(lb.create, { name = "edge", listen = "0.0.0.0:82",
    placement = { provider = "vultr", region = "icn", plan = "vc2-1c-1gb" } })
check(not ok and e:find('lb "edge" exists', 1, true), e)

-- Nothing answers on the VM's runtime API here (no cloud-init runs), and the VM stops:
-- after the boot allowance it is down, and a replacement is created.
vultr.halt(vm.id)
local deadline = os.time() + 10
while #events == 0 and os.time() < deadline do stage.sleep(100) end
check(#events >= 1, "on_failover fired")
eq(events[1].kind, "failover")
eq(events[1].state, "down")
eq(events[1].old_instance, vm.id)
check(events[1].reason:find("stopped", 1, true), events[1].reason)
check(events[1].new_instance and events[1].new_instance ~= vm.id, "a replacement VM")
eq(#vultr.instances { tag = "stage-lb-edge" }, 2)

eq(edge.delete(), true)
eq(#vultr.instances { tag = "stage-lb-edge" }, 0, "the VMs are destroyed")
eq(vultr.reserved_ip(ip.id).instance_id, "", "the reserved IP is kept, detached")
vultr.reserved_ip_delete(ip.id)
done()
