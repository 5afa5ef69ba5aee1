-- odbc timeouts follow stage's duration rule (docs/stage.md, "Durations"): longer than a
-- year (math.huge included) is a year; NaN and negative are errors naming the option.
local conn = {
    DRIVER = "SQLite3",
    DATABASE = "data/timeouts.db",
    [".connectionTimeout"] = 1e30,
    [".loginTimeout"] = math.huge,
    [".executeTimeout"] = 1e30,
}
eq(odbc.new(conn, function (adp) return adp.query("SELECT 3 AS three")[1].three end), 3)
for _, bad in ipairs({ 0/0, -1 }) do
    local ok, e = pcall(odbc.new, {
        DRIVER = "SQLite3", DATABASE = "data/timeouts.db", [".connectionTimeout"] = bad,
    })
    check(not ok and e:find(".connectionTimeout: expected milliseconds", 1, true), tostring(e))
end
eq(odbc.new("DB", function (adp) return adp.query("SELECT 2 AS two")[1].two end), 2, "still serving")
done()
