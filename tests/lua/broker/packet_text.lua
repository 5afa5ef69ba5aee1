-- STAGE's framings: `packet` frames are BSON documents decoded into tables (the same as
-- `bson`), a string committed on any socket goes as its bytes; `text` hands the line with its
-- `\n`; no framing (or `?raw`) is a byte stream handed over in string chunks.
local sp = broker.ready("tcp://127.0.0.1:0?packet=1k,64k", function(socket)
    return function(s, data)
        check(type(data) == "table", "packet data is a table, got " .. type(data))
        return { echo = data.msg, n = #data.list }
    end
end)
local got = {}
local c = broker.join("tcp://127.0.0.1:" .. sp.port .. "?packet", function()
    return function(_, d) got[#got + 1] = d end
end)
c.commit({ msg = "hi", list = { 1, 2, 3 } })
-- A string is sent as its bytes: here a ready-made BSON document, read as a packet frame.
c.commit(bundle.bson({ msg = "pre-encoded", list = {} }))
for _ = 1, 100 do if #got > 1 then break end stage.sleep(5) end
eq(got[1].echo, "hi") eq(got[1].n, 3)
eq(got[2].echo, "pre-encoded", "a string goes out unframed")

local tp = broker.ready("tcp://127.0.0.1:0?text", function()
    return function(_, line) return "echo:" .. line end
end)
local lines = {}
local t = broker.join("tcp://127.0.0.1:" .. tp.port .. "?text", function()
    return function(_, l) lines[#lines + 1] = l end
end)
t.commit("hello")       -- the newline is added when missing
t.commit("world\r\n")
for _ = 1, 100 do if #lines > 1 then break end stage.sleep(5) end
-- The server got "hello\n" and returned "echo:hello\n" (kept as it ends with \n).
eq(lines[1], "echo:hello\n", "the line comes with its newline")
eq(lines[2], "echo:world\r\n", "and with its \\r\\n")

-- No framing: raw chunks, both ways; `?raw` is the same.
local chunks = {}
local rp = broker.ready("tcp://127.0.0.1:0", function()
    return function(s, data)
        check(type(data) == "string", "raw data is a string")
        chunks[#chunks + 1] = data
        return data:upper()
    end
end)
local back = {}
local r = broker.join("tcp://127.0.0.1:" .. rp.port .. "?raw", function()
    return function(_, d) back[#back + 1] = d end
end)
r.commit("no framing at all")
for _ = 1, 100 do if #back > 0 then break end stage.sleep(5) end
eq(table.concat(chunks), "no framing at all")
eq(table.concat(back), "NO FRAMING AT ALL", "nothing added to a raw reply")
done()
