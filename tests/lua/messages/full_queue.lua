--! {"#startup": [["lua+stage"], ["lua+slow"]], "#threads": [2, 4]}
-- A full queue never blocks the sender: signal returns 0 and request "queue full".
if process.stage == 1 then
    stage.waitfor("block", function(ms)
        -- Busy on purpose: this instance cannot take messages off its queue meanwhile.
        -- Wall-clock time (process.tick), so a loaded machine does not stretch it.
        local t = process.tick
        while process.tick - t < ms / 1000 do end
    end)
    stage.waitfor("n", function() end)
    stage.waitfor("ping", function() return "pong" end)
    return
end
eq(stage.request("slow:ping", 2000), "pong")
eq(stage.signal("slow:block", 400), 1)
stage.sleep(100)
local t0, delivered = process.tick, 0
for _ = 1, 1000 do delivered = delivered + stage.signal("slow:n") end
check(process.tick - t0 < 0.2, "1000 signals to a full queue took " .. (process.tick - t0) .. " s")
eq(delivered, 4, "the queue holds #threads[1] = 4 messages")
local v, e = stage.request("slow:ping", 1000)
eq(v, nil)
eq(e, "queue full")
-- once the instance is free again, it is served
for _ = 1, 100 do
    v = stage.request("slow:ping", 1000)
    if v then break end
    stage.sleep(20)
end
eq(v, "pong")
done()
