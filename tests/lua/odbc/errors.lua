-- SQL errors carry the SQLSTATE and the driver's message; errors never leak a connection.
local want = ({ sqlite = "HY000", postgres = "42P01", mysql = "42S02" })[DIALECT]
odbc.new("DB", function (adp)
    local ok, err = pcall(adp.execute, "SELECT * FROM no_such_table_x")
    check(not ok, "query of a missing table fails")
    local state = err:match("odbc error %[(%w+)%]")
    eq(state, want, "SQLSTATE in " .. err)
    check(err:find("native", 1, true), "native code in " .. err)
    check(err:lower():find("no_such_table_x", 1, true), "driver message in " .. err)
    -- The adapter still works after an error.
    eq(adp.query("SELECT 1 AS one")[1].one, 1, "adapter usable after an error")
end)
-- Failing callbacks give their connection back: far more rounds than the pool has slots
-- (4), each with a short wait for a free connection.
for i = 1, 12 do
    local ok = pcall(odbc.new, "DB", function (adp)
        adp.begin()
        adp.execute("SELECT * FROM no_such_table_x")
    end)
    check(not ok, "round " .. i .. " fails")
end
eq(odbc.new("DB", function (adp) return adp.query("SELECT 2 AS two")[1].two end), 2, "pool still has connections")
local ok, err = pcall(odbc.new, "NOPE")
check(not ok and err:find('no connection named "NOPE"', 1, true), "unknown name: " .. tostring(err))
-- A connection that cannot be made is logged and gives nil, as in STAGE (stage_forms.lua).
local ok2, r2 = pcall(odbc.new, { DRIVER = "NoSuchDriverX", DATABASE = "x" })
check(ok2 and r2 == nil, "unknown driver: nil, got " .. tostring(r2))
done()
