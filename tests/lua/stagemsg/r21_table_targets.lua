--! {"#startup": [["lua+stage"], ["lua+db"]]}
-- §3 row 21: a saved _WAITFOR answers later; {target, address} sends to that instance.
if process.stage == 1 then
    local saved
    stage.waitfor("later", function(x)
        saved = _WAITFOR
        stage.addtask(30, function() stage.signal(saved, "later " .. x) end)
    end)
    stage.waitfor("ping", function() return "pong" end)
    stage.waitfor("direct", function(x) return "direct " .. x .. " at " .. process.stage end)
    return
end
local got
stage.waitfor("later", function(v) got = v end)
stage.signal("db:later", "a")
check(wait_until(function() return got ~= nil end))
eq(got, "later a")
-- a request answered later through the saved _WAITFOR
eq(stage.request("db:later", 2000, "b"), "later b")
-- {target, address}: to the instance at that address
local addr
stage.waitfor("ping", function() addr = _WAITFOR[1] end)   -- the replier's address
stage.signal("db:ping")
check(wait_until(function() return addr ~= nil end))
check(type(addr) == "string", "an address string")
got = nil
stage.waitfor("direct", function(v) got = v end)
eq(stage.signal({ "db:direct", addr }, "c"), 1)
check(wait_until(function() return got ~= nil end))
eq(got, "direct c at 1")
local ok, err = pcall(stage.signal, { "db:direct", "nowhere" })
check(not ok and err:find("not an address", 1, true), tostring(err))
done()
