--! {"lua": {"%odbc": {"LBAAS": {"DRIVER": "SQLite3", "DATABASE": "lbaas.db"}}}}
-- Serves the example home's LB-as-a-service JSON API (stage/package/lbaas.lua, copied into
-- this home by tests/lb.rs) over BSON and over HTTP; the test drives them with Python's bson
-- client and with curl.
local svc = stage.load("lbaas")
local port = svc.serve("tcp://127.0.0.1:" .. LB_ENV.api_port .. "?bson=64k,1m", "LBAAS")
check(type(port) == "table", "listening")
local http = svc.serve("http://127.0.0.1:" .. LB_ENV.http_port, "LBAAS")
check(type(http) == "table", "listening on HTTP")
write(LB_ENV.out .. "/ready", "ok")
