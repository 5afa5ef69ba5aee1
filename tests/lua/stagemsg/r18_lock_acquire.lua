--! {"#startup": [["lua+stage"], ["lua+db"]]}
-- §3 row 18: ">LOCK.cb": when lock LOCK is granted, message "cb" with the arguments comes
-- back to the requester; another requester waits until the holder releases.
if process.stage == 1 then
    stage.waitfor("go", function() stage.signal(">LOCK.locked", "db") end)
    stage.waitfor("locked", function(v)
        eq(_WAITFOR[0], "locked")
        stage.signal("stage:db_locked", v)
        stage.signal("<LOCK.*")
    end)
    return
end
local got = {}
stage.waitfor("locked", function(v) got[#got + 1] = v end)
stage.waitfor("db_locked", function(v) got[#got + 1] = v end)
eq(stage.signal(">LOCK.locked", "stage"), 1)
check(wait_until(function() return #got == 1 end), "granted at once")
eq(got[1], "stage")
stage.signal(">>LOCK.locked", 2000)      -- hold it for a while
stage.signal("db:go")
stage.sleep(300)
eq(#got, 1, "db waits while this instance holds the lock")
stage.signal("<LOCK.*")
check(wait_until(function() return #got == 2 end), "db got the lock after the release")
eq(got[2], "db")
done()
