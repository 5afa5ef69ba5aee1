--! {"#startup": [["lua+stage"], ["lua+stage"]]}
-- _SANDBOX[""] with NAME and *NAME, pairs(_SANDBOX), and the __ helper.
_SANDBOX[""] = { "*COUNT", "LOCAL_V" }
local names = {}
for k in pairs(_SANDBOX) do names[#names + 1] = k end
eq(table.concat(names, ","), "*COUNT,LOCAL_V", "pairs(_SANDBOX) lists the declared names")
eq(table.concat(_SANDBOX[""], ","), "*COUNT,LOCAL_V")
LOCAL_V = "here"
local co = coroutine.wrap(function () return LOCAL_V end)
eq(co(), "here", "a NAME global is readable in a coroutine")
local ok, err = pcall(function () _SANDBOX[""] = { "9bad" } end)
check(not ok and err:find("not a global name", 1, true), tostring(err))

-- __ reads and writes the shared store; __[n] is a namespace
if process.stage == 0 then
    __.GREETING = "hi"
    eq(__.GREETING, "hi")
    __[1].x = 5
    eq(__[1].x, 5)
    __[1] = nil
    eq(__[1].x, nil, "__[1] = nil clears namespace 1")
end

-- atomic updates from both instances: no increment is lost
for _ = 1, 200 do
    __("COUNT", function (v) return (v or 0) + 1 end)
end
eq(__("COUNT", function () end) >= 200, true, "returning nil keeps the value")
if process.stage == 1 then
    __("DONE1", function () return true end)
    return
end
check(wait_until(function () return __.DONE1 == true end, 10000), "instance 1 finished")
eq(COUNT, 400, "the *COUNT global sees the atomic updates of both instances")
done()
