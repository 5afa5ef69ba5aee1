--! {"#startup": [["lua+stage"], ["lua+stage"], ["lua+db"], ["lua+db"]]}
-- §3 row 8: "*msg" reaches every instance of the sender's own stage (STAGE's docs).
if process.stage >= 2 then
    stage.waitfor("msg", function() fail("db is not the sender's stage") end)
    return
end
stage.waitfor("msg", function() return process.stage end)
if process.stage == 1 then return end
local seen = {}
stage.waitfor("seen", function(who) seen[#seen + 1] = who end)
eq(stage.signal("*msg=seen"), 2)
check(wait_until(function() return #seen == 2 end))
table.sort(seen)
eq(table.concat(seen, ","), "0,1")
done()
