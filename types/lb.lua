---@meta lb
-- LuaLS type stubs for stage's `lb` module (ext). See docs/lb.md.
-- Every function yields the calling coroutine while the controller works; errors raise with
-- the field or the HAProxy message named.

---@class lb.Health
---@field protocol? "http"|"tcp" defaults to the LB's protocol
---@field path? string HTTP check path, "/" by default
---@field expect? string|integer HTTP status codes: "200", "200-399" (default), "200,204"
---@field port? integer check this port instead of the backend's
---@field interval? number seconds between checks (2)
---@field timeout? number seconds a check may take (1), at most interval
---@field healthy? integer passed checks to become UP (2)
---@field unhealthy? integer failed checks to become DOWN (2)

---@class lb.Target
---@field sessions_per_backend? number
---@field requests_per_second? number
---@field queue? number

---@alias lb.Provider fun(info: lb.Info): string

---@class lb.Autoscale
---@field min? integer 1
---@field max? integer 4
---@field target lb.Target exactly one metric
---@field cooldown? number seconds between scale-outs (30)
---@field stabilization? number seconds of lower recommendations before a scale-in (300)
---@field period? number seconds between evaluations (1)
---@field warmup? number seconds of HAProxy slowstart for backends the autoscaler adds (0 = none)
---@field provider lb.Provider|{create: lb.Provider, release?: fun(info: lb.Info, address: string)}|string
---@field release? fun(info: lb.Info, address: string)

---@class lb.Event
---@field lb string
---@field old_instance? string remote fail-over: the VM that went down
---@field new_instance? string remote fail-over: its replacement
---@field reserved_ip? string remote fail-over: the reserved IP that follows the LB
---@field kind "backend"|"failover"
---@field backend? string
---@field state string UP, DOWN, MAINT, DRAIN, REMOVED; replaced or failed for a fail-over
---@field previous? string
---@field check? string HAProxy's last check status (L7OK, L4CON, ...)
---@field reason? string
---@field old_pid? integer
---@field new_pid? integer
---@field seconds? number

---Remote mode: the LB on a VM. `placement = {provider = "vultr", region = "icn", plan = "vc2-1c-1gb", reserved_ip = ip.id}`
---@class lb.Placement
---@field provider "vultr"
---@field region string
---@field plan string
---@field os_id? integer 2136 (Debian 12)
---@field reserved_ip? string id of a reserved IP of the same region, moved on fail-over
---@field vpc? string VPC id (default: enable_vpc)
---@field boot_timeout? number seconds (600)
---@field confirm? number seconds a VM stays down before it is replaced (10)
---@field interval? number seconds between checks (5)

---A remote-mode fail-over event: state is down, replaced, recovered or failed.
---@class lb.RemoteEvent
---@field lb string
---@field kind "failover"
---@field state "down"|"replaced"|"recovered"|"failed"
---@field reason string
---@field old_instance string
---@field new_instance? string
---@field reserved_ip? string
---@field seconds? number detection to the reserved IP on the new VM

---A remote LB as info() and lb.list() show it.
---@class lb.RemoteInfo
---@field name string
---@field remote true
---@field protocol string
---@field listen string
---@field algorithm string
---@field state "booting"|"up"|"down"|"replacing"|"deleted"
---@field running boolean
---@field vm string the serving VM's id
---@field main_ip string
---@field internal_ip string the private address its runtime API listens on
---@field reserved_ip? string
---@field failovers integer
---@field backends lb.Backend[] from the VM's last show stat
---@field health lb.Health
---@field project? string
---@field spec table the recorded desired state
---@field placement lb.Placement
---@field instance table the VM as the Vultr API reports it
---@field replacing? table a replacement VM being prepared

---The handle of a remote LB: the local handle's functions, over the VM's private runtime API.
---```lua
---local edge = lb.get("edge")
---edge.add("10.1.96.12:8080"); edge.remove("10.1.96.10:8080")
---edge.update{ algorithm = "leastconn" }   -- blue-green onto a new VM
---```
---@class lb.RemoteHandle
---@field name string
---@field remote true
local RemoteHandle = {}
---Adds a backend: recorded, then live over the VM's runtime API (no new VM).
---@param address string "ip:port"
---@return boolean
function RemoteHandle.add(address) end
---Drains (maint, wait for sessions, del) and deletes a backend; on_change gets REMOVED.
---@param address string
---@return boolean
function RemoteHandle.remove(address) end
---@return lb.RemoteInfo
function RemoteHandle.info() end
---Changes fields (not name, backends or placement); a config change is rolled out blue-green:
---a new VM serves, the reserved IP moves, the old VM is destroyed. Rejected configs change nothing.
---@param changes table
---@return lb.RemoteInfo
function RemoteHandle.update(changes) end
---Destroys the VM(s); the reserved IP stays, detached.
---@return boolean
function RemoteHandle.delete() end

---@class lb.Spec
---@field name string
---@field listen string "ip:port"
---@field protocol? "http"|"tcp"
---@field algorithm? "roundrobin"|"leastconn"
---@field backends? string[] "ip:port" each
---@field health? lb.Health
---@field autoscale? lb.Autoscale
---@field drain? number seconds remove waits for sessions to end (30)
---@field maxconn? integer 4096
---@field options? string[] extra HAProxy backend lines
---@field project? string
---@field on_change? fun(ev: lb.Event)
---@field on_failover? fun(ev: lb.Event|lb.RemoteEvent)
---@field placement? lb.Placement remote mode: lb.create returns an lb.RemoteHandle

---@class lb.Backend
---@field address string
---@field server string HAProxy's server name
---@field state string UP, DOWN, MAINT, DRAIN or UNKNOWN
---@field check string
---@field sessions integer
---@field total integer
---@field rate integer
---@field queue integer
---@field autoscaled boolean

---@class lb.Info
---@field name string
---@field protocol string
---@field listen string
---@field algorithm string
---@field running boolean
---@field pid integer
---@field reloads integer
---@field failovers integer
---@field sessions integer
---@field total integer
---@field rate integer
---@field requests_per_second integer
---@field backends lb.Backend[]
---@field health lb.Health
---@field autoscale? table
---@field project? string
---@field dir string

---@class lb.Handle
---@field name string
local Handle = {}
---Adds a backend live (no reload).
---@param address string "ip:port"
---@return boolean
function Handle.add(address) end
---Drains and deletes a backend.
---@param address string
---@return boolean
function Handle.remove(address) end
---@return lb.Info
function Handle.info() end
---Changes fields (not name or backends) and reloads seamlessly.
---@param changes table
---@return lb.Info
function Handle.update(changes) end
---Stops the HAProxy and forgets the LB.
---@return boolean
function Handle.delete() end

lb = {}

---Creates an LB and starts its HAProxy; with `spec.placement`, on a VM (remote mode), returning an lb.RemoteHandle.
---@param spec lb.Spec
---@return lb.Handle|lb.RemoteHandle
function lb.create(spec) end

---The handle of an existing LB, attaching this instance's hooks; nil when there is none.
---Remote LBs are restored and supervised by the controller from the node's start.
---@param name string
---@param hooks? {on_change?: fun(ev: lb.Event), on_failover?: fun(ev: lb.Event|lb.RemoteEvent), autoscale?: table}
---@return lb.Handle|lb.RemoteHandle|nil
function lb.get(name, hooks) end

---Every LB: local ones, then remote ones (remote = true).
---```lua
---for _, i in ipairs(lb.list()) do print(i.name, i.remote and i.vm or i.listen) end
---```
---@return (lb.Info|lb.RemoteInfo)[]
function lb.list() end

---@param name string
---@return lb.Info|lb.RemoteInfo
function lb.info(name) end

return lb
