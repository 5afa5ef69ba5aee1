--! {"#startup": [["lua+stage"], ["lua+w"], ["lua+w"], ["lua+w"]]}
-- Round-robin spreads requests evenly over 3 instances; "*w:msg" reaches every one.
if process.stage ~= 0 then
    stage.waitfor("count", function() return process.stage end)
    stage.waitfor("all", function(x) stage.signal("stage:got", process.stage, x) end)
    return
end
local per = {}
for _ = 1, 30 do
    local who = stage.request("w:count", 2000)
    per[who] = (per[who] or 0) + 1
end
eq(per[1], 10, "instance 1")
eq(per[2], 10, "instance 2")
eq(per[3], 10, "instance 3")

local got = {}
stage.waitfor("got", function(who, x) got[who] = x end)
eq(stage.signal("*w:all", "hi"), 3, "delivered to 3 instances")
for _ = 1, 100 do
    if got[1] and got[2] and got[3] then break end
    stage.sleep(10)
end
eq(got[1], "hi")
eq(got[2], "hi")
eq(got[3], "hi")

-- "*w:count=cb": every instance replies to handler cb here
local replied = {}
stage.waitfor("on_count", function(who) replied[#replied + 1] = who end)
eq(stage.signal("*w:count=on_count"), 3)
for _ = 1, 100 do
    if #replied == 3 then break end
    stage.sleep(10)
end
table.sort(replied)
eq(table.concat(replied, ","), "1,2,3")

-- "*msg": every instance of the sender's own stage (here: just this one)
local mine = 0
stage.waitfor("self", function() mine = mine + 1 end)
eq(stage.signal("*self"), 1)
stage.sleep(20)
eq(mine, 1)
eq(stage.signal("*nobody:x"), 0)
done()
