--! {"#threads": [1, 8]}
-- With one worker, jobs run one after the other in the same (reused) Lua state.
local got = {}
thread.new(function() COUNTER = (COUNTER or 0) + 1; return COUNTER end).waitfor(function(v) got[1] = v end)
thread.new(function() COUNTER = (COUNTER or 0) + 1; return COUNTER end).waitfor(function(v) got[2] = v end)
for _ = 1, 200 do
    if got[1] and got[2] then break end
    stage.sleep(10)
end
eq(got[1], 1)
eq(got[2], 2, "the second job saw the first one's global: the state is reused")
check(COUNTER == nil, "the instance's own globals are separate")
done()
