-- `&stage` on a port: STAGE's BSON arrays there (0-based decode, sequences sent as
-- {"#1": ...}); a port without it keeps the standard mapping.
local sp = broker.ready("tcp://127.0.0.1:0?bson&stage", function()
    return function(s, d)
        return { first = d.arr[0], second = d.arr[1], list = { "a", "b" } }
    end
end)
local inbox = {}
local c = broker.join("tcp://127.0.0.1:" .. sp.port .. "?bson", function()
    return function(s, d) inbox[#inbox + 1] = d end
end)
check(type(c) == "table", "joined: " .. tostring(c))
c.commit({ ["arr@A"] = { 10, 20 } })
local t = process.tick
while #inbox == 0 and process.tick - t < 5 do stage.sleep(10) end
local r = inbox[1]
check(r ~= nil, "a reply came back")
eq(r.first, 10, "the STAGE port reads arrays 0-based"); eq(r.second, 20)
eq(r.list["#1"], "a", "and sends sequences as {\"#1\": ...}, read as text keys by a standard port")
eq(r.list[1], nil)
done()
