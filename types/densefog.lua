---@meta densefog
-- LuaLS type stubs for the built-in `densefog` library (`require("densefog")`). See docs/densefog.md.

---@class densefog.Error
---@field name string the class, e.g. "ResourceNotFound"
---@field code integer the response code, e.g. 4104
---@field message string
---@field data any

---@alias densefog.ErrorClass fun(message?: string, data?: any): densefog.Error

---@class densefog.errors
---@field IaasProviderActionError densefog.ErrorClass 5001
---@field ActionsPartialSuccessError densefog.ErrorClass 5001, 5002 when data.succeeded is non-empty
---@field InvalidRequestParameter densefog.ErrorClass 4100
---@field ResourceNotFound densefog.ErrorClass 4104
---@field ResourceNotBelongsToProject densefog.ErrorClass 4103
---@field ResourceActionForbiden densefog.ErrorClass 4105
---@field ResourceActionForbidden densefog.ErrorClass 4105
---@field ResourceActionUnsupported densefog.ErrorClass 4106
---@field ResourceIsBusy densefog.ErrorClass 4105
---@field ResourceQuotaNotEnough densefog.ErrorClass 4113
---@field ProjectDuplicated densefog.ErrorClass 4600
---@field ProjectNotFound densefog.ErrorClass 4604
---@field AccessKeyExpired densefog.ErrorClass 4101
---@field AccessKeyInvalid densefog.ErrorClass 4101
---@field ManageAccessKeyInvalid densefog.ErrorClass 4601
---@field AccessKeyNotFound densefog.ErrorClass 4614
---@field AccessKeyDuplicated densefog.ErrorClass 4611
---@field InternalError densefog.ErrorClass 5000
---@field define fun(name: string, code: integer): densefog.ErrorClass adds an error class
---@field is fun(e: any): boolean whether `e` is a densefog error object

---@class densefog.Log
---@field prefix string
---@field trace fun(msg: string)
---@field debug fun(msg: string)
---@field info fun(msg: string)
---@field warn fun(msg: string)
---@field error fun(msg: string)

---@class densefog.JobRow
---@field id string
---@field project_id? string
---@field action string
---@field status "pending"|"running"|"finished"|"error"
---@field error? string
---@field result? string JSON text
---@field params? string JSON text
---@field updated string
---@field created string
---@field run_at string
---@field try_period integer
---@field try_max integer
---@field trys integer

---@class densefog.AddOptions
---@field try_max? integer attempts at most (default 3)
---@field try_period? integer seconds between attempts (default 10)
---@field delay? number seconds before the first attempt
---@field project_id? string
---@field id? string

---@class densefog.Jobs
---@field db any
---@field table string
---@field project_id? string
densefog_jobs = {}
---Creates the job table and its index when missing.
function densefog_jobs.migrate() end
---Adds a pending job; returns its id.
---@param action string
---@param params? table
---@param opts? densefog.AddOptions
---@return string
function densefog_jobs.add(action, params, opts) end
---@param id string
---@return densefog.JobRow|nil
function densefog_jobs.get(id) end
---@param filter? {status?: string, project_id?: string, action?: string, limit?: integer}
---@return densefog.JobRow[]
function densefog_jobs.list(filter) end
---@return {pending: integer, running: integer, finished: integer, error: integer}
function densefog_jobs.counts() end

---@class densefog.RequestCtx
---@field request_id string
---@field action string
---@field project_id? string
---@field remote? string
---@field headers table<string, string>
---@field jobs? densefog.Jobs
---@field log densefog.Log

---@class densefog.JobCtx
---@field job_id string
---@field action string
---@field project_id? string
---@field try integer
---@field try_max integer
---@field jobs densefog.Jobs
---@field log densefog.Log

---@class densefog.Api
---@field routes table<string, fun(params: table, ctx: densefog.RequestCtx): any>
---@field jobs? densefog.Jobs
---@field port? table the listener (broker port)
densefog_api = {}
---@param routes table<string, fun(params: table, ctx: densefog.RequestCtx): any>
---@return densefog.Api
function densefog_api.route(routes) end
---@param body string|table JSON text or a decoded table
---@param meta? {headers?: table, remote?: string}
---@return integer http_status, table response
function densefog_api.handle(body, meta) end
---The broker.ready("http://...") handler.
---@param req table
---@return table
function densefog_api.http(req) end
---@param uri string http://, https:// or tcp://...?bson
---@param options? table broker.ready options for HTTP
---@return table port
function densefog_api.listen(uri, options) end

---@class densefog.Worker
---@field jobs densefog.Jobs
densefog_worker = {}
---@return {running: integer, max_running: integer, picked: integer, finished: integer, failed: integer, retried: integer, timeouts: integer, pick_errors: integer, lost: integer, discarded: integer}
function densefog_worker.stats() end
function densefog_worker.start() end
function densefog_worker.stop() end
function densefog_worker.wake() end

---@class densefog.WorkerOptions
---@field db any a %odbc name, connection string or table
---@field actions table<string, fun(params: table, ctx: densefog.JobCtx): any>
---@field pick_size? integer default 10
---@field exec_size? integer default 10
---@field exec_timeout? number seconds, default 600
---@field interval? number seconds between picks, default 2
---@field lease_margin? number seconds, default 30
---@field notify? fun(job: table, err: string)
---@field webhook? string http(s) URL POSTed `{"text": ..., "job": {...}}` (Slack-style) for each failed job, e.g. "https://hooks.slack.com/services/T000/B000/XXXX"
---@field webhook_timeout? number seconds per webhook post, default 10
---@field table? string default "job"
---@field dialect? "sqlite"|"postgres"|"mysql"
---@field migrate? boolean default true
---@field start? boolean default true

---@class densefog
---@field error densefog.errors
---@field codes table<string, integer>
---@field dialects table
local densefog = {}

---@param o {listen?: string, db?: any, table?: string, dialect?: string, http?: table, migrate?: boolean}
---@return densefog.Api
function densefog.api(o) end

---@param o {db: any, table?: string, dialect?: string, project_id?: string}
---@return densefog.Jobs
function densefog.jobs(o) end

---@param o densefog.WorkerOptions
---@return densefog.Worker
function densefog.worker(o) end

---HTTP status for a response code (0 → 200, 4104 → 404, ...).
---@param code integer
---@return integer
function densefog.http_status(code) end

---A logger whose lines start with `prefix`.
---@param prefix string
---@return densefog.Log
function densefog.logger(prefix) end

return densefog
