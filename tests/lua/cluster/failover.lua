-- Node A under a steady request load while the test kills B, then C (kill -9), restarts B.
local B, C, F = process["%NODE_B"], process["%NODE_C"], process["%NODE_F"]
local dir = process["%SYNC_DIR"]
local function has(node)
    for _, m in ipairs(cluster.members()) do
        if m.node == node then return m.state ~= "down" and #m.stages > 0 end
    end
    return false
end
local events = {}
cluster.watch("membership")
stage.waitfor("membership", function(ev) events[#events + 1] = ev.event .. " " .. ev.node end)
check(wait_until(function() return has(B) and has(C) and has(F) end, 15000), "B, C, F in the table")

-- The steady load: one request every 10 ms, answers recorded with their time.
local answers = {}
stage.addtask(10, function()
    stage.submit(0, function()
        local t = process.tick
        local node, e = stage.request("db:who", 1000)
        answers[#answers + 1] = {t = t, node = node, err = e}
    end)
    return 10
end)
write(dir .. "/ready", "1")
check(wait_until(function() return read(dir .. "/killed") end, 15000), "the test kills B")
local t0 = process.tick
check(wait_until(function() return not has(B) end, 10000), "B leaves the routing table")
local detect = process.tick - t0
-- Re-routed: the first answered request sent after which every request was answered.
local tdet = process.tick
local function after(t0)
    local out = {}
    for _, a in ipairs(answers) do if a.t >= t0 then out[#out + 1] = a end end
    return out
end
check(wait_until(function() return #after(tdet) >= 50 end, 10000), "50 requests after detection")
local reroute
for _, a in ipairs(after(tdet)) do
    check(a.node == C, "after detection answered by C, got " .. tostring(a.node) .. " / " .. tostring(a.err))
end
-- Re-routed: from the first request after which every request (sent after the kill) was answered.
local lost = 0
for _, a in ipairs(after(t0)) do
    if not a.node then lost = lost + 1; reroute = nil
    elseif not reroute then reroute = a.t - t0 end
end
local line = string.format("detection %.0f ms, re-route %.0f ms, %d requests lost in the detection window",
    detect * 1000, (reroute or -1) * 1000, lost)
logger.info(line)
write(dir .. "/times", line)
check(wait_until(function() return read(dir .. "/killed2") end, 15000), "the test kills C")
check(wait_until(function() return not has(C) end, 10000), "C leaves the routing table")
-- No live node has `db`: the fail-over node gets it.
tdet = process.tick
check(wait_until(function() return #after(tdet) >= 20 end, 10000))
for _, a in ipairs(after(tdet)) do eq(a.node, F, "fail-over answers") end
write(dir .. "/failover", "1")
-- B restarts: it rejoins and gets traffic again.
check(wait_until(function() return has(B) end, 15000), "B rejoins")
tdet = process.tick
check(wait_until(function()
    for _, a in ipairs(after(tdet)) do if a.node == B then return true end end
    return false
end, 5000), "B answers again")
local joined = 0
for _, e in ipairs(events) do if e == "join " .. B then joined = joined + 1 end end
check(joined >= 1, "join events for B: " .. table.concat(events, ", "))
done()
