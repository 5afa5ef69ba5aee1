-- The entry script of the example home's "rain" instance (see conf/stage.json): the Rain
-- provisioning server of package/rain.lua on 127.0.0.1:8802 (RAIN_LISTEN overrides it).
-- Vultr's key and endpoint come from %vultr in conf/stage.json or VULTR_API_KEY /
-- VULTR_ENDPOINT. Try it without an account, against the emulator:
--
--   stage vultr-emulator --port 8080 --step-ms 2000 &
--   VULTR_API_KEY=EMULATOR-KEY VULTR_ENDPOINT=http://127.0.0.1:8080/v2 stage run stage &
--   stage send 127.0.0.1:8802 '{"Ping": 1}'
--   stage send --timeout 10000 127.0.0.1:8802 '{"CreateRequest": {"region": "icn", "plan": "vc2-1c-1gb", "os_id": 1743}}'
local listen = process["%RAIN_LISTEN"] or "tcp://127.0.0.1:8802?bson=4k,1m"
stage.load("rain").serve(listen, { timeout = 600000, interval = 3000 })
