---@meta thread
-- LuaLS stubs for the thread module, _SANDBOX and _WAITFOR (see docs/thread.md, docs/messages.md).

---@class thread
thread = {}

---@class ThreadJob
local ThreadJob = {}

---Receives `f`'s `thread.signal` values, then its return values (or `nil, message` on error).
---@param cb fun(...: any)
---@return ThreadJob
function ThreadJob.waitfor(cb) end

---Runs `f(...)` on the blocking pool in a separate Lua state. `f` may not have upvalues other than `_ENV`.
---@param f fun(...: any): ...
---@param ... any copied arguments
---@return ThreadJob
function thread.new(f, ...) end

---Inside a function run by `thread.new`: sends values to its `waitfor` callback early.
---@param ... any
---@return boolean sent
function thread.signal(...) end

---`_SANDBOX[""] = {"*NAME", ...}` shares global `NAME` among all instances of the process.
---@type table<string, any>
_SANDBOX = {}

---While a message handler runs: `[-1]` handler id, `[0]` message id,
---`[1]` sender `{node, stage, instance}`, `[2]` reply route (nil when no reply is wanted).
---@type table<integer, any>
_WAITFOR = {}
