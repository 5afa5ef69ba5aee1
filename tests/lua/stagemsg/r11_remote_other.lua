--! {"#startup": [["lua+stage"], ["lua+stage"], ["lua+db"], ["lua+db"]]}
-- §3 row 11: "+db:msg" goes to another node only; without a cluster nothing takes it.
if process.stage >= 2 then
    stage.waitfor("msg", function() fail("+db:msg must not be handled on this node") end)
    return
end
if process.stage == 1 then return end
eq(stage.signal("+db:msg"), 0)
local v, e = stage.request("+db:msg", 200)
eq(v, nil)
eq(e, "no route")
stage.sleep(50)
done()
