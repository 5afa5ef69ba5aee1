-- "file+id" gives a field of the table the script returns.
write("package/handlers.lua", [[
local M = {}
function M.login(user) return "hello " .. user end
M.version = 3
return M
]])
eq(stage.load("handlers+version"), 3)
local login = stage.load("handlers+login")
eq(login("kim"), "hello kim")
eq(stage.call("handlers+login", { "lee" }), "hello lee")
write("package/notatable.lua", "return 42")
local ok, err = pcall(stage.load, "notatable+x")
check(not ok and err:find("not a table", 1, true), tostring(err))
done()
