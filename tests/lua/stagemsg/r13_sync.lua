--! {"#startup": [["lua+stage"], ["lua+stage"], ["lua+db"], ["lua+db"]]}
-- §3 row 13: ":msg" calls the handler of this instance synchronously.
if process.stage ~= 0 then return end
local got
stage.waitfor("msg", function(x) got = x; eq(_WAITFOR[0], "msg"); eq(_WAITFOR[2], nil); return x + 1 end)
eq(stage.signal(":msg", 5), 1)
eq(got, 5, "ran before signal returned")
eq(stage.request(":msg", 100, 6), 7)
eq(stage.signal(":none"), 0)
local ok, err = pcall(stage.signal, ":db:msg")
check(not ok and err:find("names a handler of the calling instance", 1, true), tostring(err))
done()
