---@meta cluster
-- LuaLS type stubs for stage's `cluster` module (ext). See docs/cluster.md.

---@class cluster.stage
---@field stage string the stage id
---@field instances integer how many instances of it the node runs
---@field load integer the fullest queue of those instances, in percent

---@class cluster.member
---@field node string the node's name, its advertised "ip:port"
---@field addr string the same address
---@field state "alive"|"suspect"|"down"
---@field stages cluster.stage[]
---@field load integer the highest load of its stages, in percent

---@class cluster.event
---@field event "join"|"leave"|"suspect"|"back"
---@field node string
---@field stages string[] the stage ids the node had advertised

---@class cluster
cluster = {}

---This node first, then every member it knows. Without `#cluster`: this node alone.
---@return cluster.member[]
function cluster.members() end

---Membership events (`cluster.event`) arrive in this instance as message `id`
---(handle them with `stage.waitfor(id, f)`); `nil` stops them. False without a cluster.
---@param id string|nil
---@return boolean
function cluster.watch(id) end

return cluster
