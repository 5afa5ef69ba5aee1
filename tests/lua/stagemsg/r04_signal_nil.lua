--! {"#startup": [["lua+stage"], ["lua+stage"], ["lua+db"], ["lua+db"]]}
-- §3 row 4: stage.signal(nil, ...) inside a handler answers the message (as cb, else the
-- same id), also for messages sent without =cb; outside a handler it is an error.
if process.stage >= 2 then
    stage.waitfor("ask", function(x)
        eq(stage.signal(nil, "early", x), 1)
        return "not sent after an explicit answer"
    end)
    return
end
if process.stage == 1 then return end
local got = {}
stage.waitfor("ask", function(a, b) got[#got + 1] = a .. b end)
stage.waitfor("cb", function(a, b) got[#got + 1] = "cb:" .. a .. b end)
stage.signal("db:ask", 1)
stage.signal("db:ask=cb", 2)
check(wait_until(function() return #got == 2 end))
stage.sleep(50)
table.sort(got)
eq(table.concat(got, " "), "cb:early2 early1")
local ok, err = pcall(stage.signal, nil, 1)
check(not ok and err:find("no message is being handled", 1, true), tostring(err))
done()
