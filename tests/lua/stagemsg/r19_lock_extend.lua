--! {"#startup": [["lua+stage"], ["lua+db"]]}
-- §3 row 19: ">>LOCK.cb, ms" extends the holder's lease; an extension by anyone else is
-- ignored.
if process.stage == 1 then
    stage.waitfor("go", function() stage.signal(">L.locked") end)
    stage.waitfor("steal", function() stage.signal(">>L.x", 5000) end)
    stage.waitfor("locked", function() stage.signal("stage:db_locked", process.tick) end)
    return
end
local t_db
stage.waitfor("locked", function() end)
stage.waitfor("db_locked", function(t) t_db = t end)
stage.signal(">L.locked")
stage.sleep(20)
local t0 = process.tick
stage.signal(">>L.locked", 400)          -- the lease now ends ~500 ms from here
stage.signal("db:go")
stage.signal("db:steal")                  -- db is not the holder: no effect
check(wait_until(function() return t_db ~= nil end, 3000), "the lease ended")
local held = t_db - t0
check(held > 0.35 and held < 1.5, "the extended lease lasted " .. held .. " s")
done()
