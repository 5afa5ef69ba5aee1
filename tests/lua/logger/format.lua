-- Logger escapes are checked by tests/cli.rs from the node's output.
local function named() logger.info("where: %l") end
named()
logger.warn("user %{STAGE_LOG} at line %L of %F")
logger.error("to a group", "%{=audit}")
logger.info("level override", "%{=audit:warn}")
logger.trace("not shown at info")
print("printed", 1, true)
check(not pcall(logger.info, "x", "%{=g:loud}"), "bad level is an error")
done()
