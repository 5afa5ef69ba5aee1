--! {"lua": {"%odbc": {"LBAAS": {"DRIVER": "SQLite3", "DATABASE": "lbaas.db"}}}}
-- Serves the example home's LB-as-a-service JSON API (stage/package/lbaas.lua, copied into
-- this home by tests/lb.rs) over BSON; the test drives it with Python's bson client.
local svc = stage.load("lbaas")
local port = svc.serve("tcp://127.0.0.1:" .. LB_ENV.api_port .. "?bson=64k,1m", "LBAAS")
check(type(port) == "table", "listening")
write(LB_ENV.out .. "/ready", "ok")
