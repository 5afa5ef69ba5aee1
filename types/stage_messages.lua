---@meta stage_messages
-- LuaLS stubs for the message functions of the stage module (see docs/messages.md).
-- They extend the `stage` table declared in types/stage.lua.

---Registers handler `f` for message `id` (generated and returned when omitted); `f` gets the
---bound values `...` first. `stage.waitfor(id, nil)` unregisters; `stage.waitfor(id)` returns `f, {bound}`.
---@param id string|function
---@param f? function
---@param ... any bound values
---@return any
function stage.waitfor(id, f, ...) end

---Sends a message ("msg", ":msg", "stage:msg", "*stage:msg", "=stage:msg", "+stage:msg",
---"stage:msg=cb", "stage+msg", nil = reply). Never blocks.
---@param target string|userdata|nil
---@param ... any copied values
---@return integer delivered number of instances that took it
function stage.signal(target, ...) end

---Sends and yields until the handler's return values arrive, or returns `nil, reason`
---("timeout", "no route", "queue full", "shutting down", ...).
---@param target string
---@param timeout_ms number 0 = no limit
---@param ... any copied values
---@return any ...
function stage.request(target, timeout_ms, ...) end
