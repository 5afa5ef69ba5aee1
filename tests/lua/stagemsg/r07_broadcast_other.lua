--! {"#startup": [["lua+stage"], ["lua+stage"], ["lua+db"], ["lua+db"]]}
-- §3 row 7: "*db:msg" reaches every db instance, id "msg".
if process.stage >= 2 then
    stage.waitfor("msg", function(x) return process.stage, x, _WAITFOR[0] end)
    return
end
if process.stage == 1 then return end
local got = {}
stage.waitfor("msg", function(who, x, w0) eq(x, "hi"); eq(w0, "msg"); got[who] = (got[who] or 0) + 1 end)
eq(stage.signal("*db:msg", "hi"), 2)
check(wait_until(function() return got[2] and got[3] end))
stage.sleep(50)
eq(got[2], 1)
eq(got[3], 1)
done()
