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
---With a function: `f(random)` where `random([lo [, hi]])` draws from `state`; returns f's result.
---```lua
---local hand = bundle.random(R, function (random) return { random(1, 52), random(1, 52) } end)
---```
---@param state? table
---@param lo? integer|fun(random: fun(lo?: integer, hi?: integer): number): any
---@param hi? integer
---@return any
function bundle.random(state, lo, hi) end

---Rows of fixed-size records of a file (or a buffer): `format` is a file name, a buffer or
---`{source, {"c10 i"}}`; `viewof(format, rows)` or `viewof(format, start, rows)` (creates the
---file); rows are `buffer[1..count]`; `commit()`, `rollback()`, `scope(mode, f)`, `size`,
---`count`. With `f`, returns `buffer.scope("rw", f)`.
---```lua
---local b = bundle.viewof({ "example.mmap", { "c10 i" } }, 10); b[2] = { "HELLO", 100 }; b.commit()
---```
---@param format string|table
---@param start? integer|function rows, or the byte offset when `rows` follows
---@param rows? integer|function
---@param f? fun(buffer: table): ...
---@return any
function bundle.viewof(format, start, rows, f) end

---A view of `t` whose assignments run `rules` (STAGE): `rules[k]` (`"#"` number keys, `"*"`
---other string keys, `""` any key) is `function (proxy, old, k, v)` or edges
---`{V1, V2, F1, N1, F2}` calling `F(proxy, edges_reached, k, v)`; `false` refuses the change.
---```lua
---local p = bundle.proxy({ exp = 0 }, { exp = { 100, 200, function (p, e, k, v) print("up", #e) end } })
---p.exp = 250   -- up 2
---```
---@param t table
---@param rules table|fun(proxy: table, old: any, k: any, v: any): boolean?
---@param index? fun(k: any, where: string, t: table): any
---@return table proxy
function bundle.proxy(t, rules, index) end

return bundle
