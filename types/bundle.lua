---@meta bundle
-- LuaLS type stubs for stage's `bundle` module. See docs/bundle.md.

---@class bundle
---@field null lightuserdata JSON/BSON null inside tables
bundle = {}

---JSON text or a `*.json` file name → value; a table → JSON text.
---@param v string|table
---@return any
function bundle.json(v) end

---WELL512a with its state in `state`: float in [0,1), integer in [1,lo], or in [lo,hi].
---@param state table
---@param lo? integer
---@param hi? integer
---@return number
function bundle.random(state, lo, hi) end

return bundle
