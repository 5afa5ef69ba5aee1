--! {"#startup": [["lua+stage"], ["lua+db"], ["lua+cache"]]}
-- request: timeout, no route, no handler, handler errors, and handlers that yield
-- (sleep, or a request of their own) before returning.
if process.stage == 1 then
    stage.waitfor("slow", function(ms) stage.sleep(ms); return "slept " .. ms end)
    stage.waitfor("chain", function(x)
        local c = stage.request("cache:get", 2000, x)
        return "db+" .. c
    end)
    stage.waitfor("boom", function() error("boom") end)
    stage.waitfor("bad", function() local up = 1; return function() return up end end)
    return
elseif process.stage == 2 then
    stage.waitfor("get", function(x) stage.sleep(5); return "cache " .. x end)
    return
end
local t0 = process.tick
local v, e = stage.request("db:slow", 50, 500)
eq(v, nil)
eq(e, "timeout")
check(process.tick - t0 < 0.4, "a timeout returns on time")
eq(stage.request("db:slow", 2000, 20), "slept 20")
eq(stage.request("db:chain", 2000, "k"), "db+cache k")
v, e = stage.request("db:boom", 2000)
eq(v, nil)
eq(e, "error in handler 'boom'")
v, e = stage.request("db:missing", 2000)
eq(v, nil)
eq(e, "no handler for 'missing'")
v, e = stage.request("db:bad", 2000)
eq(v, nil)
check(e:find("cannot send function with upvalue 'up' at return 1", 1, true), e)
v, e = stage.request("nothere:x", 2000)
eq(e, "no route")
-- several requests in flight from one instance at once
local results = {}
for i = 1, 5 do
    stage.submit(0, function() results[i] = stage.request("db:slow", 2000, 30) end)
end
for _ = 1, 100 do
    if #results == 5 then break end
    stage.sleep(10)
end
eq(#results, 5)
eq(results[5], "slept 30")
done()
