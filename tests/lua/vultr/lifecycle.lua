-- vultr: create → status → instances → wait (through the non-monotonic lifecycle, while
-- another callback keeps running) → halt/start → delete → 404.
local ticks = 0
stage.addtask(10, function()
    ticks = ticks + 1
    return 10
end)
local inst = vultr.create {
    region = "icn", plan = "vc2-1c-1gb", os_id = 1743, label = "game-7", tags = { "stage" },
    user_data = "#!/bin/sh\necho hi\n", enable_ipv6 = false,
}
eq(#inst.id, 36, "a UUID")
eq(inst.status, "pending")
eq(inst.main_ip, "0.0.0.0")
eq(inst.label, "game-7")
eq(inst.tags[1], "stage")
eq(math.type(inst.os_id), "integer")
eq(vultr.status(inst.id), "pending")
eq(vultr.get(inst.id).id, inst.id)
eq(#vultr.instances(), 1)
eq(#vultr.instances { tag = "stage" }, 1)
eq(#vultr.instances { tag = "nope" }, 0)
eq(#vultr.instances { label = "game-7", region = "icn" }, 1)

local changes = {}
local before = ticks
local ready, err = vultr.wait(inst.id, {
    timeout = 10000,
    interval = 20,
    on_change = function(i)
        changes[#changes + 1] = i.status .. "/" .. i.power_status .. "/" .. i.server_status
    end,
})
check(ready, err)
eq(ready.status, "active")
eq(ready.power_status, "running")
eq(ready.server_status, "ok")
check(ready.main_ip ~= "0.0.0.0", "an address once ready")
eq(table.concat(changes, " "),
    "pending/running/none active/stopped/locked active/running/installingbooting active/running/ok",
    "every change reported, and wait did not stop at active/stopped/locked")
check(ticks - before >= 20, "the task kept running while wait polled (ticks: " .. (ticks - before) .. ")")
eq(vultr.status(inst.id), "running")
eq(vultr.halt(inst.id), true)
eq(vultr.status(inst.id), "stopped")
eq(vultr.start(inst.id), true)
eq(vultr.status(inst.id), "running")
eq(vultr.delete(inst.id), true)
local ok, e = pcall(vultr.get, inst.id)
check(not ok, "gone after delete")
check(e:find("http 404: instance not found", 1, true), e)
done()
