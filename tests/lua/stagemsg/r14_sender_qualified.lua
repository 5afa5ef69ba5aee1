--! {"#startup": [["lua+stage"], ["lua+stage"], ["lua+db"], ["lua+db"]]}
-- §3 row 14: "db+msg" reaches db as "<sender stage>:msg".
if process.stage >= 2 then
    stage.waitfor("stage:msg", function(x) return "from stage " .. x, _WAITFOR[0] end)
    stage.waitfor("msg", function() fail("must arrive qualified") end)
    return
end
if process.stage == 1 then return end
local v, id = stage.request("db+msg", 2000, "x")
eq(v, "from stage x")
eq(id, "stage:msg")
local got
stage.waitfor("stage:msg", function(v2) got = v2 end)
stage.signal("db+msg", "y")   -- the implicit reply comes back as "stage:msg"
check(wait_until(function() return got ~= nil end))
eq(got, "from stage y")
done()
