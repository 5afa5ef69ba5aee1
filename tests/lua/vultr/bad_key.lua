-- vultr: a wrong key is a 401 with Vultr's message, and the key is never shown.
local ok, e = pcall(vultr.instances)
check(not ok, "a wrong key fails")
eq(e, "vultr GET /instances: http 401: Invalid API token.")
check(not e:find("WRONG-KEY-987", 1, true), "the key never shows")
check(#vultr.os() > 0, "public routes need no key")
done()
