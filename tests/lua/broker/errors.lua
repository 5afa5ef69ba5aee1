-- ready/join failures return errno and a message; a Lua error in receive is logged and the
-- connection stays open.
local n, msg = broker.ready("tcp://127.0.0.1:0?nope", function() end)
eq(n, -1) check(msg:find("unknown framing 'nope'"), msg)
n, msg = broker.ready("ftp://x:1", function() end)
eq(n, -1) check(msg:find("unsupported scheme"), msg)

local sp = broker.ready("tcp://127.0.0.1:0?bson", function() return true end)
-- the same port again, not in #services: EADDRINUSE (98 on Linux)
n, msg = broker.ready("tcp://127.0.0.1:" .. sp.port, function() end)
eq(n, 98, "errno") check(msg:find("in use"), msg)

local calls = 0
sp.receive = function(socket, data)
    calls = calls + 1
    if data.boom then error("boom in receive") end
    return { ok = calls }
end
local inbox = {}
local c = broker.join("tcp://127.0.0.1:" .. sp.port .. "?bson", function() return function(_, d) inbox[#inbox + 1] = d end end)
c.commit({ boom = true })
c.commit({ fine = true })
for _ = 1, 100 do if #inbox > 0 then break end stage.sleep(5) end
eq(#inbox, 1, "the connection survived the error")
eq(inbox[1].ok, 2)

-- a joined socket's onclose runs when the server closes it
local gone = false
local sp2 = broker.ready("tcp://127.0.0.1:0?bson", function() return function(s) s.close() end end)
local j = broker.join("tcp://127.0.0.1:" .. sp2.port .. "?bson")
j.onclose = function(s) gone = s.id end
j.commit({ x = 1 })
for _ = 1, 100 do if gone then break end stage.sleep(5) end
eq(gone, j.id, "socket.onclose ran")
done()
