---@meta logger
-- LuaLS type stubs for stage's `logger` module (alias `log4cxx`). See docs/logger.md.
-- Escapes in msg: %l %F %M %L %{ENV} %%; route: "%{=group}" or "%{=group:level}".

---@class logger
logger = {}
log4cxx = logger

---@param msg any
---@param route? string
function logger.out(msg, route) end
---@param msg any
---@param route? string
function logger.info(msg, route) end
---@param msg any
---@param route? string
function logger.warn(msg, route) end
---@param msg any
---@param route? string
function logger.error(msg, route) end
---@param msg any
---@param route? string
function logger.trace(msg, route) end
---@param msg any
---@param route? string
function logger.debug(msg, route) end

return logger
