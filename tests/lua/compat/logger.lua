-- logger: any number of arguments tab-joined like print, %{=logger:level} anywhere in the
-- message, %N{ENV} widths (right-aligned, cut to N).
logger.info("many", 1, true, nil, "end")
logger.info("routed %{=bot:warn}inline", "value")
logger.out("%{STAGE_COMPAT_WORD} %l - " .. "msg", "%{=bot:error}")
logger.info("[%8{STAGE_COMPAT_WORD}] [%3{STAGE_COMPAT_WORD}] [%0{STAGE_COMPAT_WORD}]")
logger.info("a", "b")
done()
