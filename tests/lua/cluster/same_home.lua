-- Two processes of one home, on different cluster ports (STAGE_CLUSTER_PORT): a cluster too.
if process.stage == 1 then   -- the `x` instance answers
    stage.waitfor("who", function() return process.node end)
    return
end
local other = process["%OTHER"]
check(wait_until(function()
    for _, m in ipairs(cluster.members()) do
        if m.node == other and m.state == "alive" and #m.stages > 0 then return true end
    end
end, 15000), "the other process is a member")
eq(stage.request("+x:who", 2000), other, "+ reaches the other process")
eq(stage.request("=x:who", 2000), process.node, "= prefers this process")
eq(stage.signal("*x:who"), 2, "* reaches both processes")
stage.sleep(500)   -- let the other process ask too
done()
