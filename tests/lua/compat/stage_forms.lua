-- stage.*: load/require info arrays, call spreading, addtask/submit forms, grp:sub names.
local v, i = stage.load("grp:sub+f")
eq(v(2, 3), 5, "grp:sub loads grp/sub.lua")
eq(math.type(i[1]), "integer", "info[1] is the position")
eq(i[1], 0)
check(i[2]:find("package/grp/sub.lua", 1, true), "info[2] is the path: " .. tostring(i[2]))
eq(math.type(i[3]), "integer", "info[3] is the mtime")
check(i[3] > 1500000000, "mtime in epoch seconds")
local seen
stage.load("nothing+here", function (val, info)
    eq(val, nil)
    eq(info[1], "nothing")
    eq(info[2], "here")
    seen = true
end)
check(seen, "the failure callback ran")
stage.require("grp.sub", function (val, info)
    eq(type(val), "table")
    eq(info[1], 0)
end)

-- stage.call spreads every table argument; {f, a, b} as the function
local function collect(...) return table.concat({...}, ",") end
eq(stage.call(collect, {1, 2}, "x", {3}), "1,2,x,3")
eq(stage.call(collect, "USERDATA", "CANCEL"), "USERDATA,CANCEL")
eq(stage.call({collect, "a", "b"}, "c", {"d"}), "a,b,c,d")
eq(stage.call("lib1", {7, 8}), 2)

-- addtask(f, ...) without delay; addtask(task, ms [, f]) reschedules / replaces
local order = {}
stage.addtask(function (x) order[#order + 1] = x end, "now")
local t = stage.addtask(10000, function () order[#order + 1] = "old" end)
eq(stage.addtask(t, 20, function () order[#order + 1] = "new" end), true, "rescheduled")
local t2 = stage.addtask(10000, function () order[#order + 1] = "moved" end)
eq(stage.addtask(t2, 40), true)
check(wait_until(function () return #order >= 3 end, 3000), "tasks ran: " .. table.concat(order, ","))
eq(table.concat(order, ","), "now,new,moved")
eq(stage.addtask(t, 5), false, "a finished task cannot be rescheduled")

-- submit(f, ...) without a key; submit(key, "script+fn", ...)
local got = {}
stage.submit(function (a) got[#got + 1] = a end, "nokey")
_G.SUBMITTED = {}
write("package/worker.lua", "return { run = function (x) SUBMITTED[#SUBMITTED + 1] = x end }")
stage.submit("k", "worker+run", "viascript")
check(wait_until(function () return #got == 1 and #SUBMITTED == 1 end, 3000), "submits ran")
eq(got[1], "nokey")
eq(SUBMITTED[1], "viascript")

-- stage.exit() stops the process with status 0
stage.addtask(10, function () logger.info("PASS") stage.exit() end)
