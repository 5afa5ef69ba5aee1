--! {"#startup": [["lua+stage"], ["index.so+rank"]], "#limits": {"time": 20000}}
-- The index stage ranks 100,000 scores as a sort does: every rank of forEach, get's rank of
-- sampled ids, range by score and by id +- delta, after a tenth of the ids changed score.
local N = 100000
math.randomseed(7)
-- unique scores (a shuffled range, with negatives), so the expected order is the sort's
local score = {}
for i = 1, N do score[i] = (i - 40000) * 3 end
for i = N, 2, -1 do
    local j = math.random(i)
    score[i], score[j] = score[j], score[i]
end
local t0 = process.tick
-- set in messages of 1000 ids, unanswered ("s?big" without "=cb"); a full queue of the
-- stage (signal returns 0) is waited out
local function set(batch)
    while stage.signal("rank:s?big", batch) ~= 1 do stage.sleep(5) end
end
for b = 0, N // 1000 - 1 do
    local batch = {}
    for i = b * 1000 + 1, b * 1000 + 1000 do batch["u" .. i] = { i = score[i], v = i } end
    set(batch)
end
-- a tenth of the ids move (to scores nobody has)
for b = 0, 9 do
    local batch = {}
    for i = b * 1000 + 1, b * 1000 + 1000, 1 do
        local id = i * 10
        score[id] = score[id] * 2 + 1
        batch["u" .. id] = { i = score[id] }
    end
    set(batch)
end
-- messages to the stage stay in order: this answer comes after every set
eq(stage.request("rank:t?big", 10000), N, "every id ranked once")
local set_time = process.tick - t0
stage.sleep(0)

-- the expected ranking: the scores sorted (unique, so a plain numeric sort), largest first
local sorted, who = {}, {}
for i = 1, N do sorted[i] = score[i]; who[score[i]] = i end
table.sort(sorted)
local order, rank_of = {}, {}
for r = 1, N do
    local i = who[sorted[N + 1 - r]]
    order[r], rank_of[i] = i, r
end
stage.sleep(0)

local all = stage.request("rank:f?big", 10000, { 1, N })
for r = 1, N do
    local e = all[r]
    if e == nil or e.k ~= "u" .. order[r] or e.i ~= score[order[r]] or e.d ~= r then
        fail(string.format("rank %d: expected u%d (%d), got %s", r, order[r], score[order[r]],
            e and (e.k .. " (" .. tostring(e.i) .. ", d=" .. tostring(e.d) .. ")") or "nothing"))
    end
    if r % 10000 == 0 then stage.sleep(0) end
end
eq(all[N + 1], nil)
eq(all[1].v, order[1], "values come along")

-- get: the rank of sampled ids
local ids = {}
for k = 1, 200 do ids[k] = "u" .. math.random(N) end
local g = stage.request("rank:g?big", 10000, ids)
for _, id in ipairs(ids) do
    local i = tonumber(id:sub(2))
    eq(g[id].I[1].d, rank_of[i], "rank of " .. id)
    eq(g[id].I[1].i, score[i])
end

-- range by score: from the first score <= s, 5 entries
for _ = 1, 50 do
    local r = math.random(N - 10)
    local s = score[order[r]] + 1          -- between two scores (all are 3 apart or odd)
    local rg = stage.request("rank:r?big", 10000, { s, 5 })
    -- the entry above order[r] has a larger score, unless it is exactly s
    local first = r
    if r > 1 and score[order[r - 1]] <= s then first = r - 1 end
    for k = first, first + 4 do eq(rg[k].k, "u" .. order[k], "range by score at " .. k) end
    eq(rg[first + 5], nil)
end
-- range by id: delta ranks above it, count entries
for _ = 1, 50 do
    local r = math.random(N)
    local rg = stage.request("rank:r?big", 10000, { "u" .. order[r], 3, 7 })
    local from = math.max(1, r - 3)
    for k = from, math.min(N, from + 6) do eq(rg[k].k, "u" .. order[k], "range by id at " .. k) end
    eq(rg[from - 1], nil)
end
logger.info(string.format("index: 110k sets in %.2f s, whole check in %.2f s", set_time, process.tick - t0))
done()
