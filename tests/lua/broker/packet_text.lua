-- packet framing with a binary payload; text framing; tables on packet go as BSON.
local sp = broker.ready("tcp://127.0.0.1:0?packet=1k,64k", function(socket)
    return function(s, data)
        check(type(data) == "string", "packet data is a string")
        return data:reverse()
    end
end)
local got = {}
local c = broker.join("tcp://127.0.0.1:" .. sp.port .. "?packet", function()
    return function(_, d) got[#got + 1] = d end
end)
local bin = "\0\1\2\255\254binary\0"
c.commit(bin)
for _ = 1, 100 do if #got > 0 then break end stage.sleep(5) end
eq(got[1], bin:reverse(), "binary payload round trip")
-- a table on a packet socket is BSON: the server sees the document bytes
c.commit({ a = 1 })
for _ = 1, 100 do if #got > 1 then break end stage.sleep(5) end
eq(bundle.bson(got[2]:reverse()).a, 1, "table sent as BSON in a packet")

local tp = broker.ready("tcp://127.0.0.1:0?text", function() return function(_, line) return "echo:" .. line end end)
local lines = {}
local t = broker.join("tcp://127.0.0.1:" .. tp.port .. "?text", function() return function(_, l) lines[#lines + 1] = l end end)
t.commit("hello")
t.commit("world\n")
for _ = 1, 100 do if #lines > 1 then break end stage.sleep(5) end
eq(lines[1], "echo:hello") eq(lines[2], "echo:world")
done()
