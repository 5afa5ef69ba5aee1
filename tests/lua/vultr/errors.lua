-- vultr: errors raise with the status and Vultr's message; wait returns nil and a reason.
-- The emulator answers the first request with 429: it is retried.
eq(#vultr.regions(), 12, "a 429 is retried")
local ok, e = pcall(vultr.create, { region = "mars", plan = "vc2-1c-1gb", os_id = 1743 })
check(not ok, "a bad region fails")
eq(e, "vultr POST /instances: http 400: Invalid region: mars.")
ok, e = pcall(vultr.create, { plan = "vc2-1c-1gb", os_id = 1743 })
eq(e, "vultr.create: region is required (e.g. \"icn\")")
ok, e = pcall(vultr.create, { region = "icn", plan = "vc2-1c-1gb", os_id = 1743, tags = 5 })
eq(e, "vultr.create: tags must be a list of strings")
ok, e = pcall(vultr.create, { region = "icn", plan = "vc2-1c-1gb" })
check(e:find("http 400: An operating system", 1, true), e)
ok, e = pcall(vultr.get, "00000000-0000-4000-8000-000000000000")
eq(e, "vultr GET /instances/00000000-0000-4000-8000-000000000000: http 404: instance not found")
ok, e = pcall(vultr.instances, { colour = "red" })
eq(e, "vultr.instances: unknown filter colour (expected tag, label, main_ip or region)")

-- This emulator's lifecycle is 10 s a step: wait times out with the last state.
local inst = vultr.create { region = "icn", plan = "vc2-1c-1gb", os_id = 1743 }
local calls = 0
local r, reason = vultr.wait(inst.id, {
    timeout = 300,
    interval = 50,
    on_change = function()
        calls = calls + 1
        error("an on_change error is logged and contained")
    end,
})
eq(r, nil)
check(reason:find("instance " .. inst.id .. " not ready after", 1, true), reason)
check(reason:find("(timeout 300 ms); last seen pending/running/none 0.0.0.0", 1, true), reason)
eq(calls, 1, "one state, one change")
r, reason = vultr.wait("00000000-0000-4000-8000-000000000000", { timeout = 100 })
eq(r, nil)
check(reason:find("http 404: instance not found", 1, true), reason)
ok, e = pcall(vultr.wait, inst.id, { timeout = -1 })
eq(e, "vultr.wait: timeout: expected a non-negative number of milliseconds, got -1")
-- Durations follow stage's rule (docs/stage.md): longer than a year is a year, NaN is an error.
r, reason = vultr.wait("00000000-0000-4000-8000-000000000000", { timeout = 1e30, interval = math.huge })
eq(r, nil)
check(reason:find("http 404: instance not found", 1, true), reason)
ok, e = pcall(vultr.wait, inst.id, { interval = 0/0 })
eq(e, "vultr.wait: interval: expected a number of milliseconds, got NaN")
ok, e = pcall(vultr.wait, inst.id, { timeout = "soon" })
eq(e, "vultr.wait: timeout: expected a non-negative number of milliseconds, got a string")
eq(#vultr.regions(), 12, "the instance keeps serving")
done()
