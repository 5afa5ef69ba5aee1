-- apply: the changes made to fetched rows become INSERT / UPDATE / DELETE in one
-- transaction, with the change log and auto-increment keys.
odbc.new("DB", function (adp)
    fresh(adp, "apply_users", "id " .. AUTO_PK .. ", name VARCHAR(40) NOT NULL, level INT")
    for _, r in ipairs({ { "lee", 1 }, { "park", 2 }, { "choi", 3 } }) do
        adp.exec("INSERT INTO apply_users (name, level) VALUES (?, ?)", r[1], r[2])
    end
    local rs = adp.execute("SELECT id, name, level FROM apply_users ORDER BY id")
    local rows = rs.fetch({ "id" })
    rows[0] = { name = "kim", level = 12 }   -- a new row: the database picks the key
    rows[2] = nil                            -- delete id 2
    rows[3].level = 99                       -- update id 3

    local got_keys, got_log = rs.apply(rows, function (keys, log) return keys, log end)
    eq(#got_keys, 1, "one auto-increment key")
    eq(got_keys[1], 4, "the generated key")
    eq(#got_log, 3, "three changes")
    local del, upd, ins = got_log[1], got_log[2], got_log[3]
    eq(del.action, 8, "delete action")
    eq(del.table, "apply_users")
    eq(del.where.id, 2, "delete where")
    eq(del.value.o.name, "park", "deleted row's old values")
    eq(upd.action, 2, "update action (STAGE: 2)")
    eq(upd.where.id, 3, "update where")
    eq(upd.value.o.level, 3, "old level")
    eq(upd.value.n.level, 99, "new level")
    eq(upd.value.n.name, nil, "only changed columns")
    eq(upd.value.t.level, "INTEGER", "column type")
    eq(ins.action, 4, "insert action (STAGE: 4)")
    eq(ins.key, 4, "insert key")
    eq(ins.value.n.name, "kim")

    -- The new row moved to its generated key.
    eq(rows[0], nil, "placeholder key removed")
    eq(rows[4].id, 4, "row rekeyed with its id")

    local now = adp.query("SELECT id, name, level FROM apply_users ORDER BY id")
    eq(#now, 3, "rows in the table")
    eq(now[1].id, 1); eq(now[2].id, 3); eq(now[2].level, 99); eq(now[3].name, "kim")

    -- Nothing changed: nothing to do.
    local keys2, log2 = rs.apply(rows)
    eq(#keys2, 0); eq(#log2, 0, "second apply is empty")

    -- adapter.apply finds the resultset of fetched rows; the table comes from the query.
    rows[1].name = "renamed"
    local _, log3 = adp.apply(rows)
    eq(#log3, 1, "adapter apply")
    eq(adp.query("SELECT name FROM apply_users WHERE id = 1")[1].name, "renamed")
    local ok, err = pcall(adp.apply, {})
    check(not ok and err:find("not fetched", 1, true), "apply of unknown rows: " .. tostring(err))

    -- A failing change rolls the whole apply back.
    rows[3].level = 5
    rows[4].name = nil                       -- NOT NULL violation
    local ok2, err2 = pcall(rs.apply, rows)
    check(not ok2, "a NOT NULL violation fails the apply")
    check(err2:find("odbc error %[%w+%]"), "the error carries the SQLSTATE: " .. tostring(err2))
    eq(adp.query("SELECT level FROM apply_users WHERE id = 3")[1].level, 99, "rolled back update")

    -- Two keys, nested: insert with keys taken from the path, update, delete.
    fresh(adp, "apply_inv", "owner INT NOT NULL, slot INT NOT NULL, item VARCHAR(20), PRIMARY KEY (owner, slot)")
    adp.exec("INSERT INTO apply_inv (owner, slot, item) VALUES (1, 1, 'sword'), (1, 2, 'shield'), (2, 1, 'bow')")
    local inv = adp.execute("SELECT owner, slot, item FROM apply_inv")
    local t = inv.fetch({ "owner", "slot" })
    t[1][2].item = "helmet"
    t[2][1] = nil
    eq(inv.near(t, { 3, 5 }), nil, "near creates nothing")
    t[3] = { [5] = { item = "ring" } }
    local _, log4 = inv.apply(t)
    eq(#log4, 3, "nested changes")
    eq(log4[1].action, 8); eq(log4[1].where.owner, 2); eq(log4[1].where.slot, 1)
    eq(log4[2].action, 2); eq(log4[2].value.n.item, "helmet")
    eq(log4[3].action, 4); eq(log4[3].value.n.owner, 3); eq(log4[3].value.n.slot, 5)
    local all = adp.query("SELECT owner, slot, item FROM apply_inv ORDER BY owner, slot")
    eq(#all, 3); eq(all[2].item, "helmet"); eq(all[3].item, "ring"); eq(all[3].owner, 3)
    adp.execute("DROP TABLE apply_inv")
    adp.execute("DROP TABLE apply_users")
end)
done()
