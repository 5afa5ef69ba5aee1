---@meta logger
-- LuaLS type stubs for stage's `logger` module (alias `log4cxx`). See docs/logger.md.
-- Escapes in format only: %l %F %M %L %{ENV} %N{ENV} (N characters, right-aligned) %%
-- (secret-looking names print [hidden]); values are written tab-separated as they are; a
-- route "%{=group}" or "%{=group:level}" is found anywhere in format or as a whole argument.
--   logger.out("%{=bot:warn}[%8{USER}] %l - " .. msg, "extra", 42)

---@class logger
logger = {}
log4cxx = logger

---@param format any the message; escapes are expanded here only
---@param ... any values written after it (never expanded), or a route "%{=group[:level]}"
function logger.out(format, ...) end
---@param format any the message; escapes are expanded here only
---@param ... any values written after it (never expanded), or a route "%{=group[:level]}"
function logger.info(format, ...) end
---@param format any the message; escapes are expanded here only
---@param ... any values written after it (never expanded), or a route "%{=group[:level]}"
function logger.warn(format, ...) end
---@param format any the message; escapes are expanded here only
---@param ... any values written after it (never expanded), or a route "%{=group[:level]}"
function logger.error(format, ...) end
---@param format any the message; escapes are expanded here only
---@param ... any values written after it (never expanded), or a route "%{=group[:level]}"
function logger.trace(format, ...) end
---@param format any the message; escapes are expanded here only
---@param ... any values written after it (never expanded), or a route "%{=group[:level]}"
function logger.debug(format, ...) end

return logger
