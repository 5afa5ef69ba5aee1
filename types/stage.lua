---@meta stage
-- LuaLS type stubs for stage's `stage` module. See docs/stage.md.

---@class stage
stage = {}

---@class stage.LoadInfo
---@field position integer search-path position (> 0 = fail-over)
---@field path string file relative to the home
---@field mtime integer modification time (seconds since the epoch)
---@field [1] integer|string STAGE's array: position (on failure: the file)
---@field [2] string path (on failure: the id)
---@field [3] integer mtime
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

---Runs `f(...)` after `ms` (`stage.addtask(f, ...)`: at once); again while it returns a number > 0.
---`stage.addtask(handle, nil)` cancels; `stage.addtask(handle, ms [, f])` moves the next run
---to `ms` from now (and replaces the function). Negative `ms` runs at once, NaN raises.
---```lua
---local h = stage.addtask(1000, function () return 1000 end)
---stage.addtask(h, 50)            -- next run in 50 ms
---stage.addtask(function () print("soon") end)
---```
---@param ms integer|number|function delay in milliseconds, a handle, or the function
---@param f? fun(...): number|nil|integer new delay when rescheduling
---@param ... any
---@return integer|boolean handle, or whether the task was pending
function stage.addtask(ms, f, ...) end

---Runs `f(...)` soon; calls with the same non-zero key never overlap and keep their order.
---`stage.submit(f, ...)` has no key; `f` may be a script name (`"file+fn"`).
---```lua
---stage.submit(player_id, "inventory+save", item)
---stage.submit(function () print("no key") end)
---```
---@param key integer|string|function 0 = no restriction; a function = no key
---@param f? fun(...): number|nil|string
---@param ... any
function stage.submit(key, f, ...) end

---Calls `f` (a function, a script name as in `stage.load`, or `{f, a, b}`) with the
---arguments, every table argument spread into its elements (STAGE).
---```lua
---stage.call(function (a, b, c) return a + b + c end, { 1, 2 }, 3)   -- 6
---stage.call({ print, "a" }, "b")                                    -- print("a", "b")
---```
---@param f function|string|table
---@param ... any
---@return ...
function stage.call(f, ...) end

---Stops the whole process gracefully (STAGE's `stage.exit`, as `process.exit(0)`).
---```lua
---stage.exit()
---```
function stage.exit() end

---Yields the current callback for `ms` milliseconds. (ext)
---Negative returns at once, more than a year (math.huge) sleeps a year, NaN raises.
---@param ms number
function stage.sleep(ms) end

return stage
