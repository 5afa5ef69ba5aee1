---@meta vultr
-- LuaLS type stubs for stage's `vultr` module (ext). See docs/vultr.md.
-- Every function yields the calling coroutine; errors raise with the HTTP status and Vultr's message.

---@class vultr.Region
---@field id string e.g. "icn"
---@field city string
---@field country string ISO-2
---@field continent string
---@field options string[]

---@class vultr.Plan
---@field id string e.g. "vc2-1c-1gb"
---@field type string vc2, vhf, vhp, vdc, voc, ...
---@field vcpu_count integer
---@field ram integer MB
---@field disk integer GB
---@field disk_count integer
---@field bandwidth integer GB
---@field monthly_cost number
---@field locations string[] region ids

---@class vultr.Os
---@field id integer e.g. 1743
---@field name string
---@field arch string
---@field family string

---@class vultr.Catalog
---@field regions vultr.Region[]
---@field plans vultr.Plan[]
---@field os vultr.Os[]

---@class vultr.Instance
---@field id string UUID
---@field label string
---@field hostname string
---@field region string
---@field plan string
---@field os string
---@field os_id integer
---@field app_id integer
---@field main_ip string "0.0.0.0" until assigned
---@field status string pending | active | suspended | resizing
---@field power_status string running | stopped
---@field server_status string none | locked | installingbooting | ok
---@field tags string[]
---@field features string[]
---@field ram integer
---@field disk integer
---@field vcpu_count integer
---@field allowed_bandwidth integer
---@field date_created string ISO 8601
---@field netmask_v4 string
---@field gateway_v4 string
---@field v6_network string
---@field v6_main_ip string
---@field v6_network_size integer
---@field internal_ip string
---@field kvm string
---@field image_id string
---@field snapshot_id string
---@field firewall_group_id string
---@field user_scheme string
---@field vpc_only boolean
---@field default_password? string only in the answers of create and get

---@class vultr.CreateSpec
---@field region string
---@field plan string
---@field os_id? integer
---@field label? string
---@field hostname? string
---@field tags? string[]
---@field user_data? string plain text; base64-encoded for the API
---@field [string] any any other field of Vultr's create request, passed as is

---@class vultr.Filter
---@field tag? string
---@field label? string
---@field main_ip? string
---@field region? string

---@class vultr.WaitOptions
---@field timeout? number ms, default 600000
---@field interval? number ms between polls, default 5000
---@field on_change? fun(instance: vultr.Instance) called with the first state and every change

---@class vultr
vultr = {}

---@return vultr.Region[]
function vultr.regions() end

---@param type? string plan type: vc2, vhf, vhp, vdc, voc, ..., all
---@return vultr.Plan[]
function vultr.plans(type) end

---@return vultr.Os[]
function vultr.os() end

---Regions, plans and operating systems (VultrMaker's listall).
---@return vultr.Catalog
function vultr.listall() end

---Every instance of the account (all pages).
---@param filter? vultr.Filter
---@return vultr.Instance[]
function vultr.instances(filter) end

---@param id string
---@return vultr.Instance
function vultr.get(id) end

---Creates an instance; answers at once with it in state pending.
---@param spec vultr.CreateSpec
---@return vultr.Instance
function vultr.create(spec) end

---One word: running (ready), pending, starting, stopped, suspended or resizing.
---@param id string
---@return string
function vultr.status(id) end

---Waits until active, running, ok and addressed; nil and a reason on timeout or when the instance is gone.
---@param id string
---@param opts? vultr.WaitOptions
---@return vultr.Instance|nil instance
---@return string? reason
function vultr.wait(id, opts) end

---@param id string
---@return true
function vultr.delete(id) end

---@param id string
---@return true
function vultr.start(id) end

---@param id string
---@return true
function vultr.halt(id) end

---@param id string
---@return true
function vultr.reboot(id) end

---The user data the instance was created with, decoded ("" when none).
---@param id string
---@return string
function vultr.user_data(id) end

---@class vultr.ReservedIp
---@field id string UUID
---@field region string
---@field ip_type "v4"|"v6"
---@field subnet string the address
---@field subnet_size integer 32 for v4, 64 for v6
---@field label string
---@field instance_id string "" when detached

---Reserves an address: `vultr.reserved_ip_create{region = "icn", ip_type = "v4", label = "edge"}`.
---@param spec {region: string, ip_type?: "v4"|"v6", label?: string}
---@return vultr.ReservedIp
function vultr.reserved_ip_create(spec) end

---Every reserved IP of the account.
---@return vultr.ReservedIp[]
function vultr.reserved_ips() end

---@param id string
---@return vultr.ReservedIp
function vultr.reserved_ip(id) end

---@param id string
---@param label string
---@return vultr.ReservedIp
function vultr.reserved_ip_label(id, label) end

---Attaches to an instance of the same region; raises when attached already.
---@param id string
---@param instance_id string
---@return true
function vultr.reserved_ip_attach(id, instance_id) end

---@param id string
---@return true
function vultr.reserved_ip_detach(id) end

---Detaches from wherever it is (if elsewhere) and attaches to `instance_id`: `vultr.reserved_ip_move(ip.id, new.id)`.
---@param id string
---@param instance_id string
---@return vultr.ReservedIp
function vultr.reserved_ip_move(id, instance_id) end

---Releases the address for good.
---@param id string
---@return true
function vultr.reserved_ip_delete(id) end

return vultr
