---@meta stage_index
-- LuaLS shapes of the answers of the built-in `index` stage (docs/stages.md, "index").
-- The stage is reached with messages, not functions:
--   stage.signal("rank:s?index=on_set", { KR0001 = { i = 10, v = "TEST1" } })
--   local r = stage.request("rank:g?index", 1000, "KR0001")   -- r.KR0001.I[1].d = its rank

---What `set` takes per id: `i` scores of the command's tier, `I` scores per tier, `v` the value.
---@class stage.IndexSet
---@field i? integer|string|(integer|string)[]
---@field I? table<integer, integer|string|(integer|string)[]>
---@field v? any

---One score of an id in `get` (with `g?table/tier`): the score and its rank.
---@class stage.IndexScore
---@field i integer|string score
---@field d integer rank (1 = first)

---What `get` answers per id (an empty table for an unknown id).
---@class stage.IndexGet
---@field v? any the value
---@field I? stage.IndexScore[]|table<integer, (integer|string)[]> scores of the tier (all tiers with `g?table/`)

---One entry of `range` / `forEach`, whose answer is `table<integer, stage.IndexEntry>` keyed by rank:
---   stage.waitfor("top", function(r) for rank, e in pairs(r) do print(rank, e.k, e.i) end end)
---   stage.signal("rank:f?index=top", { 1, 10 })
---@class stage.IndexEntry
---@field k string the id
---@field v? any its value
---@field i integer|string the score
---@field d integer the rank

---@alias stage.IndexRanking table<integer, stage.IndexEntry>
