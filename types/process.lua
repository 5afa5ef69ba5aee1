---@meta process
-- LuaLS type stubs for stage's `process` module. See docs/process.md.
-- `process["$key"]` reads the Lua engine section of conf/stage.json (`process["$"]` all of it,
-- dotted paths into the whole file as an extension); `process["$key"] = '{"json": 1}'` sets it
-- for every instance. `process["%NAME"]` reads the environment, `process["%NAME"] = v` sets it.
--   process["%TZ"] = "UTC"
--   local cluster = process["$%cluster"]

---@class process
---@field id integer the OS process id
---@field tick number wall-clock seconds since 1970 (milliseconds as the fraction)
---@field clock number monotonic seconds for measuring durations, microseconds and finer; never goes back (ext)
---@field args table<integer, string> [0] the program, [1..] the arguments after `--`
---@field stage integer this instance's number
---@field node string this node's name (ext)
---@field title string the process name shown by ps (assignable)
process = {}

---Stops the node gracefully with exit status `code` (default 0). (ext)
---@param code? integer
function process.exit(code) end

return process
