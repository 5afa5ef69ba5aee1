-- The client node of the network-fault test (tests/cluster_netns.rs): asks the other node's
-- `db` stage without pause, each request with a 300 ms deadline, and writes what happened to
-- %STATS once every 200 ms: answers, timeouts, other errors, wrong answers, the longest a
-- request took, the sum of all their times (for a mean), and the state of the other node as
-- this node sees it.
local other, path = process["%OTHER"], process["%STATS"]
local s = { ok = 0, timeout = 0, other = 0, wrong = 0, max_ms = 0, sum_ms = 0, state = "none", stages = 0, errors = {} }
local function state_of_other()
    for _, m in ipairs(cluster.members()) do
        if m.node == other then return m.state, #m.stages end
    end
    return "none", 0
end
stage.addtask(200, function ()
    s.state, s.stages = state_of_other()
    write(path .. ".tmp", bundle.json(s))
    os.rename(path .. ".tmp", path)
    return 200
end)
local i = 0
while true do
    i = i + 1
    local t0 = process.clock
    local v, e = stage.request("db:echo", 300, i)
    local ms = math.floor((process.clock - t0) * 1000)
    if ms > s.max_ms then s.max_ms = ms end
    s.sum_ms = s.sum_ms + ms
    if v == i then
        s.ok = s.ok + 1
    elseif v ~= nil then
        s.wrong = s.wrong + 1
    elseif e == "timeout" then
        s.timeout = s.timeout + 1
    else
        s.other = s.other + 1
        s.errors[tostring(e)] = true
        stage.sleep(20)   -- no stage anywhere: answered at once; do not spin
    end
end
