-- The driver node A of three on loopback: A names B and C; C names A; B names nobody.
local B, C = process["%NODE_B"], process["%NODE_C"]
stage.waitfor("ping", function() return "pong" end)
local function routed(n)
    local k = 0
    for _, m in ipairs(cluster.members()) do
        if m.node ~= process.node and m.state == "alive" and #m.stages > 0 then k = k + 1 end
    end
    return k == n
end
check(wait_until(function() return routed(2) end, 15000), "B and C in the routing table")
eq(cluster.members()[1].node, process.node)

-- Request/response across nodes, round-robin over the nodes that have `db`.
local seen = {}
for _ = 1, 20 do
    local node, inst = stage.request("db:who", 2000)
    check(node, "request answered (" .. tostring(inst) .. ")")
    seen[node] = (seen[node] or 0) + 1
end
check(seen[B] and seen[C] and not seen[process.node], "both remote nodes answered")

-- `*db:` reaches every instance on every node: 2 on B, 1 on C.
local got = {}
stage.waitfor("hits", function(node, inst) got[#got + 1] = node .. "#" .. inst end)
eq(stage.signal("*db:hit=hits"), 3, "broadcast count")
check(wait_until(function() return #got == 3 end, 3000), "3 broadcast answers, got " .. #got)

-- `+db:` other nodes only; `=db:` this host (all three processes share loopback).
check(stage.request("+db:who", 2000) ~= process.node)
check(stage.request("=db:who", 2000), "= reaches another process of this host")

-- 1 MiB both ways.
local big = string.rep("0123456789abcdef", 65536)
local back = stage.request("db:echo", 5000, big)
eq(#(back or ""), #big, "1 MiB echoed")
check(back == big)

-- The direction rule: B names nobody, so it routes nothing; C names A.
local from = {}
for _ = 1, 10 do
    local node, r = stage.request("db:try_web", 3000)
    if node then from[node] = r end
end
eq(from[B], "no route", "B routes nowhere")
eq(from[C], "pong", "C reaches A")

-- FIFO per sender -> receiver pair, and nothing lost on loopback.
for i = 1, 300 do stage.signal("db:seq", process.node, i) end
local reports, viol, count = 0, 0, 0
stage.waitfor("rep", function(v, n) reports = reports + 1; viol = viol + v; count = count + n end)
stage.sleep(1000)
stage.signal("*db:report=rep")
check(wait_until(function() return reports == 3 end, 10000), "3 reports")
eq(viol, 0, "order violations")
eq(count, 300, "signals delivered")
done()
