-- UDP on a multicast group: the listener joins the group; a datagram sent to the group
-- (multicast loopback is on by default) reaches it.
local got
local m, err = broker.ready("udp://239.255.12.34:0?bson", function(socket)
    return function(s, data, addr) got = data.hello end
end)
check(type(m) == "table", "multicast ready: " .. tostring(err))
local port = m[-1]:match(":(%d+)$")
eq(broker.signal("239.255.12.34:" .. port, { hello = "group" }), 1, "datagram sent")
for _ = 1, 100 do if got then break end stage.sleep(10) end
eq(got, "group", "received through the group")
done()
