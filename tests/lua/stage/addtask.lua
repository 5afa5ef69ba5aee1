-- addtask: runs after ms, repeats while it returns a number, cancels by handle.
local runs, args = 0, nil
stage.addtask(10, function(a, b)
    runs = runs + 1
    args = a .. b
    if runs < 3 then return 10 end
end, "x", "y")
local cancelled = false
local h = stage.addtask(50, function() cancelled = true end)
check(math.type(h) == "integer", "a handle is an integer")
eq(stage.addtask(h, nil), true)
eq(stage.addtask(h, nil), false, "cancelling twice finds nothing")
stage.sleep(200)
eq(runs, 3)
eq(args, "xy")
check(not cancelled, "a cancelled task never runs")
-- upvalues work in callbacks
local count = 0
local function bump() count = count + 1 end
stage.addtask(1, function() bump() end)
stage.sleep(50)
eq(count, 1)
done()
