-- Names STAGE scripts written for Lua 5.1/5.3 or LuaJIT expect and Lua 5.4 lacks:
-- `unpack`, `loadstring`, `math.pow`, and the `bit32` and `bit` (LuaJIT) libraries over
-- 32-bit integers. Installed in every state before the preload scripts; switch them off
-- with `"%compat": false` in the Lua engine section of conf/stage.json.
-- Not provided (no Lua 5.4 equivalent): LuaJIT's `ffi`, `setfenv`/`getfenv`, `jit`.

unpack = unpack or table.unpack
loadstring = loadstring or load
math.pow = math.pow or function (x, y) return x ^ y end

local MASK = 0xFFFFFFFF
local function u32(x)
    if math.type(x) ~= "integer" then
        x = math.tointeger(x) or error("bit32: expected an integer, got " .. tostring(x), 3)
    end
    return x & MASK
end
local function fold(op, init)
    return function (...)
        local r = init
        for i = 1, select("#", ...) do r = op(r, u32((select(i, ...)))) end
        return r
    end
end

local b32 = {}
b32.band = fold(function (a, b) return a & b end, MASK)
b32.bor = fold(function (a, b) return a | b end, 0)
b32.bxor = fold(function (a, b) return a ~ b end, 0)
function b32.bnot(x) return ~u32(x) & MASK end
function b32.btest(...) return b32.band(...) ~= 0 end
function b32.lshift(x, n)
    if n >= 32 or n <= -32 then return 0 end
    if n < 0 then return u32(x) >> -n end
    return (u32(x) << n) & MASK
end
function b32.rshift(x, n) return b32.lshift(x, -n) end
function b32.arshift(x, n)
    x = u32(x)
    if n <= 0 then return b32.lshift(x, -n) end
    if x & 0x80000000 == 0 then return b32.rshift(x, n) end
    if n >= 32 then return MASK end
    return ((x >> n) | ~(MASK >> n)) & MASK
end
function b32.lrotate(x, n)
    x, n = u32(x), n % 32
    return ((x << n) | (x >> (32 - n))) & MASK
end
function b32.rrotate(x, n) return b32.lrotate(x, -n) end
function b32.extract(x, field, width)
    width = width or 1
    return (u32(x) >> field) & ((1 << width) - 1)
end
function b32.replace(x, v, field, width)
    width = width or 1
    local m = ((1 << width) - 1) << field
    return (u32(x) & ~m | ((u32(v) << field) & m)) & MASK
end
bit32 = bit32 or b32

-- LuaJIT's `bit`: the same operations on signed 32-bit results.
local function signed(x) x = x & MASK; if x >= 0x80000000 then return x - 0x100000000 end return x end
local function wrap(f) return function (...) return signed(f(...)) end end
bit = bit or {
    band = wrap(b32.band), bor = wrap(b32.bor), bxor = wrap(b32.bxor), bnot = wrap(b32.bnot),
    lshift = wrap(b32.lshift), rshift = wrap(b32.rshift), arshift = wrap(b32.arshift),
    rol = wrap(b32.lrotate), ror = wrap(b32.rrotate),
    tobit = function (x) return signed(u32(x)) end,
    tohex = function (x, n) return string.format("%0" .. (n or 8) .. "x", u32(x)) end,
    bswap = function (x)
        x = u32(x)
        return signed(((x & 0xFF) << 24) | ((x & 0xFF00) << 8) | ((x >> 8) & 0xFF00) | (x >> 24))
    end,
}
