---@meta bundle
-- LuaLS type stubs for stage's `bundle` module. See docs/bundle.md.

---@class bundle
---@field null lightuserdata JSON/BSON null inside tables
bundle = {}

---JSON text or a `*.json` file name → value; a table → JSON text.
---@param v string|table
---@return any
function bundle.json(v) end

---BSON bytes → table, table → BSON bytes (null → nil, dates ↔ integer seconds, `name@X` type hints);
---`"stage"` chooses STAGE's arrays (0-based, `{"#1": ...}`).
---@param v string|table
---@param mapping? "stage"|"standard"
---@return table|string
function bundle.bson(v, mapping) end

---WELL512a with its state in `state`: float in [0,1), integer in [1,lo], or in [lo,hi].
---@param state table
---@param lo? integer
---@param hi? integer
---@return number
function bundle.random(state, lo, hi) end

return bundle
