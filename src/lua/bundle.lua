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

-- bundle.proxy(t, rules [, index]): a view of `t` whose assignments run the rules:
-- rules[k] (rules["#"] for number keys, rules["*"] for other string keys, rules[""] for
-- any key) is `function (proxy, old, k, v)` or edges `{V1, V2, ..., F1, N1, ..., F2}`.
-- A callback returning false refuses the assignment; an assignment made by a key's own
-- callback is applied directly. As STAGE, a function at a number key of `rules` (or of
-- rules[""]) turns table keys into keys (`index(k, name, t)`, nil = ignore the access),
-- and a string there names the proxy.
function bundle.proxy(t, rules, index)
    if type(t) ~= "table" then
        error("bundle.proxy: expected a table to watch, got a " .. type(t), 2)
    end
    local handlers, name = {}, nil
    local function add(list, nested)
        for k, v in pairs(list) do
            if math_type(k) then
                if type(v) == "function" then index = index or v
                elseif type(v) == "string" then name = v end
            elseif k == "" and not nested then
                if type(v) == "table" then add(v, true)
                elseif type(v) == "function" then handlers[""] = v
                elseif type(v) == "string" then name = v end
            elseif type(k) == "string" and (type(v) == "function" or (type(v) == "table" and not nested)) then
                handlers[k] = v
            end
        end
    end
    if type(rules) == "function" then handlers[""] = rules
    elseif type(rules) == "string" then name = rules
    elseif type(rules) == "table" then add(rules, false)
    elseif rules ~= nil then
        error("bundle.proxy: expected a table of rules, a function or a name, got a " .. type(rules), 2)
    end
    name = name or "proxy"
    local busy = {}
    local proxy = {}
    local function key_of(k)
        if index and (type(k) == "table" or type(k) == "userdata") then
            return index(k, name, t)
        end
        return k
    end
    local function rule_of(k)
        if math_type(k) then return handlers["#"] or handlers[""] end
        if type(k) == "string" then return handlers[k] or handlers["*"] or handlers[""] end
        return handlers[""]
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
        __tostring = function () return (name:match("^[^:]*")) .. ":[" .. tostring(t) .. "]" end,
    })
    return proxy
end

-- bundle.viewof: rows of fixed-size records in a file (or in another view), read and
-- changed in place. STAGE maps the file with mmap; here the region is read into memory,
-- changes are kept until `commit()` writes them back (or `rollback()` drops them).
local LETTERS = {
    b = "i1", B = "I1", h = "i2", H = "I2", i = "i4", I = "I4", l = "i8", L = "I8", f = "f", d = "d",
}

-- One field: { pack = "<i4", n = count (array when > 1), size = bytes, str = "c"|"s"|nil }
local function field(letter, n, item)
    if letter == "c" or letter == "s" then
        if not n or n < 1 then error("bundle.viewof: '" .. item .. "' needs a length (c10, s16)", 5) end
        return { pack = "<c" .. n, n = 1, size = n, str = letter }
    end
    local fmt = LETTERS[letter]
    if not fmt then
        error("bundle.viewof: unknown field '" .. item .. "' (expected c s b B h H i I l L f d, with a count)", 5)
    end
    n = n or 1
    return { pack = "<" .. fmt, n = n, size = string.packsize("<" .. fmt) * n }
end

-- { "c10 i", 4 } → fields; a number N is an array of N uint8 (STAGE)
local function parse_struct(spec, fields)
    fields = fields or {}
    if math_type(spec) == "integer" then
        fields[#fields + 1] = field("B", spec, tostring(spec))
    elseif type(spec) == "string" then
        for item in spec:gmatch("%S+") do
            local letter, n = item:match("^(%a)(%d*)$")
            fields[#fields + 1] = field(letter or item, tonumber(n), item)
        end
    elseif type(spec) == "table" then
        for _, s in ipairs(spec) do parse_struct(s, fields) end
    else
        error("bundle.viewof: expected a struct description, got a " .. type(spec), 4)
    end
    return fields
end

local View = {}
View.__index = function (self, k) return rawget(self, "_impl")(k) end
View.__newindex = function (self, k, v) rawget(self, "_set")(k, v) end
View.__len = function (self) return rawget(self, "_impl")("count") end
View.__name = "viewof"

-- The bytes [start, start + len) of a file or a buffer; with `create`, a file is created
-- or extended to hold them (STAGE opens with O_CREAT when rows are given).
local function region(src, start, len, create)
    if type(src) == "string" then
        local f = io.open(src, "rb")
        if not f and create then
            f = io.open(src, "wb")
            if f then f:close() end
            f = io.open(src, "rb")
        end
        if not f then error("bundle.viewof: cannot open " .. src, 4) end
        local size = f:seek("end")
        if len == nil then len = math.max(0, size - start) end
        f:seek("set", start)
        local data = f:read(len) or ""
        f:close()
        if #data < len and create then
            local w = assert(io.open(src, "r+b"))
            w:seek("set", start + #data)
            w:write(string.rep("\0", len - #data))
            w:close()
        elseif #data < len then
            error("bundle.viewof: " .. src .. " has " .. size .. " bytes, fewer than " .. start + len, 4)
        end
        return data .. string.rep("\0", len - #data), len
    end
    local bytes = src._bytes()
    if len == nil then len = math.max(0, #bytes - start) end
    if start + len > #bytes then
        error("bundle.viewof: no buffer available (" .. start .. " + " .. len .. " > " .. #bytes .. ")", 4)
    end
    return bytes:sub(start + 1, start + len), len
end

function bundle.viewof(format, a, b, f)
    local start, rows
    if type(a) == "function" then f = a
    elseif type(b) == "function" then rows, f = a, b
    elseif b == nil then rows = a
    else start, rows = a, b end
    local src, spec, as_table
    if type(format) == "string" or getmetatable(format) == View then
        src = format
    elseif type(format) == "table" then
        src, spec = format[1], format[2]
        as_table = type(spec) == "table" or type(spec) == "string"
    else
        error("bundle.viewof: expected a file name, a buffer or {source, struct}, got a " .. type(format), 2)
    end
    if type(src) ~= "string" and getmetatable(src) ~= View then
        error("bundle.viewof: the source must be a file name or a buffer", 2)
    end
    local fields = parse_struct(spec or 1)
    local size = 0
    for _, fd in ipairs(fields) do size = size + fd.size end
    start = start or 0
    if math_type(start) ~= "integer" or start < 0 then error("bundle.viewof: start must be a byte offset >= 0", 2) end
    if rows ~= nil and (math_type(rows) ~= "integer" or rows < 0) then
        error("bundle.viewof: rows must be an integer >= 0", 2)
    end
    local data, len = region(src, start, rows and rows * size or nil, rows ~= nil)
    if len == 0 then error("bundle.viewof: the source is empty", 2) end
    local count = len // size
    local saved, dirty, mode = {}, {}, "rw"
    local buf = {}
    local function row_bytes(i)
        return dirty[i] or saved[i] or data:sub((i - 1) * size + 1, i * size)
    end
    local function decode(i)
        local bytes, out, pos = row_bytes(i), {}, 1
        for k, fd in ipairs(fields) do
            local v
            if fd.str then
                v = string.unpack(fd.pack, bytes, pos)
                if fd.str == "s" then v = v:match("^[^%z]*") end
            elseif fd.n == 1 then
                v = string.unpack(fd.pack, bytes, pos)
            else
                v = {}
                local step = fd.size // fd.n
                for j = 1, fd.n do v[j] = string.unpack(fd.pack, bytes, pos + (j - 1) * step) end
            end
            out[k] = v
            pos = pos + fd.size
        end
        if not as_table and #fields == 1 then return out[1] end
        return out
    end
    -- A row from `v`, over the current bytes: fields (and array elements) left nil keep theirs.
    local function encode(i, v)
        -- without a struct table, a one-field row is the field's value itself
        if not as_table and #fields == 1 then v = { v } end
        if type(v) ~= "table" then error("bundle.viewof: a row is a table of " .. #fields .. " values", 4) end
        local cur, parts, pos = row_bytes(i), {}, 1
        for k, fd in ipairs(fields) do
            local x, old = v[k], cur:sub(pos, pos + fd.size - 1)
            if x == nil then
                parts[k] = old
            elseif fd.str then
                x = tostring(x):sub(1, fd.size - (fd.str == "s" and 1 or 0))
                parts[k] = x .. string.rep("\0", fd.size - #x)
            elseif fd.n == 1 then
                parts[k] = string.pack(fd.pack, x)
            else
                if type(x) ~= "table" then x = { x } end
                local step, el = fd.size // fd.n, {}
                for j = 1, fd.n do
                    el[j] = x[j] ~= nil and string.pack(fd.pack, x[j]) or old:sub((j - 1) * step + 1, j * step)
                end
                parts[k] = table.concat(el)
            end
            pos = pos + fd.size
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
        for i, bytes in pairs(dirty) do saved[i] = bytes end
        dirty = {}
        return true
    end
    function buf.rollback() dirty = {} end
    function buf.scope(m, fn)
        if type(m) == "function" then m, fn = "rw", m end
        if m ~= "rw" and m ~= "ro" then error("buffer.scope: mode is \"rw\" or \"ro\"", 2) end
        local outer = mode
        mode = m
        local r = table.pack(pcall(fn, buf))
        mode = outer
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
        -- bytes written by a view over this one: split over the rows they touch
        local all = buf._bytes()
        all = all:sub(1, off) .. bytes .. all:sub(off + #bytes + 1)
        for i = off // size + 1, (off + #bytes - 1) // size + 1 do
            if i >= 1 and i <= count then dirty[i] = all:sub((i - 1) * size + 1, i * size) end
        end
    end
    setmetatable(buf, View)
    rawset(buf, "_impl", function (k)
        if k == "size" then return size end
        if k == "count" then return count end
        if math_type(k) and k >= 1 and k <= count then return decode(k) end
        return nil
    end)
    rawset(buf, "_set", function (k, v)
        if not math_type(k) or k < 1 or k > count then
            error("bundle.viewof: row " .. tostring(k) .. " is outside 1.." .. count, 3)
        end
        if mode == "ro" then error("bundle.viewof: the buffer is read-only in this scope", 3) end
        dirty[k] = encode(k, v)
    end)
    if f then
        return buf.scope("rw", f)
    end
    return buf
end
