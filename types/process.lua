---@meta process
-- LuaLS type stubs for stage's `process` module. See docs/process.md.
-- `process["$key"]` reads conf/stage.json; `process["%NAME"]` reads the environment.

---@class process
---@field id integer the OS process id
---@field tick number seconds since the node started
---@field args string[] arguments after `--` on the command line
---@field stage integer this instance's number
---@field node string this node's name (ext)
---@field title string the process name shown by ps (assignable)
process = {}

---Stops the node gracefully with exit status `code` (default 0). (ext)
---@param code? integer
function process.exit(code) end

return process
