-- The entry script of this stage home. It runs once in every instance of `stage`
-- (see "#startup" in conf/stage.json); what it registers keeps running.
logger.info("hello from " .. process.node .. ", instance " .. process.stage)

-- A task that runs every 10 seconds: return the delay to run again.
stage.addtask(10000, function ()
    logger.info("still here after " .. math.floor(process.tick) .. " s")
    return 10000
end)
