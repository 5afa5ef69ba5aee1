--! {"#startup": [["lua+stage"], ["lua+stage"], ["lua+db"], ["lua+db"]]}
-- §3 row 6: naming one's own stage ("stage:msg") stays in the sending instance, id "msg".
if process.stage >= 2 then return end
local count = 0
stage.waitfor("msg", function(n)
    eq(n, process.stage)
    eq(_WAITFOR[0], "msg")
    count = count + 1
end)
for _ = 1, 50 do stage.signal("stage:msg", process.stage) end
check(wait_until(function() return count == 50 end), "got " .. count)
if process.stage == 0 then stage.sleep(50); eq(count, 50); done() end
