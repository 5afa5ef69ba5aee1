---@meta stage
-- LuaLS type stubs for stage's `stage` module. See docs/stage.md.

---@class stage
stage = {}

---@class stage.LoadInfo
---@field position integer search-path position (> 0 = fail-over)
---@field path string file relative to the home
---@field mtime number modification time (seconds since the epoch)
---@field file? string on failure: the file name asked for
---@field id? string on failure: the `+id` part
---@field error? string on failure: why

---Loads a script through the search path (`"file"` or `"file+id"`); reloaded when changed.
---@param name string
---@param f? fun(value: any, info: stage.LoadInfo): ...
---@return any value
---@return stage.LoadInfo info
function stage.load(name, f) end

---As `stage.load`, but loaded once and never reloaded.
---@param name string
---@param f? fun(value: any, info: stage.LoadInfo): ...
---@return any value
---@return stage.LoadInfo info
function stage.require(name, f) end

---Runs `f` only the first time `key` is seen in this process; `f = nil` forgets the key.
---@param key string
---@param f fun(): ...|nil
---@return ...
function stage.once(key, f) end

---Runs `f(...)` after `ms`; again while it returns a number > 0. `stage.addtask(handle, nil)` cancels.
---Negative `ms` runs at once, more than a year (math.huge) waits a year, NaN raises.
---@param ms integer|number delay in milliseconds, or a handle to cancel
---@param f? fun(...): number|nil
---@param ... any
---@return integer|boolean handle, or whether the cancelled task was pending
function stage.addtask(ms, f, ...) end

---Runs `f(...)` soon; calls with the same non-zero key never overlap and keep their order.
---@param key integer|string 0 = no restriction
---@param f fun(...): number|nil
---@param ... any
function stage.submit(key, f, ...) end

---Calls `f` (a function or a script name as in `stage.load`) with `args` then `...`.
---@param f function|string
---@param args? any[]
---@param ... any
---@return ...
function stage.call(f, args, ...) end

---Yields the current callback for `ms` milliseconds. (ext)
---Negative returns at once, more than a year (math.huge) sleeps a year, NaN raises.
---@param ms number
function stage.sleep(ms) end

return stage
