-- The example stage home's entry script. It runs in every instance of `stage`
-- listed in conf/stage.json's "#startup".
logger.info("example home started on " .. process.node .. ", instance " .. process.stage)

-- Game logic lives in modules under package/ (hot reloaded) with a last known good copy
-- in rollback/; stage.load picks the first that works.
local greet = stage.load("greeting+hello")
logger.info(greet("operator"))
stage.load("db_example").record_start(process.node)  -- SQLite through odbc: package/db_example.lua

-- A heartbeat every 30 s: returning the delay runs the task again.
stage.addtask(30000, function ()
    logger.info("alive for " .. math.floor(process.tick) .. " s")
    return 30000
end)
