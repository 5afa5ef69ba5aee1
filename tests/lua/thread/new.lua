--! {"#threads": [2, 24]}
-- thread.new runs a function on the blocking pool in its own (full stage) Lua state; .waitfor gets
-- early thread.signal values, then the return values.
local got = {}
local obj = thread.new(function(a, n)
    thread.signal("early", a)
    local s = 0
    for i = 1, n do s = s + i end
    return s, math.type(s), type(stage) -- the worker's state is a full stage state (issue 11)
end, "x", 100)
obj.waitfor(function(...) got[#got + 1] = { ... } end)
for _ = 1, 200 do
    if #got >= 2 then break end
    stage.sleep(10)
end
eq(#got, 2)
eq(got[1][1], "early")
eq(got[1][2], "x")
eq(got[2][1], 5050)
eq(got[2][2], "integer")
eq(got[2][3], "table")

-- a blocking call does not block the instance: a timer keeps running meanwhile
local ticks = 0
stage.addtask(10, function() ticks = ticks + 1; return 10 end)
local slept
thread.new(function() local t = os.time(); local c = os.clock(); while os.clock() - c < 0.3 do end; return "done" end)
    :waitfor(function(v) slept = v end)
for _ = 1, 200 do
    if slept then break end
    stage.sleep(10)
end
eq(slept, "done")
check(ticks >= 10, "timers ran while the pool worked: " .. ticks)

-- errors in f reach the callback as nil, message
local err
thread.new(function() error("bad thing") end).waitfor(function(v, e) err = { v, e } end)
for _ = 1, 200 do
    if err then break end
    stage.sleep(10)
end
eq(err[1], nil)
check(err[2]:find("bad thing", 1, true), err[2])

-- many jobs on 2 workers, results all arrive
local sum = 0
for i = 1, 20 do thread.new(function(x) return x * 2 end, i).waitfor(function(v) sum = sum + v end) end
for _ = 1, 200 do
    if sum == 420 then break end
    stage.sleep(10)
end
eq(sum, 420)

-- the pool's queue is bounded by #threads[1]: a full queue is an error, never a wait
local accepted, full_err, finished = 0, nil, 0
for _ = 1, 40 do
    local ok, e = pcall(thread.new, function() local c = os.clock(); while os.clock() - c < 0.05 do end end)
    if not ok then full_err = e; break end
    e.waitfor(function() finished = finished + 1 end)
    accepted = accepted + 1
end
check(full_err and full_err:find("thread.new: the blocking pool's queue is full (24 jobs waiting, #threads[1])", 1, true),
    tostring(full_err))
check(accepted >= 24 and accepted <= 26, "accepted " .. accepted)
for _ = 1, 300 do
    if finished == accepted then break end
    stage.sleep(10)
end
eq(finished, accepted, "every accepted job finished")

-- functions with upvalues cannot go; thread.signal only inside thread.new
local up = 1
local ok, e = pcall(thread.new, function() return up end)
check(not ok)
eq(e, "thread.new: cannot send function with upvalue 'up' at arg 1")
ok, e = pcall(thread.signal, 1)
check(not ok and e:find("only a function run by thread.new", 1, true), tostring(e))
done()
