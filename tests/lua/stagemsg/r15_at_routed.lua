--! {"#startup": [["lua+stage"], ["lua+stage"], ["lua+db"], ["lua+db"]]}
-- §3 row 15: "@msg" goes to the own stage through the router: any of its instances.
if process.stage >= 2 then return end
stage.waitfor("msg", function() eq(_WAITFOR[0], "msg=who"); return process.stage end)
if process.stage == 1 then return end
local seen = {}
stage.waitfor("who", function(n) seen[n] = (seen[n] or 0) + 1 end)
for _ = 1, 10 do eq(stage.signal("@msg=who"), 1) end
check(wait_until(function() return (seen[0] or 0) + (seen[1] or 0) == 10 end))
eq(seen[0], 5, "round-robin: instance 0")
eq(seen[1], 5, "round-robin: instance 1")
done()
