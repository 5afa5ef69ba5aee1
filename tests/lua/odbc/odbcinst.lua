-- A driver known only to the home's conf/odbcinst.ini (ODBCSYSINI=<home>/conf).
local v = odbc.new({ DRIVER = "StageHomeSQLite", DATABASE = "data/inst.db" }, function (adp)
    return adp.query("SELECT 7 AS v")[1].v
end)
eq(v, 7, "query through the home's driver entry")
done()
