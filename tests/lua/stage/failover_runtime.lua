-- package/x.lua raises while loading: rollback/x.lua serves until it is fixed.
write("rollback/x.lua", "return 'rollback'")
write("package/x.lua", "local t = nil\nreturn t.field")
local v, info = stage.load("x")
eq(v, "rollback")
eq(info.position, 2)
eq(info.path, "rollback/x.lua")
write("package/x.lua", "return 'fixed'")
for _ = 1, 50 do
    v = stage.load("x")
    if v == "fixed" then break end
    stage.sleep(20)
end
eq(v, "fixed")
-- With nothing to fall back to, the error names the file and line.
write("package/z.lua", "\nerror('cannot start')")
local ok, err = pcall(stage.load, "z")
check(not ok and err:find("package/z.lua:2: cannot start", 1, true), tostring(err))
done()
