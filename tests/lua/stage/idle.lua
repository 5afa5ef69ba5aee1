-- The entry script returns the idle function: called again after the ms it returns.
local calls = 0
return function()
    calls = calls + 1
    if calls == 5 then done() return end
    return 10
end
