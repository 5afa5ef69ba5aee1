-- 50 coroutines query at once through a pool of 4 (#threads[0]): no deadlock, never more
-- than 4 connections in use, all finish.
local N, finished, active, max_active = 50, 0, 0, 0
odbc.new("DB", function (adp)
    fresh(adp, "conc_t", "id INT PRIMARY KEY, v INT")
    for i = 1, N do adp.exec("INSERT INTO conc_t (id, v) VALUES (?, ?)", i, i * 10) end
end)
local started = process.tick
for i = 1, N do
    stage.submit(0, function ()
        odbc.new("DB", function (adp)
            active = active + 1
            if active > max_active then max_active = active end
            if SQL_SLEEP then adp.query(SQL_SLEEP) end
            local v = adp.query({ "SELECT v FROM conc_t WHERE id = ?", "i" }, i)[1].v
            eq(v, i * 10, "row " .. i)
            active = active - 1
        end)
        finished = finished + 1
        if finished == N then
            check(max_active <= 4, "at most 4 connections at once, saw " .. max_active)
            if SQL_SLEEP then check(max_active >= 2, "queries overlapped, saw " .. max_active) end
            logger.info(N .. " coroutines in " .. (process.tick - started) .. " s, max " .. max_active .. " at once")
            odbc.new("DB", function (adp) adp.execute("DROP TABLE conc_t") end)
            done()
        end
    end)
end
