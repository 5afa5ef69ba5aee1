-- CRUD through execute / exec / query with typed and untyped parameters.
-- Runs on SQLite, PostgreSQL and MariaDB (tests/odbc.rs writes conf and DIALECT).
odbc.new("DB", function (adp)
    fresh(adp, "crud_users", "id " .. AUTO_PK .. ", name VARCHAR(40), level INT")

    -- Type letters convert: "12" is bound as an integer.
    local n, id = adp.exec({ "INSERT INTO crud_users (name, level) VALUES (?, ?)", "c", "i" }, "kim", "12")
    eq(n, 1, "inserted rows")
    eq(id, 1, "first auto-increment key")
    local _, id2 = adp.exec("INSERT INTO crud_users (name, level) VALUES (?, ?)", "lee", 7)
    eq(id2, 2, "second auto-increment key")
    -- Letters may also come as one string.
    adp.execute({ "INSERT INTO crud_users (name, level) VALUES (?, ?)", "ci" }, "park", 30)

    -- Read with a typed parameter.
    local rs = adp.execute({ "SELECT id, name, level FROM crud_users WHERE level >= ? ORDER BY id", "i" }, 10)
    local last = rs.fetch()
    eq(last.name, "park", "last row of the result")
    eq(last.level, 30, "integer column")

    -- Update and delete report affected rows.
    eq(adp.exec("UPDATE crud_users SET level = level + ? WHERE id = ?", 1, 2), 1, "updated rows")
    local upd = adp.execute("UPDATE crud_users SET level = 0 WHERE level > 1000")
    eq(upd.affected, 0, "affected rows of an update that matched nothing")
    local rows = adp.query("SELECT id, name, level FROM crud_users ORDER BY id")
    eq(#rows, 3, "rows before delete")
    eq(rows[2].level, 8, "updated level")
    eq(adp.exec("DELETE FROM crud_users WHERE id = ?", 1), 1, "deleted rows")
    eq(#adp.query("SELECT * FROM crud_users"), 2, "rows after delete")
    local none = adp.execute("SELECT * FROM crud_users WHERE id = -1").fetch()
    eq(none, nil, "fetch of an empty result")

    -- A bad type letter is an error that names it.
    local ok, err = pcall(adp.execute, { "SELECT * FROM crud_users WHERE id = ?", "q" }, 1)
    check(not ok and err:find("unknown parameter type 'q'", 1, true), "bad letter: " .. tostring(err))
    local ok2, err2 = pcall(adp.exec, { "SELECT * FROM crud_users WHERE id = ?", "i" }, "abc")
    check(not ok2 and err2:find("expects an integer", 1, true), "bad integer: " .. tostring(err2))
    adp.execute("DROP TABLE crud_users")
end)

-- Without f, the adapter stays open until close().
local adp = odbc.new("DB")
eq(adp.query("SELECT 1 AS one")[1].one, 1, "open adapter")
adp.close()
local ok, err = pcall(adp.query, "SELECT 1")
check(not ok and err:find("closed", 1, true), "closed adapter: " .. tostring(err))
done()
