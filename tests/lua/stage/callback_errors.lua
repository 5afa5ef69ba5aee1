-- An error in one callback is logged and harms nothing else.
stage.addtask(1, function() error("boom in task") end)
stage.submit(1, function() local x = nil; return x.y end)
local after = 0
stage.submit(1, function() after = after + 1 end)
stage.addtask(20, function() after = after + 1 end)
stage.sleep(100)
eq(after, 2)
done()
