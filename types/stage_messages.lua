---@meta stage_messages
-- LuaLS stubs for the message functions of the stage module (see docs/messages.md).
-- They extend the `stage` table declared in types/stage.lua.

---`_WAITFOR` while a handler runs (nil outside one): `[-1]` handler id, `[0]` message id
---(with "=cb"), `[1]` sender address, `[2]` sender's stage (nil for an answer), `reply` answer id.
---@class stage.Waitfor
---@field [integer] string
---@field reply string?

---@type stage.Waitfor?
_WAITFOR = nil

---Registers handler `f` for message `id` (the id without the own stage prefix; generated and
---returned when omitted; a number `n` generates a random id of `n` characters); `f` gets the
---bound values `...` first. `stage.waitfor(id, nil)` unregisters; `stage.waitfor(id)` returns
---`f, {bound}`; `stage.waitfor()` lists every id. A handler's return values answer the sender.
---@param id? string|integer|function
---@param f? function
---@param ... any bound values
---@return any
function stage.waitfor(id, f, ...) end

---Sends a message: "msg" (this instance), ":msg" (synchronous), "db:msg", "@msg", "*db:msg",
---"*msg", "=db:msg", "+db:msg", "db:msg=cb", "db+msg", "a,b:msg", "db:" + table,
---">ID.cb" / ">>ID.x", ms / "<ID.*" (ordered locks), nil (answer the message being handled),
---a saved `_WAITFOR` (answer later) or `{target, address}`. Never blocks.
---@param target string|stage.Waitfor|table|nil
---@param ... any copied values
---@return integer delivered number of instances that took it
function stage.signal(target, ...) end

---Sends and yields until the handler's answer arrives, or returns `nil, reason`
---("timeout", "no route", "queue full", "no handler for 'id'", "error in handler 'id'",
---"shutting down").
---@param target string
---@param timeout_ms number 0 = no limit
---@param ... any copied values
---@return any ...
function stage.request(target, timeout_ms, ...) end
