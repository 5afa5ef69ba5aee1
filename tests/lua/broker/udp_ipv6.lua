-- UDP round trip (join, signal to an address) and IPv6 loopback, dual-stack [::].
local up = broker.ready("udp://127.0.0.1:0?bson", function(socket)
    return function(s, data, addr)
        check(addr:match("^127%.0%.0%.1:%d+$"), "udp receive gets the sender " .. tostring(addr))
        return { pong = data.ping }
    end
end)
check(type(up) == "table", "udp ready: " .. tostring(up))
local port = tonumber(up[-1]:match(":(%d+)$"))
local got = {}
local c = broker.join("udp://127.0.0.1:" .. port .. "?bson", function()
    return function(_, d) got[#got + 1] = d end
end)
c.commit({ ping = 7 })
for _ = 1, 100 do if #got > 0 then break end stage.sleep(5) end
eq(got[1] and got[1].pong, 7, "udp round trip")
-- text over UDP: the datagram is the line, with or without its newline
local tu = broker.ready("udp://127.0.0.1:0?text", function() return function(s, line) return "re:" .. line end end)
local lines = {}
local tc = broker.join("udp://127.0.0.1:" .. tu[-1]:match(":(%d+)$") .. "?text", function()
    return function(_, l) lines[#lines + 1] = l end
end)
tc.commit("no newline")
for _ = 1, 100 do if #lines > 0 then break end stage.sleep(5) end
eq(lines[1], "re:no newline\n", "udp text round trip (the reply gets its newline)")

-- broker.signal(addr, v): one datagram from the broker's own socket (reply goes nowhere)
eq(broker.signal("127.0.0.1:" .. port, { ping = 8 }), 1)

-- IPv6: a listener on [::1], and one on [::] reached over IPv4 too
local v6 = broker.ready("tcp://[::1]:0?bson", function() return function(s, d) return { peer = s[1] } end end)
check(type(v6) == "table", "listen on ::1: " .. tostring(v6))
local r = {}
local c6 = broker.join("tcp://[::1]:" .. v6.port .. "?bson", function() return function(_, d) r[#r + 1] = d end end)
c6.commit({ x = 1 })
local any = broker.ready("tcp://[::]:0?bson", function() return function(s, d) return { peer = s[1] } end end)
local c4 = broker.join("tcp://127.0.0.1:" .. any.port .. "?bson", function() return function(_, d) r[#r + 1] = d end end)
c4.commit({ x = 2 })
for _ = 1, 100 do if #r > 1 then break end stage.sleep(5) end
local peers = {}
for _, d in ipairs(r) do peers[#peers + 1] = d.peer end
table.sort(peers)
check(peers[1]:match("^%[::1%]:%d+$"), "ipv6 peer " .. tostring(peers[1]))
check(peers[2]:match("^%[::ffff:127%.0%.0%.1%]:%d+$"), "ipv4 peer on [::] " .. tostring(peers[2]))
done()
