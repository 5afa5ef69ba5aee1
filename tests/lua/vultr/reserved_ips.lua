-- vultr reserved IPs: reserve → attach → move to another instance → detach → release.
local a = vultr.create { region = "icn", plan = "vc2-1c-1gb", os_id = 2136, label = "lb-a" }
local b = vultr.create { region = "icn", plan = "vc2-1c-1gb", os_id = 2136, label = "lb-b" }
local ip = vultr.reserved_ip_create { region = "icn", ip_type = "v4", label = "web" }
eq(#ip.id, 36, "a UUID")
eq(ip.region, "icn")
eq(ip.ip_type, "v4")
eq(ip.label, "web")
eq(ip.instance_id, "", "detached at first")
eq(math.type(ip.subnet_size), "integer")
check(ip.subnet:match("^%d+%.%d+%.%d+%.%d+$"), ip.subnet)
eq(#vultr.reserved_ips(), 1)

eq(vultr.reserved_ip_attach(ip.id, a.id), true)
eq(vultr.reserved_ip(ip.id).instance_id, a.id)
local ok, e = pcall(vultr.reserved_ip_attach, ip.id, b.id)
check(not ok and e:find("http 400: Floating IPv4 address is already attached", 1, true), e)
local moved = vultr.reserved_ip_move(ip.id, b.id)
eq(moved.instance_id, b.id, "moved to b")
eq(vultr.reserved_ip_label(ip.id, "web-2").label, "web-2")
eq(vultr.reserved_ip_detach(ip.id), true)
eq(vultr.reserved_ip(ip.id).instance_id, "")

-- Bad input names the field.
ok, e = pcall(vultr.reserved_ip_create, { region = "icn", ip_type = "v5" })
check(not ok and e:find('ip_type must be "v4" or "v6"', 1, true), e)
ok, e = pcall(vultr.reserved_ip_create, { ip_type = "v4" })
check(not ok and e:find("region is required", 1, true), e)
ok, e = pcall(vultr.reserved_ip_create, { region = "icn", colour = "red" })
check(not ok and e:find("unknown field colour", 1, true), e)

eq(vultr.reserved_ip_delete(ip.id), true)
ok, e = pcall(vultr.reserved_ip, ip.id)
check(not ok and e:find("http 404: reserved IP not found", 1, true), e)
vultr.delete(a.id)
vultr.delete(b.id)
done()
