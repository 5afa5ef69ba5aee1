-- Pipelined frames (several in one read) are handled in order: replies and the script's own
-- commits keep their order, an error affects only its frame, a handler may yield.
local sp = broker.ready("tcp://127.0.0.1:0?bson=1k,64k", function() return true end)
sp.receive = function(socket, d)
    if d.boom then error("boom " .. d.n) end
    if d.n == 2 then socket.commit(print) end  -- a Rust error raised inside the handler
    if d.nap then stage.sleep(20) end
    socket.commit({ n = d.n, pre = true })
    if d.n == 5 then return print end          -- a reply that cannot be sent
    return { n = d.n }
end
local got = {}
local c = broker.join("tcp://127.0.0.1:" .. sp.port .. "?bson", function()
    return function(_, d) got[#got + 1] = d.n .. (d.pre and "a" or "b") end
end)
-- queued together, so the server reads them as one batch
for n = 1, 6 do
    c.commit({ n = n, boom = (n == 3) or nil, nap = (n == 4) or nil })
end
for _ = 1, 200 do if #got >= 7 then break end stage.sleep(5) end
stage.sleep(20)
eq(table.concat(got, ","), "1a,1b,4a,4b,5a,6a,6b", "order kept, failing frames failed alone")

-- a bad document after good ones in the same read: the good ones are answered, then the
-- connection closes (a string committed on a bson socket is sent as raw bytes)
local closed = false
sp.close = function() closed = true end
got = {}
local c2 = broker.join("tcp://127.0.0.1:" .. sp.port .. "?bson", function()
    return function(_, d) if not d.pre then got[#got + 1] = d.n end end
end)
local bad = "\12\0\0\0\x42a\0\1\0\0\0\0"
c2.commit(bundle.bson({ n = 7 }) .. bundle.bson({ n = 8 }) .. bad .. bundle.bson({ n = 9 }))
for _ = 1, 200 do if closed then break end stage.sleep(5) end
check(closed, "the connection with the bad document was closed")
stage.sleep(20)
eq(table.concat(got, ","), "7,8", "frames before the bad one were served")
done()
