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
