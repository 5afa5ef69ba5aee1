--! {"#license": ["TEST", "0"], "#router": [1500, 900], "#threads": [4, 1000],
--!  "#startup": [["luajit.so+stage"]],
--!  "lua.so": {"%preload": "preload", "%cluster": ["tcp://127.0.0.1:1?bson"], "lua.so+stage": "other"},
--!  "luajit.so": {"%preload": ["preload", "extra/list.json"], "%reflush": 30,
--!                "%cluster": "tcp://[::]:1?bson=64k,128k", "luajit.so+stage": "start"},
--!  "lua.so+process": {"%preload": "nowhere", "lua.so+process": "start"}}
-- STAGE's config shape: both Lua engine sections (merged, luajit.so's values win),
-- %preload as an array with a .json list, process["$key"] reading the engine section.
eq(EXTRA_A, "a", "extra/a.lua ran (named by extra/list.json)")
eq(EXTRA_B, "b", "extra/b.lua ran (named by extra/list.json)")
eq(EXTRA_ORDER, "ab", "preload order follows the list")
eq(process["$%cluster"], "tcp://[::]:1?bson=64k,128k", "%cluster of the engine section")
eq(process["$%reflush"], 30)
local all = process["$"]
eq(type(all), "table", "process[\"$\"] is the engine section")
eq(all["luajit.so+stage"], "start")
eq(all["lua.so+stage"], "other", "lua.so's keys are merged in")
eq(all["lua.so+process"], nil, "a per-stage section not in #startup is not merged")
-- the project's extension: dotted paths into the whole document still work
eq(process["$#threads.1"], 1000)
done()
