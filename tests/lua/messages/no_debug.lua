--! {"#startup": [["lua+stage"], ["lua+b"]], "#threads": [1, 16]}
-- A script may remove the debug library (`debug = nil`): sending functions still works, and
-- a function with an upvalue is still refused with the usual message. Each instance does it
-- before its first send, so nothing could have been prepared through `debug` beforehand.
local saved = debug
debug = nil
if process.stage == 1 then
    stage.waitfor("apply", function(fn, x)
        -- the reply carries a function too, sent from a state without `debug`
        return fn(x), function(n) return n + 1 end
    end)
    return
end

local got, inc = stage.request("b:apply", 2000, function(n) return n * 2 end, 21)
local up = 1
local ok, err = pcall(stage.signal, "b:apply", function() return up end)
-- thread.new sends its function; the worker's state removes `debug` too, then returns one
local results
thread.new(function(n)
    debug = nil
    return function(k) return k * 3 end, n
end, 7).waitfor(function(...) results = { ... } end)
for _ = 1, 200 do
    if results then break end
    stage.sleep(10)
end

debug = saved -- the test helpers' fail() uses debug.traceback
eq(got, 42, "a function sent without debug ran on the other side")
eq(inc(1), 2, "a function returned without debug came back")
check(not ok)
eq(err, "cannot send function with upvalue 'up' at arg 2")
check(results, "thread.new answered")
check(type(results[1]) == "function", "thread.new returned " .. tostring(results[1]) .. ", " .. tostring(results[2]))
eq(results[1](2), 6)
eq(results[2], 7)
done()
