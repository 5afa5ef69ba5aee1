--! {"#startup": [["lua+stage"], ["lua+stage"], ["lua+db"], ["lua+db"]]}
-- §3 row 5: a bare "msg" is handled by the sending instance only.
if process.stage >= 2 then return end
local mine = 0
stage.waitfor("callback", function(n)
    eq(n, process.stage, "handled where it was sent")
    mine = mine + 1
    return "return values of an own-stage message go nowhere"
end)
for _ = 1, 200 do eq(stage.signal("callback", process.stage), 1) end
check(wait_until(function() return mine == 200 end), "200 handled here, got " .. mine)
if process.stage == 1 then return end
stage.sleep(100)
eq(mine, 200, "handled exactly once each")
done()
