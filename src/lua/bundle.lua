-- bundle.proxy and the function form of bundle.random, written in Lua over the Rust
-- parts. Called once per state with the bundle table and the raw random function.
local bundle, raw_random = ...

local type, rawget, rawset, pairs, ipairs, select = type, rawget, rawset, pairs, ipairs, select
local math_type = math.type

-- bundle.random(R, s, e) | bundle.random(R, function (random) ... end) | bundle.random()
local own = {}
function bundle.random(R, a, b)
    if type(R) ~= "table" then
        return raw_random(own, R, a)
    end
    if type(a) == "function" then
        return (a(function (...)
            return raw_random(R, ...)
        end))
    end
    if a == nil then return raw_random(R) end
    return raw_random(R, a, b)
end

-- Whether `v` has reached edge `e` (edges are numbers, strings or booleans).
local function reached(v, e)
    local te = type(e)
    if te == "number" then
        return type(v) == "number" and v >= e
    end
    return v == e
end

-- The edges of a rule `{V1, V2, F1, N1, F2}` crossed by a change from `old` to `new`:
-- each function gets the edges of its group that `new` reached and `old` had not.
-- Returns false when a callback returned false (the assignment is refused).
local function run_edges(proxy, rule, old, k, new)
    local crossed, started = {}, old == nil
    local pending = nil
    for i = 1, #rule do
        local e = rule[i]
        if type(e) == "function" then
            if #crossed > 0 or i == 1 then
                if e(proxy, crossed, k, new) == false then return false end
            end
            crossed, started, pending = {}, old == nil, nil
        elseif old == nil or type(old) == type(e) then
            if not started then
                if not reached(old, e) then started = true end
            end
            if started and reached(new, e) then
                crossed[#crossed + 1] = e
                pending = i
            end
        end
    end
    if pending and #crossed > 0 then
        for i = pending + 1, #rule do
            if type(rule[i]) == "function" then
                return rule[i](proxy, crossed, k, new) ~= false
            end
        end
    end
    return true
end

-- bundle.proxy(t, rules [, index]): a view of `t` whose assignments run `rules`:
-- rules[k] (rules["#"] for number keys, rules["*"] for other string keys, rules[""] for
-- any key) is `function (proxy, old, k, v)` or edges `{V1, V2, ..., F1, N1, ..., F2}`.
-- A callback returning false refuses the assignment; an assignment made by a key's own
-- callback is applied directly. `index(k, "proxy", t)` turns table keys into keys.
function bundle.proxy(t, rules, index)
    if type(t) ~= "table" then
        error("bundle.proxy: expected a table to watch, got a " .. type(t), 2)
    end
    if type(rules) == "function" then rules = { [""] = rules } end
    if type(rules) ~= "table" then
        error("bundle.proxy: expected a table of rules or a function, got a " .. type(rules), 2)
    end
    local busy = {}
    local proxy = {}
    local function key_of(k)
        if index and (type(k) == "table" or type(k) == "userdata") then
            return index(k, "proxy", t)
        end
        return k
    end
    local function rule_of(k)
        if math_type(k) then return rules["#"] or rules[""] end
        if type(k) == "string" then return rules[k] or rules["*"] or rules[""] end
        return rules[""]
    end
    setmetatable(proxy, {
        __index = function (_, k)
            k = key_of(k)
            if k == nil then return nil end
            return t[k]
        end,
        __newindex = function (_, k, v)
            k = key_of(k)
            if k == nil then return end
            local rule = rule_of(k)
            if rule ~= nil and not busy[rule] then
                local old = t[k]
                busy[rule] = true
                local ok, r = pcall(function ()
                    if type(rule) == "function" then return rule(proxy, old, k, v) ~= false end
                    return run_edges(proxy, rule, old, k, v)
                end)
                busy[rule] = nil
                if not ok then error(r, 2) end
                if not r then return end
            end
            t[k] = v
        end,
        __pairs = function () return pairs(t) end,
        __ipairs = function () return ipairs(t) end,
        __len = function () return #t end,
        __call = function (self, f)
            if f ~= nil then
                if type(f) ~= "function" then error("proxy(f): expected a function", 2) end
                f(self)
            end
            return t
        end,
        __tostring = function () return "proxy:[" .. tostring(t) .. "]" end,
    })
    return proxy
end

-- bundle.viewof: rows of fixed-size records in a file (or in another view), read and
-- changed in place. STAGE maps the file with mmap; here the region is read into memory,
-- changes are kept until `commit()` writes them back (or `rollback()` drops them).
local LETTERS = {
    b = "i1", B = "I1", h = "i2", H = "I2", i = "i4", I = "I4", l = "i8", f = "f", d = "d",
}

-- "c10 i" / { "c10", "i" } / 14 (fourteen int8) → list of { pack = "<fmt", size = n, z = bool }
local function parse_struct(spec, fields)
    fields = fields or {}
    local t = type(spec)
    if math_type(spec) == "integer" then
        for _ = 1, spec do fields[#fields + 1] = { pack = "<i1", size = 1 } end
    elseif t == "string" then
        for item in spec:gmatch("%S+") do
            local letter, n = item:match("^(%a)(%d*)$")
            n = tonumber(n)
            if letter == "c" or letter == "s" then
                if not n or n < 1 then error("bundle.viewof: '" .. item .. "' needs a length (c10, s16)", 4) end
                fields[#fields + 1] = { pack = "<c" .. n, size = n, z = letter == "s" }
            elseif letter and LETTERS[letter] then
                local fmt = "<" .. LETTERS[letter]
                for _ = 1, n or 1 do fields[#fields + 1] = { pack = fmt, size = string.packsize(fmt) } end
            else
                error("bundle.viewof: unknown field '" .. item .. "' (expected c s b B h H i I l f d with a count)", 4)
            end
        end
    elseif t == "table" then
        for _, s in ipairs(spec) do parse_struct(s, fields) end
    else
        error("bundle.viewof: expected a struct description, got a " .. t, 4)
    end
    return fields
end

local View = {}
View.__index = function (self, k) return rawget(self, "_impl")(k) end
View.__newindex = function (self, k, v) rawget(self, "_set")(k, v) end
View.__len = function (self) return rawget(self, "_impl")("count") end
View.__name = "viewof"

local function region(src, start, len)
    if type(src) == "string" then
        local f, err = io.open(src, "rb")
        if not f then error("bundle.viewof: cannot open " .. src .. ": " .. tostring(err), 4) end
        local size = f:seek("end")
        if len == nil then len = math.max(0, size - start) end
        f:seek("set", start)
        local data = f:read(len) or ""
        f:close()
        return data .. string.rep("\0", len - #data), len
    end
    local bytes = src._bytes()
    if len == nil then len = math.max(0, #bytes - start) end
    local data = bytes:sub(start + 1, start + len)
    return data .. string.rep("\0", len - #data), len
end

function bundle.viewof(format, start, rows, f)
    if type(start) == "function" then start, rows, f = nil, nil, start end
    if type(rows) == "function" then rows, f = nil, rows end
    local src, spec
    if type(format) == "string" then
        src, spec = format, 1
    elseif type(format) == "table" and getmetatable(format) == View then
        src, spec = format, 1
    elseif type(format) == "table" then
        src, spec = format[1], format[2] or 1
    else
        error("bundle.viewof: expected a file name, a buffer or {source, struct}, got a " .. type(format), 2)
    end
    if type(src) ~= "string" and getmetatable(src) ~= View then
        error("bundle.viewof: the source must be a file name or a buffer", 2)
    end
    local fields = parse_struct(spec)
    local size = 0
    for _, fd in ipairs(fields) do size = size + fd.size end
    if size == 0 then error("bundle.viewof: the struct has no fields", 2) end
    start = start or 0
    if math_type(start) ~= "integer" or start < 0 then error("bundle.viewof: start must be a byte offset >= 0", 2) end
    local data, len = region(src, start, rows and rows * size or nil)
    local count = len // size
    local rowdata, dirty, mode = {}, {}, "rw"
    local buf = {}
    local function row_bytes(i)
        return dirty[i] or rowdata[i] or data:sub((i - 1) * size + 1, i * size)
    end
    local function decode(i)
        local bytes, out, pos = row_bytes(i), {}, 1
        for k, fd in ipairs(fields) do
            local v = string.unpack(fd.pack, bytes, pos)
            if fd.z then v = v:match("^[^%z]*") end
            out[k] = v
            pos = pos + fd.size
        end
        if #fields == 1 then return out[1] end
        return out
    end
    local function encode(v)
        if #fields == 1 and type(v) ~= "table" then v = { v } end
        if type(v) ~= "table" then error("bundle.viewof: a row is a table of " .. #fields .. " values", 3) end
        local parts = {}
        for k, fd in ipairs(fields) do
            local x = v[k]
            if fd.size and fd.pack:sub(2, 2) == "c" then
                x = tostring(x or "")
                local n = fd.size - (fd.z and 1 or 0)
                x = x:sub(1, n)
                x = x .. string.rep("\0", fd.size - #x)
            else
                x = x or 0
            end
            parts[k] = string.pack(fd.pack, x)
        end
        return table.concat(parts)
    end
    function buf.commit()
        if next(dirty) == nil then return true end
        if type(src) == "string" then
            local fh, err = io.open(src, "r+b")
            if not fh then error("bundle.viewof: cannot write " .. src .. ": " .. tostring(err), 2) end
            for i, bytes in pairs(dirty) do
                fh:seek("set", start + (i - 1) * size)
                fh:write(bytes)
            end
            fh:close()
        else
            for i, bytes in pairs(dirty) do src._write(start + (i - 1) * size, bytes) end
        end
        for i, bytes in pairs(dirty) do rowdata[i] = bytes end
        dirty = {}
        return true
    end
    function buf.rollback() dirty = {} end
    function buf.scope(m, fn)
        if type(m) == "function" then m, fn = "rw", m end
        if m ~= "rw" and m ~= "ro" then error("buffer.scope: mode is \"rw\" or \"ro\"", 2) end
        local saved = mode
        mode = m
        local r = table.pack(pcall(fn, buf))
        mode = saved
        if not r[1] then buf.rollback() error(r[2], 2) end
        if m == "rw" then buf.commit() end
        return table.unpack(r, 2, r.n)
    end
    function buf._bytes()
        local parts = {}
        for i = 1, count do parts[i] = row_bytes(i) end
        return table.concat(parts)
    end
    function buf._write(off, bytes)
        -- bytes from a view over this one: split over the rows they touch
        local first = off // size + 1
        local all = buf._bytes()
        all = all:sub(1, off) .. bytes .. all:sub(off + #bytes + 1)
        for i = first, (off + #bytes - 1) // size + 1 do
            if i >= 1 and i <= count then dirty[i] = all:sub((i - 1) * size + 1, i * size) end
        end
    end
    setmetatable(buf, View)
    rawset(buf, "_impl", function (k)
        if k == "size" then return size end
        if k == "count" then return count end
        if math_type(k) then
            if k < 1 or k > count then return nil end
            return decode(k)
        end
        return nil
    end)
    rawset(buf, "_set", function (k, v)
        if not math_type(k) or k < 1 or k > count then
            error("bundle.viewof: row " .. tostring(k) .. " is outside 1.." .. count, 3)
        end
        if mode == "ro" then error("bundle.viewof: the buffer is read-only in this scope", 3) end
        dirty[k] = encode(v)
    end)
    if f then
        return buf.scope("rw", f)
    end
    return buf
end
