-- bundle.proxy (edges and plain callbacks), bundle.random(R, function (random) ... end)
local T = { value = 12, level = 1 }
local calls = {}
local p = bundle.proxy(T, {
    value = { 10, 20, 30, function (proxy, edges, k, v)
        calls[#calls + 1] = k .. "=" .. v .. ":" .. table.concat(edges, "/")
        proxy.level = math.floor(edges[#edges] / 10)
    end, 40, function (proxy, edges, k, v)
        calls[#calls + 1] = "high:" .. table.concat(edges, "/")
    end },
    level = function (proxy, old, k, v)
        calls[#calls + 1] = "level " .. tostring(old) .. "->" .. v
    end,
    locked = function () return false end,
})
p.value = 34
eq(T.value, 34)
eq(table.concat(calls, ";"), "value=34:20/30;level 1->3")
eq(T.level, 3)
calls = {}
p.value = 45
eq(table.concat(calls, ";"), "high:40")
p.locked = 1
eq(T.locked, nil, "a callback returning false refuses the assignment")
p.free = "x"
eq(T.free, "x", "keys without a rule are plain assignments")
eq(p.value, 45, "reads go to the table")
eq(p(), T, "proxy() is the table")
local n = 0
for _ in pairs(p) do n = n + 1 end
eq(n, 3)

-- a function at a number key turns table keys into keys; a string names the proxy
local idx = bundle.proxy({}, { function (k, name, t) return k[2] * 100 + k[1] end, "grid" })
idx[{ 10, 2 }] = "x"
eq(idx[210], "x")
eq(idx[{ 10, 2 }], "x")
check(tostring(idx):find("^grid:%["), tostring(idx))
-- rules[""] as a function sees every assignment
local seen = {}
local any = bundle.proxy({}, { [""] = function (p, old, k, v) seen[#seen + 1] = k end })
any.a, any[1] = 1, 2
eq(#seen, 2)

-- STAGE's preload/stage.lua pattern: copy bundle into stage
for k, v in pairs(bundle) do stage[k] = v end
eq(stage.proxy, bundle.proxy)

local R = { seed = 7 }
local draws = bundle.random(R, function (random)
    local t = {}
    for i = 1, 5 do t[i] = random(1, 6) end
    return t
end)
eq(#draws, 5)
for _, d in ipairs(draws) do check(d >= 1 and d <= 6, "in range: " .. d) end
local R2 = { seed = 7 }
local again = {}
for i = 1, 5 do again[i] = bundle.random(R2, 1, 6) end
eq(table.concat(draws, ","), table.concat(again, ","), "the function form uses and updates R")
local f = bundle.random()
check(f >= 0 and f < 1, "bundle.random() is a float in [0, 1)")
done()
