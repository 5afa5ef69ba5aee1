-- port.expire closes idle connections; port.commit coalesces writes.
local closed_at
local sp = broker.ready("tcp://127.0.0.1:0?bson", function() return true end)
sp.expire = 200
sp.close = function(socket) closed_at = process.tick end
sp.receive = function(socket, data) return data end
local c = broker.join("tcp://127.0.0.1:" .. sp.port .. "?bson")
local t0 = process.tick
c.commit({ hi = 1 })
for _ = 1, 100 do if closed_at then break end stage.sleep(10) end
check(closed_at, "idle connection closed")
local idle = closed_at - t0
check(idle >= 0.18 and idle < 0.8, "closed after about 200 ms, took " .. idle)

-- commit coalescing: 3 replies committed within the window arrive together
local cp = broker.ready("tcp://127.0.0.1:0?bson", function() return true end)
cp.commit = 100
cp.receive = function(socket, data)
    socket.commit({ n = 1 }) socket.commit({ n = 2 })
    return { n = 3 }
end
local times = {}
local cc = broker.join("tcp://127.0.0.1:" .. cp.port .. "?bson", function()
    return function(_, d) times[#times + 1] = process.tick end
end)
local sent = process.tick
cc.commit({ go = 1 })
for _ = 1, 100 do if #times == 3 then break end stage.sleep(5) end
eq(#times, 3)
check(times[1] - sent >= 0.09, "held for the commit window, waited " .. (times[1] - sent))
check(times[3] - times[1] < 0.02, "arrived together")
done()
