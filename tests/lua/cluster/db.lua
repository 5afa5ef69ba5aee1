-- A `db` instance of a cluster test node: answers with where it runs.
local seen, violations, count = {}, 0, 0
return {
    who = function() return process.node, process.stage end,
    hit = function() return process.node, process.stage end,
    echo = function(v) return v end,
    seq = function(from, i)
        if seen[from] and i <= seen[from] then violations = violations + 1 end
        seen[from] = i
        count = count + 1
    end,
    report = function() return violations, count end,
    -- The direction rule seen from this node: can it reach the `web` stage of another node?
    try_web = function()
        local v, e = stage.request("web:ping", 1000)
        return process.node, v or e
    end,
    mark = function(v) write(process["%MARK"], v) end,
}
