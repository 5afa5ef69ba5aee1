-- broker.encrypt / broker.decrypt with STAGE's rules: a key (AES/CBC/PKCS5Padding) or
-- {["AES/CBC/PKCS5Padding"] = key}; the frame's length carries the high bit.
local msg = { name = "kim", level = 12, list = { 1, 2, 3 } }
local frame = broker.encrypt("secret", msg)
eq(type(frame), "string")
local len = string.unpack("<I4", frame)
check(len & 0x80000000 ~= 0, "the high bit of the length marks the frame encrypted")
eq(len & 0x7FFFFFFF, #frame, "the length counts the whole frame")
eq((#frame - 4) % 16, 0, "whole AES blocks after the length")
check(not frame:find("kim", 1, true), "the payload is not readable")

local back = broker.decrypt("secret", frame)
eq(back.name, "kim"); eq(back.level, 12); eq(back.list[3], 3)
local spec = { ["AES/CBC/PKCS5Padding"] = "secret" }
eq(broker.decrypt(spec, frame).name, "kim", "the cipher table with the same key opens it")
eq(broker.decrypt(spec, broker.encrypt(spec, { x = 1 })).x, 1)
-- A key longer than 32 bytes is cut, a shorter one zero-padded (STAGE): the same cipher.
eq(broker.decrypt("secret\0\0", frame).name, "kim", "zero padding is the same key")

local ok, err = pcall(broker.decrypt, "wrong", frame)
check(not ok and err:find("wrong key", 1, true), "a wrong key is an error: " .. tostring(err))
-- Plain BSON decodes without decryption; anything else comes back as the string.
eq(broker.decrypt("secret", bundle.bson({ p = 1 })).p, 1, "a plain document")
eq(broker.decrypt("secret", "hello"), "hello", "not BSON: the string itself")
ok, err = pcall(broker.encrypt, { ["DES/CBC/PKCS5Padding"] = "k" }, msg)
check(not ok and err:find('unsupported cipher "DES/CBC/PKCS5Padding"', 1, true), tostring(err))

-- socket.crypto (STAGE): set on a port it is inherited by the sockets the port accepts; set
-- on a socket, tables go out as encrypted frames and encrypted frames are opened.
local function wait_for(f)
    for _ = 1, 200 do if f() then return end stage.sleep(5) end
    fail("timed out")
end
local key = "k-" .. string.rep("x", 40) -- longer than 32 bytes: cut, as STAGE
local sp = broker.ready("tcp://127.0.0.1:0?packet", function(s)
    check(s.crypto == true, "an accepted socket inherits port.crypto")
    return function(s2, d) return { echo = d.v, crypto = s2.crypto } end
end)
eq(sp.crypto, false, "no cipher on the port yet")
sp.crypto = key
eq(sp.crypto, true, "socket.crypto reads as a boolean")
local got = {}
local c = broker.join("tcp://127.0.0.1:" .. sp.port .. "?packet", function()
    return function(_, d) got[#got + 1] = d end
end)
c.crypto = { ["AES/CBC/PKCS5Padding"] = key }
c.commit({ v = "sealed" })
wait_for(function() return #got > 0 end)
eq(got[1].echo, "sealed") eq(got[1].crypto, true)

-- On the wire: what broker.encrypt makes; `crypto = nil` switches it off.
local raw = {}
local rp = broker.ready("tcp://127.0.0.1:0?raw", function()
    return function(_, d) raw[#raw + 1] = d end
end)
local rc = broker.join("tcp://127.0.0.1:" .. rp.port .. "?packet")
rc.crypto = key
rc.commit({ v = "hidden" })
local function frame()
    local b = table.concat(raw)
    return #b >= 4 and #b >= (string.unpack("<I4", b) & 0x7FFFFFFF) and b or nil
end
wait_for(frame)
local wire = frame()
check(not wire:find("hidden", 1, true), "the payload is not readable on the wire")
eq(broker.decrypt(key, wire).v, "hidden", "a socket's frame is broker.encrypt's frame")
rc.crypto = nil
eq(rc.crypto, false)
raw = {}
rc.commit({ v = "plain" })
wait_for(frame)
check(frame():find("plain", 1, true), "crypto = nil sends plain documents")

-- A client without the key: the server cannot open the frame and closes the connection.
local closed_errno
local bad = broker.join("tcp://127.0.0.1:" .. sp.port .. "?packet")
bad.close = function(_, errno) closed_errno = errno end
bad.crypto = "another key"
bad.commit({ v = "x" })
wait_for(function() return closed_errno ~= nil end)

ok, err = pcall(function() c.crypto = { ["DES/ECB"] = "k" } end)
check(not ok and err:find("unsupported cipher", 1, true), tostring(err))
ok, err = pcall(function() c.crypto = 42 end)
check(not ok and err:find("expected a key", 1, true), tostring(err))
ok, err = pcall(function() c.errno = 1 end)
check(not ok and err:find("read-only", 1, true), tostring(err))
done()
