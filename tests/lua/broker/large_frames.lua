-- Frames larger than the first read buffer (16 KiB) but within IN arrive whole, pipelined
-- with small ones and split over many reads; large replies go out whole; afterwards small
-- frames still work on the same connection. IN is 1 MiB here.
local sp = broker.ready("tcp://127.0.0.1:0?bson=1m,4m", function() return true end)
sp.receive = function(_, d)
    return { n = d.n, len = #d.s, s = d.s, sum = d.s:byte(1) + d.s:byte(-1) }
end
local got = {}
local c = broker.join("tcp://127.0.0.1:" .. sp.port .. "?bson=2m,4m", function()
    return function(_, d) got[#got + 1] = d end
end)
local sizes = { 10, 300000, 20, 70000, 900000, 5, 17000, 16384 }
for n, size in ipairs(sizes) do
    local s = string.char(n) .. string.rep("x", size - 2) .. string.char(n + 100)
    c.commit({ n = n, s = s })
end
for _ = 1, 2000 do if #got >= #sizes then break end stage.sleep(5) end
eq(#got, #sizes, "every frame answered")
for i, size in ipairs(sizes) do
    local d = got[i] or {}
    eq(d.n, i, "reply " .. i .. " in order")
    eq(d.len, size, "frame " .. i .. " arrived whole")
    eq(#(d.s or ""), size, "reply " .. i .. " went out whole")
    eq(d.sum, i + i + 100, "frame " .. i .. " has its own first and last byte")
end
-- A frame announcing one byte more than IN closes only that connection, after the good
-- frame before it was answered. Only the length field is sent (a string goes out as raw
-- bytes on a bson socket), so the server closes with nothing unread: a FIN, not a reset
-- that could discard the reply.
local closed = false
sp.close = function() closed = true end
got = {}
c.commit(bundle.bson({ n = 1, s = "ok" }) .. "\1\0\16\0")
for _ = 1, 2000 do if closed and #got >= 1 then break end stage.sleep(5) end
check(closed, "the connection with the oversize frame was closed")
eq(#got, 1, "the frame before the oversize one was answered")
eq(got[1].s, "ok", "with its own reply")
done()
