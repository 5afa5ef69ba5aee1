-- process: %NAME assignment sets the environment, $key = json updates the running
-- configuration, args from index 0, tick in wall-clock seconds.
process["%STAGE_COMPAT_SET"] = "value1"
eq(process["%STAGE_COMPAT_SET"], "value1")
eq(os.getenv("STAGE_COMPAT_SET"), "value1", "setenv reached the process environment")
process["%STAGE_COMPAT_SET"] = nil
eq(os.getenv("STAGE_COMPAT_SET"), nil, "nil unsets")
process["$%custom"] = '{"a": [1, 2]}'
eq(process["$%custom"].a[2], 2)
local ok, err = pcall(function () process["$%custom"] = "{broken" end)
check(not ok and err:find("invalid JSON", 1, true), tostring(err))
eq(type(process.args[0]), "string", "args[0] is the program")
check(math.abs(process.tick - os.time()) < 5, "tick is wall-clock seconds: " .. process.tick)
done()
