---@meta thread
-- LuaLS stubs for the thread module, _SANDBOX and _WAITFOR (see docs/thread.md, docs/messages.md).

---@class thread
---@field id integer the OS id of the thread running this state
---@field tick number wall-clock seconds (milliseconds as the fraction)
thread = {}

---@class ThreadJob
local ThreadJob = {}

---Receives `f`'s `thread.signal` values, then its return values (or `nil, message` on error).
---`waitfor(nil)` removes the callback (later values are dropped).
---@param cb fun(...: any)|nil
---@return ThreadJob
function ThreadJob.waitfor(cb) end

---Runs `f(...)` on the blocking pool in a full stage state (modules, preloads, `*NAME` globals)
---of the worker. `f` may not have upvalues other than `_ENV`.
---```lua
---thread.new(function (n) stage.sleep(10) return n * 2 end, 21).waitfor(print)
---```
---@param f fun(...: any): ...
---@param ... any copied arguments
---@return ThreadJob
function thread.new(f, ...) end

---Inside a function run by `thread.new`: sends values to its `waitfor` callback early.
---@param ... any
---@return boolean sent
function thread.signal(...) end

---`_SANDBOX[""] = {"*NAME", ...}` shares global `NAME` among all instances of the process;
---a `"NAME"` without `*` is accepted and listed (a plain global here). `pairs(_SANDBOX)`
---lists the declared names with their values.
---@type table<string, any>
_SANDBOX = {}

---STAGE's sandbox helper over the store of `*NAME` globals: `__.X` reads, `__.X = v` writes,
---`__[n]` is namespace n (`__[n] = nil` clears it), `__("X", function (v) return new end)`
---updates atomically across instances (nil = unchanged) and returns the value.
---```lua
---__("VISITS", function (n) return (n or 0) + 1 end)
---```
---@type table|fun(name: string, f: fun(v: any): any): any
__ = {}

---While a message handler runs: `[-1]` handler id, `[0]` message id,
---`[1]` sender `{node, stage, instance}`, `[2]` reply route (nil when no reply is wanted).
---@type table<integer, any>
_WAITFOR = {}
