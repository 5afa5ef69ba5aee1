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
done()
