--! {"#startup": [["lua+stage"], ["lua+db"]]}
-- STAGE registers every function of a table returned by the entry script as a handler.
if process.stage == 1 then
    return {
        hello = function(x) return "hello " .. x .. " from " .. _WAITFOR[-1] end,
        ["grp."] = function() return "group" end,
        not_a_function = 5,
    }
end
eq(stage.request("db:hello", 2000, "kim"), "hello kim from hello")
eq(stage.request("db:grp.x", 2000), "group")
local v, e = stage.request("db:not_a_function", 2000)
eq(e, "no handler for 'not_a_function'")
done()
