-- A Rust panic inside a binding (the test-only `stage._panic`, STAGE_TEST_HOOKS=1) is one
-- clear error: pcall and xpcall return its message, a callback logs it once with the
-- script's traceback (checked by tests/scenarios.rs), and the instance keeps serving.
check(type(stage._panic) == "function", "STAGE_TEST_HOOKS=1 registers stage._panic")
local ok, e = pcall(stage._panic, "hook panic one")
eq(ok, false)
check(type(e) == "string" and e:find("hook panic one", 1, true), tostring(e))
local ok2, e2 = xpcall(stage._panic, function(m) return "handled: " .. tostring(m) end, "hook panic two")
eq(ok2, false)
check(e2:find("handled: hook panic two", 1, true), e2)
-- A panic while another error is being handled: the handler itself panics.
local ok3, e3 = xpcall(error, function() stage._panic("hook panic in a handler") end, "first")
eq(ok3, false)
check(type(e3) == "string" and e3:find("hook panic in a handler", 1, true), tostring(e3))

local function deep_in_the_script()
    stage._panic("hook panic in task")
end
stage.addtask(1, function() deep_in_the_script() end)
stage.submit("k", function() stage._panic("hook panic in submit") end)
local served = 0
stage.submit("k", function() served = served + 1 end)
stage.addtask(30, function() served = served + 1 end)
stage.sleep(100)
eq(served, 2)
done()
