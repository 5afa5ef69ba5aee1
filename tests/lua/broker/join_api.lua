-- broker.ready + broker.join on one node: accept return forms, socket fields, commit,
-- broker.f / signal / submit / close, port.close, the address helpers.
local closed = {}
local seen = {}
local sp = broker.ready("tcp://127.0.0.1:0?bson=2k,4k", function(socket, addr)
    check(type(addr) == "string" and addr:match("^127%.0%.0%.1:%d+$"), "accept addr " .. tostring(addr))
    eq(socket[0], socket.id, "socket[0]")
    eq(socket[1], addr, "socket[1] is the peer")
    check(socket[-1]:match(":%d+$"), "socket[-1] is the local address")
    socket.count = 0                       -- user fields persist for the connection's life
    if #seen == 0 then
        seen[1] = socket.id
        return true                        -- frames go to port.receive
    elseif #seen == 1 then
        seen[2] = socket.id
        return function(s, data)           -- frames go to this function
            s.count = s.count + 1
            return { via = "function", n = s.count, echo = data }
        end
    end
    return false                           -- refused
end)
check(type(sp) == "table", "ready returned " .. tostring(sp))
check(sp.port > 0, "port 0 picks a free port")
sp.receive = function(socket, data)
    socket.count = socket.count + 1
    if data.cmd == "commit" then
        local n = socket.commit({ via = "commit" })
        check(n > 5, "commit returns the bytes queued")
        return nil
    end
    return { via = "receive", n = socket.count, echo = data }
end
sp.close = function(socket) closed[#closed + 1] = socket.id end

local replies = {}
local function client()
    local inbox = {}
    local c = broker.join("tcp://127.0.0.1:" .. sp.port .. "?bson", function(socket, addr)
        return function(s, data) inbox[#inbox + 1] = data end
    end)
    check(type(c) == "table", "join returned " .. tostring(c))
    return c, inbox
end
local function wait(t, n)
    for _ = 1, 200 do
        if #t >= n then return end
        stage.sleep(5)
    end
    fail("waited for " .. n .. " replies, got " .. #t)
end

-- 1: accept returned true -> port.receive
local c1, in1 = client()
check(c1.commit({ cmd = "hi", list = { 1, 2, 3 } }) > 0, "client commit")
wait(in1, 1)
eq(in1[1].via, "receive")
eq(in1[1].echo.list[3], 3)
c1.commit({ cmd = "commit" })
wait(in1, 2)
eq(in1[2].via, "commit")

-- 2: accept returned a function
local c2, in2 = client()
c2.commit({ x = 1 })
c2.commit({ x = 2 })
wait(in2, 2)
eq(in2[2].via, "function")
eq(in2[2].n, 2, "user field persisted")

-- 3: accept returned false -> closed
local c3, in3 = client()
stage.sleep(50)
eq(broker.f(c3.id), nil, "refused connection is gone")

-- broker.f, broker.signal(id, v): deliver as if received (on the server's socket 1)
local s1 = broker.f(seen[1])
eq(s1.id, seen[1], "broker.f returns the socket object")
eq(broker.signal(seen[1], { cmd = "fake" }), 1, "signal to a local id")
wait(in1, 3)
eq(in1[3].echo.cmd, "fake", "signal delivered as if received, reply sent")
-- broker.signal({ids}, v): send to them
eq(broker.signal({ seen[1], seen[2] }, { pushed = true }), 2)
wait(in1, 4)
wait(in2, 3)
eq(in1[4].pushed, true)
eq(broker.signal(987654321, { x = 1 }), 0, "unknown id reaches nobody")

-- broker.submit: keyed by the socket, never overlapping; f(socket, ...) as STAGE
local order = {}
local got_socket
for i = 1, 3 do
    broker.submit(s1, function(s, n)
        got_socket = s
        order[#order + 1] = n stage.sleep(5) order[#order + 1] = -n
    end, i)
end
stage.sleep(100)
eq(table.concat(order, ","), "1,-1,2,-2,3,-3")
check(got_socket == s1, "submit passes the socket first")
local by_id
broker.submit(s1.id, function(s) by_id = s end)
stage.sleep(20)
check(by_id == s1, "submit by id passes the socket too")

-- errors are for people
local ok, err = pcall(c1.commit, print)
check(not ok and err:find("cannot send a function"), tostring(err))
ok, err = pcall(c1.commit, { f = print })
check(not ok and err:find("function value at f"), tostring(err))

-- broker.close: closes, port.close runs
eq(broker.close(seen[1]), 1)
stage.sleep(50)
check(closed[1] == seen[1], "port.close ran for the closed socket")
eq(broker.close({ seen[2], 12345678 }), 1)
stage.sleep(50)
eq(#closed, 2)
-- closing the listener
eq(broker.close(sp.id), 1)
stage.sleep(20)
-- As STAGE, join returns the socket at once and reports the failure through its close
-- callback, with the errno (ECONNREFUSED: the port is closed); socket.errno keeps it.
local refused = {}
local j = broker.join("tcp://127.0.0.1:" .. sp.port .. "?bson")
check(type(j) == "table", "join returns a socket at once: " .. tostring(j))
eq(j.errno, 0, "no error yet")
j.close = function(s, errno) refused[#refused + 1] = { s, errno, s.errno } end
for _ = 1, 200 do if #refused > 0 then break end stage.sleep(5) end
eq(#refused, 1, "the close callback ran once")
check(refused[1][1] == j, "with the socket")
eq(refused[1][2], 111, "and ECONNREFUSED")
eq(refused[1][3], 111, "socket.errno")
eq(j.errno, 111, "socket.errno after the close")
j.close() -- closing a closed socket does nothing
eq(broker.f(j.id), nil)
-- A bad URI still fails at once with a message.
local n, msg = broker.join("tcp://127.0.0.1?bson")
eq(n, -1) check(msg:find("host:port"), msg)

-- address helpers, in STAGE's shapes
eq(broker.ntoa("127.0.0.1:80"), "127.0.0.1:80")
local t = broker.ntoa("[::1]:8080", {})
eq(t.addr, "::1") eq(t.port, 8080) eq(t.family, 10, "AF_INET6") eq(t.scope_id, 0)
local t4 = broker.ntoa("10.1.2.3:7", {})
eq(t4.family, 2, "AF_INET") eq(t4.addr, "10.1.2.3") eq(t4.scope_id, nil)
-- STAGE's raw sockaddr bytes are addresses too (AF_INET, port 80 big-endian, 127.0.0.1).
local raw = string.pack("=I2>I2BBBB", 2, 80, 127, 0, 0, 1) .. string.rep("\0", 8)
eq(broker.ntoa(raw), "127.0.0.1:80", "a raw sockaddr")
eq(broker.aton("localhost:99"), "127.0.0.1:99")
eq(broker.aton("nonsense"), nil)
local list = broker.aton("udp://224.0.0.1:8082", {})
eq(#list, 1, "aton with a table lists the addresses") eq(list[1], "224.0.0.1:8082")
eq(broker.ntoa(list[1], {}).port, 8082)
eq(broker.aton(2, { addr = "192.168.0.9", port = 81 }), "192.168.0.9:81", "aton(AF_INET, parts)")
eq(broker.aton(10, { port = 82 }), "[::]:82", "aton(AF_INET6, parts)")
eq(broker.aton(2, "127.0.0.1:5"), "127.0.0.1:5")
check(not pcall(broker.aton, 3, {}), "an unknown family is an error")
local ifs = broker.ifaddr()
local n_if = 0
for name, addrs in pairs(ifs) do
    n_if = n_if + 1
    check(type(name) == "string" and type(addrs) == "table", "ifaddr maps names to lists")
    for _, a in ipairs(addrs) do
        check(a ~= "127.0.0.1" and a ~= "::1", "no loopback addresses: " .. a)
    end
end
for name in pairs(ifs) do
    local only = broker.ifaddr(name:sub(1, 2))
    check(only[name] ~= nil, "a part of the name selects the interface")
    break
end
eq(next(broker.ifaddr("no-such-interface-x")), nil)
done()
