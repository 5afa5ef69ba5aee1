--! {"#startup": [["lua+stage"], ["lua+stage"], ["lua+db"], ["lua+db"]]}
-- §3 row 2: "db:load_user=cb": the return values reach the sender's cb; _WAITFOR[0] keeps
-- "=cb"; with no handler in db, cb is never called.
if process.stage >= 2 then
    stage.waitfor("load_user", function(id) return { id = id, w0 = _WAITFOR[0] }, process.stage end)
    return
end
if process.stage == 1 then return end
local got = {}
stage.waitfor("on_user", function(u, who)
    got[#got + 1] = u
    eq(_WAITFOR[0], "on_user")
    eq(_WAITFOR[2], nil, "a reply is never answered")
    check(who == 2 or who == 3, "from a db instance")
end)
eq(stage.signal("db:load_user=on_user", 7), 1)
check(wait_until(function() return #got == 1 end), "the reply arrived")
eq(got[1].id, 7)
eq(got[1].w0, "load_user=on_user")
-- nobody handles "nothing" in db: cb is not called
local called = false
stage.waitfor("never", function() called = true end)
eq(stage.signal("db:nothing=never"), 1)
stage.sleep(100)
eq(called, false, "=cb is not called when the message had no handler")
done()
