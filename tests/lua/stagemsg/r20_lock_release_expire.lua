--! {"#startup": [["lua+stage"], ["lua+db"]]}
-- §3 row 20: "<LOCK.*" by the holder passes the lock on at once; by anyone else it is
-- ignored; an unrenewed lease ends after ~100 ms.
if process.stage == 1 then
    stage.waitfor("go", function() stage.signal(">R.locked") end)
    stage.waitfor("unlock", function() stage.signal("<R.*") end)
    stage.waitfor("locked", function() stage.signal("stage:db_locked", process.tick) end)
    return
end
local t_db
stage.waitfor("locked", function() end)
stage.waitfor("db_locked", function(t) t_db = t end)
stage.signal(">R.locked")
stage.signal(">>R.locked", 3000)
stage.signal("db:go")
stage.signal("db:unlock")                 -- not the holder: ignored
stage.sleep(300)
eq(t_db, nil, "still held by this instance")
local t0 = process.tick
stage.signal("<R.*")
check(wait_until(function() return t_db ~= nil end))
check(t_db - t0 < 0.09, "released at once, not by the lease: " .. (t_db - t0))
-- now db holds R and never releases: ~100 ms later it is ours again
local again
stage.waitfor("mine", function() again = process.tick end)
local t1 = process.tick
stage.signal(">R.mine")
check(wait_until(function() return again ~= nil end, 3000))
check(again - t1 > 0.05 and again - t1 < 1, "the unrenewed lease ended after " .. (again - t1))
done()
