-- The search path: package → [0]lib → rollback → [0] (root), with positions and dotted names.
write("lib/util.lua", "return { name = 'lib-util' }")
write("rollback/only_rb.lua", "return 'from rollback'")
os.execute("mkdir -p package/cluster")
write("package/cluster/ready.lua", "return 'dotted'")
write("root_mod.lua", "return 'root'")
write("package/both.lua", "return 'package'")
write("lib/both.lua", "return 'lib'")

local v, info = stage.load("util")
eq(v.name, "lib-util")
eq(info.position, 0, "lib is forced to position 0")
eq(info.path, "lib/util.lua")

v, info = stage.load("only_rb")
eq(v, "from rollback")
eq(info.position, 2, "rollback is position 2 (fail-over)")

eq(stage.load("cluster.ready"), "dotted")
eq(stage.load("root_mod"), "root")
eq(stage.load("both"), "package", "package comes first")

-- with a callback: f(v, info), and its result is returned
local r = stage.load("both", function(v, info) return v .. ":" .. info.path end)
eq(r, "package:package/both.lua")

-- a missing script: an error without f, f(nil, {file, id}) with f
local ok, err = pcall(stage.load, "missing")
check(not ok and err:find('script "missing" not found', 1, true), tostring(err))
local got = stage.load("missing+x", function(v, info) return { v = v, info = info } end)
eq(got.v, nil)
eq(got.info.file, "missing")
eq(got.info.id, "x")

-- plain require uses the same search path
eq(require("cluster.ready"), "dotted")
done()
