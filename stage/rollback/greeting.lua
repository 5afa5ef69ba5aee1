-- Edit this file while the node runs: the next stage.load serves the new version.
local M = {}
function M.hello(who) return "hello, " .. who .. "!" end
return M
