-- fetch shapes: no keys (the last row), one key, "$" (row number), two keys (nested),
-- plus columns, near and erase.
odbc.new("DB", function (adp)
    fresh(adp, "fetch_items", "id INT PRIMARY KEY, grp VARCHAR(10), name VARCHAR(20)")
    for _, r in ipairs({ { 1, "a", "x" }, { 2, "a", "y" }, { 3, "b", "z" } }) do
        adp.execute({ "INSERT INTO fetch_items (id, grp, name) VALUES (?, ?, ?)", "i", "c", "c" }, r[1], r[2], r[3])
    end
    local function rs() return adp.execute("SELECT id, grp, name FROM fetch_items ORDER BY id") end

    local last = rs().fetch()
    eq(last.id, 3, "no keys: the last row")
    eq(last.name, "z")

    local by_id = rs().fetch({ "id" })
    eq(by_id[1].name, "x", "keyed by id")
    eq(by_id[3].grp, "b")
    eq(by_id[4], nil)

    local by_name = rs().fetch("name")
    eq(by_name.y.id, 2, "a key given as a string")

    local by_no = rs().fetch("$")
    eq(#by_no, 3, "by row number")
    eq(by_no[2].name, "y")

    local nested = rs().fetch({ "grp", "id" })
    eq(nested.a[1].name, "x", "nested a.1")
    eq(nested.a[2].name, "y", "nested a.2")
    eq(nested.b[3].name, "z", "nested b.3")

    -- With f, fetch returns f's result.
    local count = rs().fetch({ "id" }, function (rows)
        local n = 0
        for _ in pairs(rows) do n = n + 1 end
        return n
    end)
    eq(count, 3, "fetch with f")

    local r = rs()
    local cols = r.columns()
    eq(#cols, 3, "columns")
    eq(cols[1].name:lower(), "id")
    eq(cols[3].name:lower(), "name")
    eq(cols[1].type, "INTEGER", "id type")
    eq(r.columns(function (c) return #c end), 3, "columns with f")

    -- near: the row at a path, nil when missing (STAGE); erase: removes it, returns a count.
    local r2 = rs()
    local t = r2.fetch({ "grp", "id" })
    eq(r2.near(t, { "c", 9 }), nil, "near of a missing row is nil")
    eq(t.c, nil, "near creates nothing")
    eq(r2.near(t, { "a", 1 }).name, "x", "near finds an existing row")
    eq(r2.near(t.a, 2).name, "y", "near with one key")
    eq(r2.erase(t, { "a", 1 }), 1, "erase returns the count")
    eq(t.a[1], nil, "erase removes it")
    eq(r2.erase(t, { "a", 1 }), 0, "erasing a missing row counts 0")
    eq(r2.erase(t, { "zz", 1 }), 0, "erasing below a missing level counts 0")

    local ok, err = pcall(rs().fetch, { "nope" })
    check(not ok and err:find('fetch key "nope" is not a column', 1, true), "bad key: " .. tostring(err))
    adp.execute("DROP TABLE fetch_items")
end)
done()
