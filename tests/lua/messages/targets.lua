--! {"#startup": [["lua+stage"], ["lua+stage"], ["lua+db"]]}
-- Every target form of API.md §4, the handler lookup order, _WAITFOR, bound values,
-- =cb replies, replies with stage.signal(nil, ...), and waitfor query / unregister.
local n = process.stage
if n == 2 then
    -- the `db` instance
    stage.waitfor("db:load_user", function(id) return { id = id, name = "kim" } end)
    stage.waitfor("db:who", function()
        return process.stage, _WAITFOR[-1], _WAITFOR[0], _WAITFOR[1].stage, _WAITFOR[1].instance,
            _WAITFOR[1].node == process.node, _WAITFOR[2] ~= nil
    end)
    stage.waitfor("db:tree.", function() return "tree.", _WAITFOR[0] end)
    stage.waitfor("db:tree.a.", function() return "tree.a." end)
    stage.waitfor("db:", function() return "db:" end)
    stage.waitfor("db:early", function(x)
        eq(stage.signal(nil, "early", x), 1, "the first reply goes out")
        return "ignored"
    end)
    stage.waitfor("stage:hello", function(x) return "qualified " .. x .. " from " .. _WAITFOR[1].stage end)
    stage.waitfor("db:bound", function(a, b, x) return a .. b .. x end, "A", "B")
    stage.waitfor("db:double", function(x) return x * 2 end)
    stage.waitfor("db:route", function() return _WAITFOR[2] == nil end)
    stage.waitfor("db:later", function(x)
        -- keep the route and answer from another callback
        local route = _WAITFOR[2]
        stage.addtask(20, function() stage.signal(route, "later " .. x) end)
    end)
    return
end
if n == 1 then
    stage.waitfor("ping", function() return "pong from 1" end)
    return
end

-- instance 0 drives the scenario
check(_WAITFOR[0] == nil, "_WAITFOR is empty outside a handler")
stage.waitfor("ping", function() return "pong from 0" end)
local u = stage.request("db:load_user", 2000, 42)
eq(u.id, 42)
eq(u.name, "kim")

local r = { stage.request("db:who", 2000) }
eq(r[1], 2, "handled by the db instance")
eq(r[2], "db:who", "_WAITFOR[-1]: the handler id")
eq(r[3], "db:who", "_WAITFOR[0]: the message id")
eq(r[4], "stage", "_WAITFOR[1].stage")
eq(r[5], 0, "_WAITFOR[1].instance")
eq(r[6], true, "_WAITFOR[1].node")
eq(r[7], true, "_WAITFOR[2]: a request wants a reply")

-- lookup order: a:b.c.d, a:b.c., a:b., a:
eq(stage.request("db:tree.a.b", 2000), "tree.a.")
local h, id = stage.request("db:tree.x.y", 2000)
eq(h, "tree.")
eq(id, "db:tree.x.y")
eq(stage.request("db:other", 2000), "db:")

-- "msg": one instance of the sender's own stage, round-robin
local seen = {}
for _ = 1, 10 do seen[stage.request("ping", 2000)] = true end
check(seen["pong from 0"] and seen["pong from 1"], "both instances of stage answer ping")

-- ":msg": this instance, synchronously
local got, v, e
stage.waitfor("local.x", function(a) got = a; return a + 1 end)
eq(stage.signal(":local.x", 5), 1)
eq(got, 5, "the handler ran before signal returned")
eq(stage.request(":local.x", 100, 6), 7)
eq(stage.signal(":local.y.z", 1), 0, "no handler local.y.z / local.y. here")
stage.waitfor("local.err", function() error("local boom") end)
eq(stage.signal(":local.err"), 1, "the handler ran (its error is logged)")
v, e = stage.request(":local.err", 100)
eq(v, nil)
eq(e, "error in handler 'local.err'")
stage.waitfor("local.", function() return "prefix" end)
eq(stage.request(":local.y", 100), "prefix")

-- "=stage:msg": this process only; "+stage:msg": other nodes only (none yet)
eq(stage.request("=db:load_user", 2000, 1).id, 1)
eq(stage.signal("+db:load_user", 1), 0)
v, e = stage.request("+db:load_user", 100, 1)
eq(v, nil)
eq(e, "no route")

-- no instance has the stage id
v, e = stage.request("nowhere:x", 100)
eq(e, "no route")
eq(stage.signal("nowhere:x"), 0)

-- "stage+msg": delivered as "<sender stage>:msg"
eq(stage.request("db+hello", 2000, "x"), "qualified x from stage")

-- bound values come first
eq(stage.request("db:bound", 2000, "C"), "ABC")

-- signal without =cb wants no reply
eq(stage.signal("db:route"), 1)

-- "stage:msg=cb": the return values come back to handler cb here
local replies = {}
stage.waitfor("on_double", function(x) replies[#replies + 1] = { x, _WAITFOR[1].stage, _WAITFOR[2] } end)
eq(stage.signal("db:double=on_double", 21), 1)
for _ = 1, 100 do
    if #replies > 0 then break end
    stage.sleep(10)
end
eq(replies[1][1], 42)
eq(replies[1][2], "db", "the reply comes from db")
eq(replies[1][3], nil, "a reply wants no reply")

-- reply early with stage.signal(nil, ...): the return values are not sent again
v, e = stage.request("db:early", 2000, "z")
eq(v, "early")
eq(e, "z")
-- reply later through the route kept from _WAITFOR[2]
eq(stage.request("db:later", 2000, "q"), "later q")

-- waitfor without id: a generated id, usable as the reply handler
local gen = stage.waitfor(function(tag, x) replies[#replies + 1] = { tag .. x } end, "gen")
check(type(gen) == "string", "a generated id")
eq(stage.signal("db:double=" .. gen, 4), 1)
for _ = 1, 100 do
    if #replies > 1 then break end
    stage.sleep(10)
end
eq(replies[2][1], "gen8")

-- query and unregister
local f, bound = stage.waitfor(gen)
check(type(f) == "function", "waitfor(id) gives the handler")
eq(bound[1], "gen")
eq(stage.waitfor(gen, nil), true)
eq(stage.waitfor(gen), nil)
eq(stage.waitfor(gen, nil), false)

-- bad targets are errors
local ok, err = pcall(stage.signal, "db:x=")
check(not ok and err:find("invalid message target", 1, true), tostring(err))
ok, err = pcall(stage.request, "*db:x", 100)
check(not ok and err:find("broadcast", 1, true), tostring(err))
done()
