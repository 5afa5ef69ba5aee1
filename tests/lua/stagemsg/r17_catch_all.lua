--! {"#startup": [["lua+stage"], ["lua+stage"], ["lua+db"], ["lua+db"]]}
-- §3 row 17: an id without handler walks a:b.c.d → a:b.c. → a:b. → a: → the catch-all "@".
if process.stage >= 2 then
    stage.waitfor("a:b.", function() return "a:b.", _WAITFOR[0], _WAITFOR[-1] end)
    stage.waitfor("a:", function() return "a:" end)
    stage.waitfor("@", function(...) return "@", _WAITFOR[0], _WAITFOR[-1], select("#", ...) end)
    return
end
if process.stage == 1 then return end
local h, id, hid = stage.request("db+b.c.d", 2000)   -- arrives as "stage:b.c.d"
eq(h, "@", "stage:b.c.d has no handler up the chain but @")
h, id, hid = stage.request("db:a:b.c.d", 2000)
eq(h, "a:b.")
eq(id, "a:b.c.d")
eq(hid, "a:b.")
eq(stage.request("db:a:zz", 2000), "a:")
local n
h, id, hid, n = stage.request("db:unknown", 2000, 1, 2)
eq(h, "@")
eq(id, "unknown", "_WAITFOR[0] in the catch-all")
eq(hid, "@", "_WAITFOR[-1]")
eq(n, 2)
done()
