-- A changed script serves its new version on its next stage.load.
write("package/mod.lua", "return 'v1'")
eq(stage.load("mod"), "v1")
stage.sleep(50)
write("package/mod.lua", "return 'version 2'")
-- The watcher reports the change; allow it a moment.
local v
for _ = 1, 50 do
    stage.sleep(20)
    v = stage.load("mod")
    if v == "version 2" then break end
end
eq(v, "version 2", "reloaded after the change")
-- An unchanged file is served from the cache (the chunk does not run again).
write("package/counter.lua", "COUNT = (COUNT or 0) + 1 return COUNT")
stage.sleep(100)
eq(stage.load("counter"), 1)
eq(stage.load("counter"), 1)
eq(COUNT, 1)
done()
