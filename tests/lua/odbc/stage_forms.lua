-- STAGE's odbc forms: type letters (b = bool as TINYINT, t, length prefixes), a list of
-- values as one table argument, tables stored as BSON blobs and read back as tables,
-- epoch seconds bound to dates, callable fetched rows, output parameters read with rs[n],
-- and odbc.new returning nil when the connection cannot be made.

-- A connection that cannot be made: logged, nil, and the script goes on (f is not called).
local called = false
local bad = odbc.new({ DRIVER = "No Such ODBC Driver", DATABASE = "x" }, function () called = true end)
eq(bad, nil, "odbc.new with f on a failed connection returns nil")
check(not called, "f is not called without a connection")
eq(odbc.new("DRIVER={No Such ODBC Driver};DATABASE=x"), nil, "odbc.new without f returns nil too")
-- A bad argument is still an error.
check(not pcall(odbc.new, 42), "a number is not a connection")

odbc.new("DB", function (adp)
    fresh(adp, "stage_t", "id INT PRIMARY KEY, flag SMALLINT, code CHAR(10), memo " .. BLOB_T .. " NULL, at " .. TS_T .. " NULL")
    -- b binds booleans (and integers) as TINYINT; 10c is a CHAR parameter of length 10.
    adp.execute({ "INSERT INTO stage_t (id, flag, code) VALUES (?, ?, ?)", "i", "b", "10c" }, 1, true, "A1")
    adp.execute({ "INSERT INTO stage_t (id, flag, code) VALUES (?, ?, ?)", "i", "b", "10c" }, 2, false, "B2")
    adp.execute({ "INSERT INTO stage_t (id, flag, code) VALUES (?, ?, ?)", "i", "t", "c" }, 3, 1, "C3")
    local on = adp.execute({ "SELECT id FROM stage_t WHERE flag = ? ORDER BY id", "b" }, true).fetch("$")
    eq(#on, 2, "b = true finds the rows stored with true and with 1")
    eq(on[1].id, 1); eq(on[2].id, 3)

    -- STAGE's source form: the values as ONE list argument.
    adp.execute("UPDATE stage_t SET code = ? WHERE id = ?", { "Z9", 3 })
    eq(adp.query("SELECT code FROM stage_t WHERE id = 3")[1].code:gsub("%s+$", ""), "Z9", "execute(sql, {v1, v2})")

    -- A table value is stored as a BSON document and comes back as a table.
    adp.execute("UPDATE stage_t SET memo = ? WHERE id = ?", { blob = "HAHA", n = 7, list = { 1, 2 } }, 1)
    local rows = adp.execute("SELECT id, memo FROM stage_t ORDER BY id").fetch({ "id" })
    eq(type(rows[1].memo), "table", "a BSON blob reads back as a table")
    eq(rows[1].memo.blob, "HAHA"); eq(rows[1].memo.n, 7); eq(rows[1].memo.list[2], 2)
    eq(rows[2].memo, bundle.null, "NULL stays bundle.null")

    -- Epoch seconds bind to D, and a date column written by apply from an integer.
    local at = os.time({ year = 2023, month = 11, day = 5, hour = 8, min = 9, sec = 10 })
    adp.execute({ "UPDATE stage_t SET at = ? WHERE id = ?", "D", "i" }, at, 1)
    local rs = adp.execute("SELECT id, flag, at FROM stage_t ORDER BY id")
    local t = rs.fetch({ "id" })
    eq(t[1].at, at, "D from epoch seconds round-trips")
    t[2].at = at + 3600
    local _, log = rs.apply(t, "stage_t")
    eq(#log, 1); eq(log[1].action, 2, "UPDATE is action 2 as in STAGE")
    eq(adp.query("SELECT at FROM stage_t WHERE id = 2")[1].at, at + 3600, "apply writes an epoch to a date column")

    -- Fetched rows are callable: rows() lists keys, rows(k) reads, rows({...}, f) reads several.
    local ks = t()
    eq(#ks, 3, "rows() lists the keys"); eq(ks[1], 1); eq(ks[3], 3)
    eq(t(2).id, 2, "rows(k)")
    eq(t(99), nil, "rows(k) of a missing key is nil and creates nothing")
    eq(rawget(t, 99), nil)
    local picked = t({ 3, 1 })
    eq(picked[1].id, 3); eq(picked[2].id, 1)
    eq(t({ 1, 2 }, function (r) return r[1].id + r[2].id end), 3, "rows({...}, f) passes them to f")
    local nested = adp.execute("SELECT id, flag FROM stage_t").fetch({ "flag", "id" })
    eq(#nested(1)(), 2, "a nested level is callable too")
    local row = t(1)
    local cols = row()
    check(#cols == 3, "a row lists its columns")

    -- Output parameters (=) and in/out parameters (+), read with rs[n].
    if DIALECT == "mysql" then
        adp.execute("DROP PROCEDURE IF EXISTS stage_out")
        adp.execute("CREATE PROCEDURE stage_out(IN a INT, OUT b INT, OUT c VARCHAR(20)) BEGIN SET b = a * 2; SET c = CONCAT('n', a); END")
        local r = adp.execute({ "CALL stage_out(?, ?, ?)", "i", "=i", "=20c" }, 21)
        eq(r[2], 42, "an integer output parameter")
        eq(r[3], "n21", "a text output parameter")
        eq(r[1], 21, "an input parameter reads back as itself")
        adp.execute("DROP PROCEDURE stage_out")
    elseif DIALECT == "postgres" then
        adp.execute("CREATE OR REPLACE FUNCTION stage_twice(a INT) RETURNS INT AS 'SELECT a * 2' LANGUAGE sql")
        local r = adp.execute({ "{? = call stage_twice(?)}", "=i", "i" }, 21)
        eq(r[1], 42, "the return value as an output parameter")
        adp.execute("DROP FUNCTION stage_twice(INT)")
    end
    eq(adp.execute("SELECT 1 AS one")[1], nil, "without output parameters rs[n] is nil")
    adp.execute("DROP TABLE stage_t")
end)
done()
