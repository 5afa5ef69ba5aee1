--! {"#startup": [["lua+stage"], ["lua+stage"], ["lua+db"], ["lua+db"]]}
-- §3 row 3: a handler's return values go back to the sender as the same message id.
if process.stage >= 2 then
    stage.waitfor("load_user", function(id) return { id = id, name = "kim" }, process.stage end)
    stage.waitfor("quiet", function() end)
    return
end
if process.stage == 1 then return end
local got
stage.waitfor("load_user", function(user, who)
    got = user
    check(who == 2 or who == 3)
    eq(_WAITFOR[-1], "load_user")
    eq(_WAITFOR[2], nil, "the reply carries no return stage")
    check(type(_WAITFOR[1]) == "string", "the replying instance's address")
    return "never sent back (no ping-pong)"
end)
stage.signal("db:load_user", 42)
check(wait_until(function() return got ~= nil end), "the reply arrived")
eq(got.id, 42)
eq(got.name, "kim")
-- a handler that returns nothing sends nothing
local quiet = false
stage.waitfor("quiet", function() quiet = true end)
stage.signal("db:quiet")
stage.sleep(100)
eq(quiet, false)
done()
