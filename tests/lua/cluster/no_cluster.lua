-- Without #cluster: cluster.members() is this node alone, cluster.watch says there is none.
local m = cluster.members()
eq(#m, 1)
eq(m[1].node, process.node)
eq(m[1].state, "alive")
eq(cluster.watch("membership"), false)
eq(require("cluster"), cluster)
done()
