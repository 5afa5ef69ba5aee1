local n = 0
eq(stage.once("init", function() n = n + 1 return "first" end), "first")
eq(stage.once("init", function() n = n + 1 end), nil)
eq(n, 1)
stage.once("init", nil)
stage.once("init", function() n = n + 1 end)
eq(n, 2)
-- call: table args then the rest
eq(stage.call(function(a, b, c) return a + b + c end, { 1, 2 }, 3), 6)
-- sleep yields: another callback runs meanwhile
local other = false
stage.addtask(5, function() other = true end)
local t0 = process.tick
stage.sleep(50)
check(process.tick - t0 >= 0.045, "slept about 50 ms")
check(other, "another callback ran during sleep")
done()
