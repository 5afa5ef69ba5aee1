--! {"#startup": [["lua+stage"], ["lua+stage"], ["lua+db"], ["lua+db"]]}
-- §3 row 1: "db:load_user" reaches one db instance (round-robin), handled as "load_user".
if process.stage >= 2 then
    stage.waitfor("db:load_user", function() fail("the db: prefix is removed before lookup") end)
    stage.waitfor("load_user", function(id)
        return process.stage, id, _WAITFOR[0], _WAITFOR[-1], _WAITFOR[2]
    end)
    return
end
if process.stage == 1 then return end
local seen = {}
stage.waitfor("load_user", function(who, id, w0, w1, w2)
    eq(w0, "load_user", "_WAITFOR[0]")
    eq(w1, "load_user", "_WAITFOR[-1]")
    eq(w2, "stage", "_WAITFOR[2]: the sender's stage")
    seen[#seen + 1] = who
end)
for i = 1, 4 do eq(stage.signal("db:load_user", i), 1) end
check(wait_until(function() return #seen == 4 end), "4 deliveries")
table.sort(seen)
eq(table.concat(seen, ","), "2,2,3,3", "round-robin over both db instances")
done()
