-- Two nodes (A names B, B names A), two instances each, contend for the same locks: at most
-- one holder at a time across the cluster, checked with a file both nodes see.
local dir, me, other = process["%SYNC_DIR"], process.node, process["%OTHER"]
check(wait_until(function()
    for _, m in ipairs(cluster.members()) do
        if m.node == other and m.state == "alive" and #m.stages > 0 then return true end
    end
end, 15000), "the other node is a member")
stage.sleep(300)
local ROUNDS, held, violations = 10, 0, 0
for _, name in ipairs({"L1", "L2", "L3"}) do
    local granted = 0
    stage.waitfor("got_" .. name, function()
        local f = dir .. "/" .. name
        if read(f) then violations = violations + 1 end
        write(f, me .. "#" .. process.stage)
        stage.sleep(10)
        os.remove(f)
        granted = granted + 1
        held = held + 1
        stage.signal("<" .. name .. ".*")
    end)
    for _ = 1, ROUNDS do
        local before = granted
        stage.signal(">" .. name .. ".got_" .. name)
        check(wait_until(function() return granted > before end, 5000), "lock " .. name .. " granted")
    end
end
eq(violations, 0, "two holders at once")
eq(held, 30)
write(dir .. "/done_" .. me:gsub("[:.]", "_") .. "_" .. process.stage, "1")
check(wait_until(function()
    local n = 0
    for _, f in ipairs({"A_0", "A_1", "B_0", "B_1"}) do if read(dir .. "/" .. f) then n = n + 1 end end
    return n == 4
end, 30000), "all four instances finished")
if process.stage == 0 then stage.sleep(200); done() end
