-- package/x.lua has a syntax error: rollback/x.lua serves in fail-over; the fixed file takes over.
write("rollback/x.lua", "return 'rollback'")
write("package/x.lua", "return 'broken' +")
local v, info = stage.load("x")
eq(v, "rollback")
eq(info.position, 2)
-- A working version is never replaced by a broken one.
write("package/y.lua", "return 'y1'")
eq(stage.load("y"), "y1")
stage.sleep(50)
write("package/y.lua", "return 'y2' +")
stage.sleep(200)
v, info = stage.load("y")
eq(v, "y1", "the previous version keeps serving")
-- Fix x: fail-over scripts are re-checked on every load.
write("package/x.lua", "return 'fixed'")
for _ = 1, 50 do
    v, info = stage.load("x")
    if v == "fixed" then break end
    stage.sleep(20)
end
eq(v, "fixed")
eq(info.position, 0)
done()
