--! {"#startup": [["lua+stage"], ["lua+b"]], "#threads": [2, 2000]}
-- Messages from one sender to one instance are handled in the order they were sent.
if process.stage == 1 then
    local seen = {}
    stage.waitfor("n", function(i) seen[#seen + 1] = i end)
    stage.waitfor("check", function()
        for i = 1, #seen do
            if seen[i] ~= i then return false, "message " .. i .. " was " .. tostring(seen[i]) end
        end
        return #seen
    end)
    return
end
for i = 1, 1000 do eq(stage.signal("b:n", i), 1) end
local n, why = stage.request("b:check", 2000)
eq(n, 1000, why)
done()
