-- odbc.cache memoises f's result per name; odbc.purge drops one, several or all.
local calls = 0
local function load()
    calls = calls + 1
    return odbc.new({ DRIVER = "SQLite3", DATABASE = "data/cache.db" }, function (adp)
        return adp.query("SELECT 40 + 2 AS v")[1].v
    end)
end
eq(odbc.cache("answer"), nil, "nothing cached yet")
eq(odbc.cache("answer", load), 42, "first call runs f")
eq(odbc.cache("answer", load), 42, "second call is cached")
eq(calls, 1, "f ran once")
odbc.purge("answer")
eq(odbc.cache("answer", load), 42); eq(calls, 2, "purge by name")
odbc.cache("other", function () return "x" end)
odbc.purge({ "answer", "other" })
eq(odbc.cache("other"), nil, "purge by list")
odbc.cache("answer", load); eq(calls, 3)
odbc.purge()
eq(odbc.cache("answer"), nil, "purge all")
done()
