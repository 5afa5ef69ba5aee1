--! {"#startup": [["lua+stage"], ["lua+stage"], ["lua+db"], ["lua+db"]]}
-- §3 row 16: "db:" + table sends one message per string key.
if process.stage >= 2 then
    stage.waitfor("k1", function(v) return "k1=" .. v end)
    stage.waitfor("k2", function(v) return "k2=" .. v.x end)
    return
end
if process.stage == 1 then return end
local got = {}
stage.waitfor("k1", function(s) got[#got + 1] = s end)
stage.waitfor("k2", function(s) got[#got + 1] = s end)
eq(stage.signal("db:", { k1 = "a", k2 = { x = "b" } }), 2)
check(wait_until(function() return #got == 2 end))
table.sort(got)
eq(table.concat(got, " "), "k1=a k2=b")
local ok, err = pcall(stage.signal, "db:", "not a table")
check(not ok and err:find("table of messages", 1, true), tostring(err))
done()
