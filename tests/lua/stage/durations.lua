-- Durations from scripts (docs/stage.md, "Durations"): NaN is an error naming the function,
-- a negative delay is 0, anything longer than a year (math.huge included) waits a year.
-- None of them stops the instance: it keeps serving afterwards.
local function err_of(f, ...)
    local ok, e = pcall(f, ...)
    check(not ok, "expected an error")
    return e
end
local e = err_of(stage.sleep, 0/0)
check(e:find("stage.sleep(ms): expected a number of milliseconds, got NaN", 1, true), e)
e = err_of(stage.addtask, 0/0, function() fail("a NaN task ran") end)
check(e:find("stage.addtask(ms, f): expected a number of milliseconds, got NaN", 1, true), e)
e = err_of(stage.request, "nobody", 0/0)
check(e:find("stage.request: timeout: expected a number of milliseconds, got NaN", 1, true), e)
e = err_of(stage.addtask, 1.5, nil)
check(e:find("stage.addtask(handle, nil): handle: expected an integer, got 1.5", 1, true), e)

-- Negative: no wait at all.
local ran_negative = false
stage.addtask(-5, function() ran_negative = true end)
stage.sleep(-1)
stage.sleep(-math.huge)

-- Huge: a year, i.e. not within this test; the sleepers stay asleep.
local woke = {}
for _, ms in ipairs({ 1e30, math.huge, 2^63, 1e300 }) do
    stage.submit(0, function()
        local ok, err = pcall(stage.sleep, ms)
        woke[#woke + 1] = tostring(ms) .. " -> " .. tostring(ok) .. " " .. tostring(err)
    end)
end
local h1 = stage.addtask(1e30, function() fail("a 1e30 task ran") end)
local h2 = stage.addtask(math.huge, function() fail("a math.huge task ran") end)
check(math.type(h1) == "integer" and math.type(h2) == "integer")

-- A task that returns math.huge runs once, then waits a year.
local huge_runs = 0
local h3 = stage.addtask(1, function()
    huge_runs = huge_runs + 1
    return math.huge
end)
-- A task that returns NaN runs once; the error is logged and it is not run again.
local nan_runs = 0
local h4 = stage.addtask(1, function()
    nan_runs = nan_runs + 1
    return 0/0
end)
-- A submit that returns 1e30 holds its key for a year; other keys still run.
stage.submit("held", function() return 1e30 end)
local other_key = false
stage.submit("other", function() other_key = true end)

-- The instance keeps serving.
local served = 0
stage.addtask(20, function()
    served = served + 1
    if served < 3 then return 10 end
end)
stage.sleep(150)
eq(#woke, 0, "sleepers woke: " .. table.concat(woke, "; "))
eq(ran_negative, true, "a negative delay runs at once")
eq(huge_runs, 1)
eq(nan_runs, 1)
eq(other_key, true)
eq(served, 3)
eq(stage.addtask(h1, nil), true, "the 1e30 task is pending")
eq(stage.addtask(h2, nil), true, "the math.huge task is pending")
eq(stage.addtask(h3, nil), true, "the task that returned math.huge is pending")
eq(stage.addtask(h4, nil), false, "the task that returned NaN ended")
done()
