--! {"#startup": [["lua+stage"], ["lua+db"]]}
-- §3.1: _WAITFOR is nil outside a handler and has STAGE's layout inside; stage.waitfor()
-- lists the handlers, stage.waitfor(n, f) makes an id of n characters.
if process.stage == 1 then
    stage.waitfor("who.", function()
        return _WAITFOR[-1], _WAITFOR[0], _WAITFOR[1], _WAITFOR[2]
    end)
    return
end
eq(_WAITFOR, nil, "outside a handler")
check(_WAITFOR == nil and rawget(_G, "_WAITFOR") == nil)
local hid, id, addr, st = stage.request("db:who.am.i", 2000)
eq(hid, "who.")
eq(id, "who.am.i")
check(addr:find("^0@"), "the sender's address names instance 0: " .. addr)
eq(st, "stage")
local gen = stage.waitfor(12, function() end)
eq(#gen, 12)
check(gen:match("^[%w]+$"), gen)
stage.waitfor("b", function() end)
local ids = stage.waitfor()
local listed = table.concat(ids, ",")
check(listed:find("b", 1, true) and listed:find(gen, 1, true), listed)
eq(stage.waitfor(gen, nil), true)
done()
