--! {"#threads": [3, 77], "#usage": 0}
eq(process["$#threads"][2], 77)
eq(process["$#threads.0"], 3)
eq(process["%STAGE_LOG"], "info")
eq(process["%SURELY_NOT_SET_ANYWHERE"], nil)
check(math.type(process.id) == "integer" and process.id > 0, "pid")
eq(process.stage, 0)
check(type(process.node) == "string" and #process.node > 0, "node name")
local t0 = process.tick
stage.sleep(20)
check(process.tick > t0, "tick advances")
-- The monotonic clock measures the 20 ms sleep with better than millisecond resolution.
local c0 = process.clock
stage.sleep(20)
local dc = process.clock - c0
check(dc >= 0.019 and dc < 5, "clock measures the sleep: " .. dc)
check(dc * 1000 ~= math.floor(dc * 1000), "clock has sub-millisecond resolution: " .. dc)
local c1, c2 = process.clock, process.clock
check(c2 >= c1, "clock never goes back")
process.title = "stage-test"
eq(process.title, "stage-test")
local f = io.open("/proc/" .. process.id .. "/comm")
eq(f:read("l"), "stage-test")
f:close()
eq(type(process.args), "table")
eq(require("process"), process)
eq(log4cxx, logger)
done()
