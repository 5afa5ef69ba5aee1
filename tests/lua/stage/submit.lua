-- submit: same key never overlaps and keeps order; key 0 has no restriction.
local log = {}
for i = 1, 5 do
    stage.submit(7, function(n)
        log[#log + 1] = "start" .. n
        stage.sleep(5)
        log[#log + 1] = "end" .. n
    end, i)
end
stage.sleep(200)
eq(table.concat(log, ","), "start1,end1,start2,end2,start3,end3,start4,end4,start5,end5")
-- key 0: runs concurrently
local active, peak = 0, 0
for _ = 1, 3 do
    stage.submit(0, function()
        active = active + 1
        peak = math.max(peak, active)
        stage.sleep(20)
        active = active - 1
    end)
end
stage.sleep(100)
eq(peak, 3)
-- a number returned re-runs it
local n = 0
stage.submit("k", function() n = n + 1 if n < 3 then return 5 end end)
stage.sleep(100)
eq(n, 3)
done()
