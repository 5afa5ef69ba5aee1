--! {"#startup": [["lua+stage"], ["lua+worker"], ["lua+worker"], ["=route+route"]]}
-- The route stage as STAGE's docs use it: subscribers register ids with "route:@", accept a
-- message by answering the "route:@" check, and answer the original sender; "!fail" hears
-- about messages nobody took; "route:*id" reaches every subscriber.
if process.stage >= 1 then
    if process.stage == 1 then
        -- only this worker accepts routed messages
        stage.waitfor("route:@", function(id, k) stage.signal(nil, k) end)
    end
    stage.waitfor("fetch", function(id, v) return "fetched " .. v .. " by " .. process.stage, id end)
    stage.waitfor("sub", function() stage.signal("route:@", { login = "fetch" }) end)
    stage.waitfor("pause", function() stage.signal("route:@", { login = false }) end)
    return
end
stage.signal("*worker:sub")
stage.sleep(100)
local got, failed = {}, {}
stage.waitfor("on_login", function(v, id) got[#got + 1] = v .. " (" .. id .. ")" end)
stage.waitfor("r__fail", function(id, v) failed[#failed + 1] = id .. ":" .. v end)
stage.signal("route:login?arg=on_login", "HELLO")
check(wait_until(function() return #got == 1 end))
eq(got[1], "fetched HELLO by 1 (login)", "the accepting subscriber answered the sender")
-- nobody subscribed: the fail callback at once
stage.signal("route:nobody!r__fail", "X")
check(wait_until(function() return #failed == 1 end))
eq(failed[1], "nobody:X")
-- every subscriber, without asking
stage.signal("route:*login=on_login", "ALL")
check(wait_until(function() return #got == 3 end))
local sorted = { table.unpack(got) }
table.sort(sorted)
eq(table.concat(sorted, "|"), "fetched ALL by 1 (login)|fetched ALL by 2 (login)|fetched HELLO by 1 (login)")
-- both workers pause: the message fails; worker 2 alone never accepts: it fails after 300 ms
stage.signal("*worker:pause")
stage.sleep(100)
stage.signal("route:login!r__fail", "P")
check(wait_until(function() return #failed == 2 end))
eq(failed[2], "login:P")
stage.signal("*worker:sub")
stage.sleep(100)
stage.signal("worker:pause")          -- one of the two (round-robin)
stage.sleep(100)
local t0 = process.tick
stage.signal("route:login!r__fail=on_login", "Q")
check(wait_until(function() return #failed == 3 or #got == 4 end))
if #failed == 3 then
    check(process.tick - t0 > 0.25, "failed after the acceptance time, " .. (process.tick - t0))
else
    eq(got[4], "fetched Q by 1 (login)", "worker 1 is still subscribed and accepts")
end
done()
