--! {"#startup": [["lua+stage"], ["lua+stage"], ["lua+db"], ["lua+db"]]}
-- §3 row 9: "=db:msg": one db instance in this process, id "msg".
if process.stage >= 2 then
    stage.waitfor("msg", function() return process.stage, _WAITFOR[0] end)
    return
end
if process.stage == 1 then return end
local who, id = stage.request("=db:msg", 2000)
check(who == 2 or who == 3, "a db instance")
eq(id, "msg")
done()
