--! {"#startup": [["lua+stage"], ["lua+other"]]}
-- _SANDBOX[""] = {"*NAME"}: a global shared by every instance of the process.
if process.stage == 1 then
    SHARED = { count = 41, name = "kim" } -- set before sharing: committed when declared
    _SANDBOX[""] = { "*SHARED" }
    stage.waitfor("bump", function()
        local s = SHARED
        s.count = s.count + 1
        SHARED = s -- assigning commits
        return SHARED.count
    end)
    stage.waitfor("read", function() return SHARED and SHARED.note end)
    return
end
_SANDBOX[""] = { "*SHARED" }
eq(_SANDBOX[""][1], "*SHARED")
-- wait for the other instance to commit
for _ = 1, 100 do
    if SHARED then break end
    stage.sleep(10)
end
eq(SHARED.count, 41)
eq(SHARED.name, "kim")
eq(stage.request("other:bump", 2000), 42)
eq(SHARED.count, 42, "this instance sees the other's assignment")
SHARED.count = 99 -- changes a copy only
eq(SHARED.count, 42)
local s = SHARED
s.note = "from 0"
SHARED = s
eq(stage.request("other:read", 2000), "from 0")
NOT_SHARED = 1
eq(NOT_SHARED, 1, "other globals are plain")
eq(rawget(_G, "SHARED"), nil, "the shared value lives outside this state")
-- STAGE's per-coroutine "NAME" is accepted (issue 11); a non-name is refused
local ok, err = pcall(function() _SANDBOX[""] = { "NAME" } end)
check(ok, tostring(err))
ok, err = pcall(function() _SANDBOX[""] = { "*9x" } end)
check(not ok and err:find("is not a global name", 1, true), tostring(err))
ok, err = pcall(function() SHARED = { f = io.stdout } end)
check(not ok and err:find("cannot send userdata at global SHARED.f", 1, true), tostring(err))
done()
