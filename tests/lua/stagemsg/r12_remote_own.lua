--! {"#startup": [["lua+stage"], ["lua+stage"], ["lua+db"], ["lua+db"]]}
-- §3 row 12: "+msg" (no stage) is delivered in the sending instance.
if process.stage >= 2 then return end
local n = 0
stage.waitfor("msg", function(from) eq(from, process.stage); n = n + 1 end)
for _ = 1, 20 do eq(stage.signal("+msg", process.stage), 1) end
check(wait_until(function() return n == 20 end))
if process.stage == 0 then done() end
