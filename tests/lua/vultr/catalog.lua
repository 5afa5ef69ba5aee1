-- vultr: regions, plans (with a type filter), os and listall yield and return plain tables.
eq(require("vultr"), vultr, "require returns the global")
local regions = vultr.regions()
eq(#regions, 12, "regions")
local icn
for _, r in ipairs(regions) do
    if r.id == "icn" then icn = r end
end
check(icn and icn.city == "Seoul" and icn.country == "KR", "icn is Seoul")
local vhf = vultr.plans("vhf")
check(#vhf > 0, "there are vhf plans")
for _, p in ipairs(vhf) do eq(p.type, "vhf", "plans(type) filters") end
local plans = vultr.plans()
check(#plans > #vhf, "plans() lists every type")
eq(math.type(plans[1].ram), "integer", "ram is an integer")
eq(math.type(plans[1].monthly_cost), "float", "monthly_cost is a float")
check(#plans[1].locations > 0, "a plan lists its regions")
local os = vultr.os()
local ubuntu
for _, o in ipairs(os) do
    if o.id == 1743 then ubuntu = o end
end
check(ubuntu and ubuntu.family == "ubuntu", "os 1743 is Ubuntu")
local all = vultr.listall()
eq(#all.regions, #regions)
eq(#all.plans, #plans)
eq(#all.os, #os)
done()
