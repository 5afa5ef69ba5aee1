-- densefog: an action-routed JSON API and a database job worker for IaaS-style services,
-- after the Python framework of the same name. Built into the binary: `require("densefog")`.
-- Documentation: docs/densefog.md. Everything here is plain Lua over `odbc`, `stage`,
-- `bundle`, `broker` and `logger`; nothing blocks the instance (database calls yield).
local native = ... -- host helpers (src/lua/densefog.rs): native.webhook
local M = { version = "1" }

local json, null = bundle.json, bundle.null
local fmt = string.format

-- odbc.new(conn, fn) logs a connection failure and returns nil without calling fn (STAGE's
-- behaviour); the library needs it as an error, so that picks, results and retries see it.
local function connect(db, fn)
    local called = false
    local r = table.pack(odbc.new(db, function (adp) called = true; return fn(adp) end))
    if not called then error("cannot connect to database " .. tostring(db), 0) end
    return table.unpack(r, 1, r.n)
end

-- Log text must not be read as logger escapes (%l, %F, ...).
local function esc(s)
    return (tostring(s):gsub("%%", "%%%%"))
end

local function hex_id(prefix)
    return prefix .. fmt("%016x", math.random(0))
end

-- A JSON value as text: tables through bundle.json, scalars as one-element arrays stripped.
local function to_json(v)
    if v == nil or v == null then return nil end
    if type(v) == "table" then return json(v) end
    return json({ v }):sub(2, -2)
end

-- JSON object text → table, or nil and why (bundle.json would read a file for "x.json").
local function parse_object(text)
    if type(text) ~= "string" or not text:match("^%s*{") then
        return nil, "expected a JSON object"
    end
    local ok, v = pcall(json, text)
    if not ok then return nil, "invalid JSON: " .. tostring(v) end
    if type(v) ~= "table" then return nil, "expected a JSON object" end
    return v
end

local function check_ident(name, what)
    if type(name) ~= "string" or not name:match("^[%a_][%w_]*$") or #name > 64 then
        error(fmt("densefog: %s must be an SQL identifier (letters, digits, _), got %s", what, tostring(name)), 3)
    end
    return name
end

local function positive(v, default, what, integer)
    if v == nil then return default end
    if type(v) ~= "number" or v ~= v or v <= 0 or (integer and math.type(v) ~= "integer") then
        error(fmt("densefog: %s must be a positive %s, got %s", what, integer and "integer" or "number", tostring(v)), 3)
    end
    return v
end

------------------------------------------------------------------------------------------
-- Errors: the seed's exception table as Lua error objects.
------------------------------------------------------------------------------------------

local ErrorMT = {}
ErrorMT.__index = ErrorMT
ErrorMT.__tostring = function (e)
    return fmt("%s (%d): %s", e.name, e.code, e.message)
end

M.codes = {
    InternalError = 5000,
    IaasProviderActionError = 5001,
    ActionsPartialSuccessError = 5001, -- 5002 when some of the actions succeeded
    InvalidRequestParameter = 4100,
    ResourceNotFound = 4104,
    ResourceNotBelongsToProject = 4103,
    ResourceActionForbiden = 4105,
    ResourceActionForbidden = 4105,
    ResourceActionUnsupported = 4106,
    ResourceIsBusy = 4105,
    ResourceQuotaNotEnough = 4113,
    ProjectDuplicated = 4600,
    ProjectNotFound = 4604,
    AccessKeyExpired = 4101,
    AccessKeyInvalid = 4101,
    ManageAccessKeyInvalid = 4601,
    AccessKeyNotFound = 4614,
    AccessKeyDuplicated = 4611,
}

M.error = {}

--- Defines (or redefines) an error class: `densefog.error.define("QuotaExceeded", 4113)`.
function M.error.define(name, code)
    check_ident(name, "error name")
    if math.type(code) ~= "integer" or code < 1000 or code > 9999 then
        error("densefog.error.define: code must be a 4-digit integer, got " .. tostring(code), 2)
    end
    M.codes[name] = code
    M.error[name] = function (message, data)
        local c = code
        if name == "ActionsPartialSuccessError" and type(data) == "table"
            and type(data.succeeded) == "table" and #data.succeeded > 0 then
            c = 5002
        end
        return setmetatable({ name = name, code = c, message = tostring(message or name), data = data }, ErrorMT)
    end
    return M.error[name]
end

for name, code in pairs(M.codes) do M.error.define(name, code) end

--- Whether `e` is a densefog error object.
function M.error.is(e)
    return getmetatable(e) == ErrorMT
end

-- HTTP status for a response code.
local HTTP_STATUS = { [4101] = 401, [4601] = 401, [4103] = 403, [4105] = 403, [4104] = 404,
    [4604] = 404, [4614] = 404, [4600] = 409, [4611] = 409, [4113] = 429 }

function M.http_status(code)
    if code == 0 then return 200 end
    return HTTP_STATUS[code] or (code < 5000 and 400 or 500)
end

------------------------------------------------------------------------------------------
-- SQL dialects. Every time is the database's clock, in UTC, with milliseconds, so several
-- nodes agree and no timestamp is ever bound as a parameter.
------------------------------------------------------------------------------------------

local DIALECTS = {
    sqlite = {
        now = "strftime('%Y-%m-%d %H:%M:%f','now')",
        plus = function (ms) return fmt("strftime('%%Y-%%m-%%d %%H:%%M:%%f','now','%+.3f seconds')", ms / 1000) end,
        ts = "TIMESTAMP", text = "TEXT", skip_locked = false,
    },
    postgres = {
        now = "(now() AT TIME ZONE 'UTC')",
        plus = function (ms) return fmt("((now() AT TIME ZONE 'UTC') + INTERVAL '%d milliseconds')", ms) end,
        ts = "TIMESTAMP(3)", text = "TEXT", skip_locked = true,
    },
    mysql = {
        now = "UTC_TIMESTAMP(3)",
        plus = function (ms) return fmt("(UTC_TIMESTAMP(3) + INTERVAL %d MICROSECOND)", ms * 1000) end,
        ts = "DATETIME(3)", text = "MEDIUMTEXT", skip_locked = true,
    },
}
M.dialects = DIALECTS

local detected = {}

-- Workers of this instance by job table, woken when a job is added here.
local local_workers = {}
local function db_key(db, tbl)
    return (type(db) == "table" and tostring(db) or tostring(db)) .. "|" .. tbl
end

-- The dialect of connection `db`: asked of the database once per instance.
local function dialect_of(db, given)
    if given then
        return DIALECTS[given] or error("densefog: unknown dialect " .. tostring(given) .. " (sqlite, postgres, mysql)", 3)
    end
    local key = type(db) == "table" and db or tostring(db)
    if detected[key] then return detected[key] end
    local name = connect(db, function (adp)
        local ok, rows = pcall(adp.query, "SELECT version() AS v")
        if ok and rows[1] then
            local v = tostring(rows[1].v or rows[1].V or ""):lower()
            if v:find("postgres") then return "postgres" end
            return "mysql"
        end
        ok = pcall(adp.query, "SELECT sqlite_version() AS v")
        if ok then return "sqlite" end
        error("densefog: cannot tell the database's dialect; pass dialect = 'sqlite'|'postgres'|'mysql'")
    end)
    detected[key] = DIALECTS[name]
    return DIALECTS[name]
end

------------------------------------------------------------------------------------------
-- Jobs: the seed's `job` table.
------------------------------------------------------------------------------------------

local JOB_COLUMNS = "id, project_id, action, status, error, result, params, updated, created, run_at, try_period, try_max, trys"

--- `densefog.jobs{ db = ..., table = "job", dialect = nil, project_id = nil }` → jobs
function M.jobs(o)
    if type(o) ~= "table" or o.db == nil then error("densefog.jobs: expected { db = connection, ... }", 2) end
    local J = { db = o.db, table = check_ident(o.table or "job", "table"), project_id = o.project_id }
    local tbl = J.table
    local D
    local function d()
        D = D or dialect_of(J.db, o.dialect)
        return D
    end
    J.dialect = function () return d() end

    --- Creates the table and its index when missing (idempotent).
    function J.migrate()
        local x = d()
        connect(J.db, function (adp)
            adp.execute(fmt([[CREATE TABLE IF NOT EXISTS %s (
                id VARCHAR(32) NOT NULL PRIMARY KEY,
                project_id VARCHAR(32),
                action VARCHAR(50) NOT NULL,
                status VARCHAR(10) NOT NULL,
                error %s, result %s, params %s,
                updated %s, created %s, run_at %s,
                try_period INTEGER NOT NULL DEFAULT 0,
                try_max INTEGER NOT NULL DEFAULT 1,
                trys INTEGER NOT NULL DEFAULT 0)]], tbl, x.text, x.text, x.text, x.ts, x.ts, x.ts))
            adp.execute(fmt("CREATE INDEX IF NOT EXISTS %s_pick ON %s (status, run_at)", tbl, tbl))
        end)
        return true
    end

    --- Adds a pending job; returns its id.
    function J.add(action, params, opts)
        opts = opts or {}
        if type(action) ~= "string" or #action == 0 or #action > 50 then
            error("jobs.add: action must be a string of 1 to 50 characters, got " .. tostring(action), 2)
        end
        if params ~= nil and type(params) ~= "table" then
            error("jobs.add: params must be a table (stored as JSON), got a " .. type(params), 2)
        end
        local try_max = positive(opts.try_max, 3, "jobs.add: try_max", true)
        local try_period = opts.try_period or 10
        if type(try_period) ~= "number" or try_period < 0 or math.type(try_period) ~= "integer" then
            error("jobs.add: try_period must be a non-negative integer (seconds), got " .. tostring(try_period), 2)
        end
        local delay = opts.delay or 0
        if type(delay) ~= "number" or delay < 0 then error("jobs.add: delay must be a non-negative number of seconds", 2) end
        local project = opts.project_id or J.project_id
        if project ~= nil and (type(project) ~= "string" or #project > 32) then
            error("jobs.add: project_id must be a string of at most 32 characters", 2)
        end
        local id = opts.id or hex_id("job-")
        local x = d()
        local text = params and json(params) or "{}"
        if text == "[]" then text = "{}" end
        local run_at = delay > 0 and x.plus(math.floor(delay * 1000)) or x.now
        local sql = fmt("INSERT INTO %s (id, project_id, action, status, params, updated, created, run_at, try_period, try_max, trys) VALUES (?, ?, ?, 'pending', ?, %s, %s, %s, ?, ?, 0)",
            tbl, x.now, x.now, run_at)
        local ok, e = pcall(connect, J.db, function (adp)
            adp.exec(sql, id, project or null, action, text, try_period, try_max)
        end)
        if not ok then error("jobs.add: " .. tostring(e), 2) end
        for w in pairs(local_workers[db_key(J.db, tbl)] or {}) do w.wake() end
        return id
    end

    local function decode(row)
        if not row then return nil end
        for k, v in pairs(row) do
            if v == null then row[k] = nil end
        end
        return row
    end

    --- The job `id` as a table of its columns (nil when absent); `params`/`result` stay JSON text.
    function J.get(id)
        return connect(J.db, function (adp)
            return decode(adp.query(fmt("SELECT %s FROM %s WHERE id = ?", JOB_COLUMNS, tbl), id)[1])
        end)
    end

    --- Jobs matching `{status = ..., project_id = ..., action = ..., limit = 100}`, oldest first.
    function J.list(f)
        f = f or {}
        local where, args = {}, {}
        for _, k in ipairs({ "status", "project_id", "action" }) do
            if f[k] ~= nil then where[#where + 1] = k .. " = ?"; args[#args + 1] = f[k] end
        end
        local limit = positive(f.limit, 100, "jobs.list: limit", true)
        local sql = fmt("SELECT %s FROM %s%s ORDER BY created, id LIMIT %d", JOB_COLUMNS, tbl,
            #where > 0 and (" WHERE " .. table.concat(where, " AND ")) or "", limit)
        return connect(J.db, function (adp)
            local rows = adp.query(sql, table.unpack(args))
            for _, r in ipairs(rows) do decode(r) end
            return rows
        end)
    end

    --- Counts by status: `{pending = 3, running = 1, finished = 10, error = 0}`.
    function J.counts()
        return connect(J.db, function (adp)
            local c = { pending = 0, running = 0, finished = 0, error = 0 }
            for _, r in ipairs(adp.query(fmt("SELECT status, COUNT(*) AS n FROM %s GROUP BY status", tbl))) do
                c[r.status] = math.tointeger(r.n) or r.n
            end
            return c
        end)
    end

    -- The same jobs bound to a project (ctx.jobs).
    function J.for_project(project_id)
        local P = setmetatable({ project_id = project_id }, { __index = J })
        P.add = function (action, params, opts)
            opts = opts or {}
            if opts.project_id == nil then
                local copy = {}
                for k, v in pairs(opts) do copy[k] = v end
                copy.project_id = project_id
                opts = copy
            end
            return J.add(action, params, opts)
        end
        return P
    end

    return J
end

------------------------------------------------------------------------------------------
-- Worker
------------------------------------------------------------------------------------------

-- A logger whose lines start with `prefix`.
local function prefixed(prefix)
    local L = {}
    for _, level in ipairs({ "trace", "debug", "info", "warn", "error" }) do
        L[level] = function (msg) logger[level](prefix .. esc(msg)) end
    end
    L.prefix = prefix
    return L
end
M.logger = prefixed

-- The first line of an error, without the traceback.
local function message_of(e)
    if M.error.is(e) then return tostring(e) end
    return (tostring(e):match("^[^\n]*"))
end

--- `densefog.worker{ db, actions, pick_size = 10, exec_size = 10, exec_timeout = 600,
--- interval = 2, lease_margin = 30, notify = fn(job, err), webhook = "https://...",
--- webhook_timeout = 10, table = "job", start = true }`
function M.worker(o)
    if type(o) ~= "table" then error("densefog.worker: expected an options table", 2) end
    if o.db == nil then error("densefog.worker: db is required (a %odbc name, connection string or table)", 2) end
    if type(o.actions) ~= "table" then error("densefog.worker: actions must be a table of action name → function", 2) end
    for name, f in pairs(o.actions) do
        if type(f) ~= "function" then error("densefog.worker: actions." .. tostring(name) .. " must be a function", 2) end
    end
    if o.notify ~= nil and type(o.notify) ~= "function" then error("densefog.worker: notify must be a function", 2) end
    if o.webhook ~= nil and (type(o.webhook) ~= "string" or not o.webhook:match("^https?://[^/%s]+[^%s]*$")) then
        error("densefog.worker: webhook must be an http:// or https:// URL (a Slack-style incoming webhook), got " .. tostring(o.webhook), 2)
    end
    local W = {
        jobs = M.jobs({ db = o.db, table = o.table, dialect = o.dialect }),
        actions = o.actions,
        pick_size = positive(o.pick_size, 10, "densefog.worker: pick_size", true),
        exec_size = positive(o.exec_size, 10, "densefog.worker: exec_size", true),
        exec_timeout = positive(o.exec_timeout, 600, "densefog.worker: exec_timeout (seconds)"),
        interval = positive(o.interval, 2, "densefog.worker: interval (seconds)"),
        lease_margin = positive(o.lease_margin, 30, "densefog.worker: lease_margin (seconds)"),
        notify = o.notify,
        webhook = o.webhook,
        webhook_timeout = positive(o.webhook_timeout, 10, "densefog.worker: webhook_timeout (seconds)"),
        name = o.name or (process.node .. "/" .. process.id .. "#" .. process.stage),
    }
    local db, tbl = o.db, W.jobs.table
    local log = prefixed("densefog worker " .. W.name .. ": ")
    local stats = { running = 0, max_running = 0, picked = 0, finished = 0, failed = 0, retried = 0,
        timeouts = 0, pick_errors = 0, lost = 0, discarded = 0 }
    W.stats = function () local c = {} for k, v in pairs(stats) do c[k] = v end return c end

    local stopped, picking, timer, timer_due, waiting_slot, rewake = true, false, nil, nil, false, false
    local last_sweep = -math.huge

    -- Runs fn(adp) against the database, retrying while the database is away, until
    -- `deadline` (process.tick). Returns fn's result, or nil, error after the deadline.
    local function persist(what, deadline, fn)
        local wait = 0.2
        while true do
            local ok, r = pcall(connect, db, fn)
            if ok then return r end
            if process.tick + wait > deadline then
                log.error(what .. ": gave up: " .. message_of(r))
                return nil, r
            end
            log.warn(what .. ": " .. message_of(r) .. "; retrying in " .. wait .. " s")
            stage.sleep(wait * 1000)
            wait = math.min(wait * 2, 5)
        end
    end

    local function lease_ms()
        return math.floor((W.exec_timeout + W.lease_margin) * 1000)
    end

    -- Jobs whose lease expired after their last allowed attempt: recorded as errors.
    local function sweep(adp, x)
        local rows = adp.query(fmt("SELECT id, project_id, action, params, trys, try_max FROM %s WHERE status = 'running' AND run_at <= %s AND trys >= try_max", tbl, x.now))
        local lost = {}
        for _, r in ipairs(rows) do
            local err = fmt("worker lost: no result within the lease (attempt %d of %d)", r.trys, r.try_max)
            local n = adp.exec(fmt("UPDATE %s SET status = 'error', error = ?, updated = %s WHERE id = ? AND status = 'running' AND trys = ? AND run_at <= %s", tbl, x.now, x.now), err, r.id, r.trys)
            if n == 1 then r.error = err; lost[#lost + 1] = r end
        end
        return lost
    end

    local claim_where = "(status = 'pending' OR (status = 'running' AND trys < try_max)) AND run_at <= %s"

    -- Claims up to n jobs; returns them (each {id, project_id, action, params, trys, try_max, try_period}).
    local function claim(n)
        local x = W.jobs.dialect()
        return connect(db, function (adp)
            local lost = {}
            if process.tick - last_sweep >= W.interval then
                last_sweep = process.tick
                lost = sweep(adp, x)
            end
            local set = fmt("status = 'running', trys = trys + 1, run_at = %s, updated = %s", x.plus(lease_ms()), x.now)
            local got = {}
            if x.skip_locked then
                adp.begin()
                local ok, e = pcall(function ()
                    local rows = adp.query(fmt("SELECT id FROM %s WHERE " .. claim_where .. " ORDER BY run_at LIMIT %d FOR UPDATE SKIP LOCKED", tbl, x.now, n))
                    if #rows == 0 then return end
                    local ids, marks = {}, {}
                    for i, r in ipairs(rows) do ids[i] = r.id; marks[i] = "?" end
                    local list = table.concat(marks, ",")
                    adp.exec(fmt("UPDATE %s SET %s WHERE id IN (%s)", tbl, set, list), table.unpack(ids))
                    got = adp.query(fmt("SELECT id, project_id, action, params, trys, try_max, try_period FROM %s WHERE id IN (%s)", tbl, list), table.unpack(ids))
                end)
                if not ok then adp.rollback() error(e, 0) end
                adp.commit()
            else
                -- An atomic conditional UPDATE per candidate: the row is ours when it changed
                -- from the state we read (trys is the attempt's token).
                local rows = adp.query(fmt("SELECT id, trys FROM %s WHERE " .. claim_where .. " ORDER BY run_at LIMIT %d", tbl, x.now, n * 2))
                for i = #rows, 2, -1 do -- shuffle: workers racing for the same rows spread out
                    local j = math.random(i)
                    rows[i], rows[j] = rows[j], rows[i]
                end
                local upd = fmt("UPDATE %s SET %s WHERE id = ? AND trys = ? AND " .. claim_where, tbl, set, x.now)
                local sel = fmt("SELECT id, project_id, action, params, trys, try_max, try_period FROM %s WHERE id = ?", tbl)
                for _, r in ipairs(rows) do
                    if #got >= n then break end
                    if adp.exec(upd, r.id, r.trys) == 1 then
                        got[#got + 1] = adp.query(sel, r.id)[1]
                    end
                end
            end
            return got, lost
        end)
    end

    -- Posts `{"text": ..., "job": {...}}` (Slack's incoming-webhook shape, plus the job for
    -- other receivers) without waiting: the post runs on the instance's runtime, bounded by
    -- webhook_timeout and by the posts in flight; a failure is logged, never retried.
    local function post_webhook(job, err)
        local body = json({
            text = fmt("densefog: job %s %s failed on %s: %s", job.id, job.action, W.name, err),
            job = { id = job.id, action = job.action, project_id = job.project_id,
                trys = math.tointeger(job.trys) or job.trys, try_max = math.tointeger(job.try_max) or job.try_max,
                error = err, worker = W.name },
        })
        local ok, why = native.webhook(W.webhook, body, W.webhook_timeout)
        if not ok then log.error("webhook for job " .. tostring(job.id) .. " not sent: " .. why) end
    end

    local function notify(job, err)
        if W.webhook then
            local ok, e = pcall(post_webhook, job, err)
            if not ok then log.error("webhook for job " .. tostring(job.id) .. ": " .. message_of(e)) end
        end
        if not W.notify then return end
        stage.submit(0, function ()
            local ok, e = pcall(W.notify, job, err)
            if not ok then log.error("notify failed for job " .. tostring(job.id) .. ": " .. message_of(e)) end
        end)
    end

    local schedule

    local function release()
        stats.running = stats.running - 1
        if waiting_slot and not stopped then
            waiting_slot = false
            schedule(0)
        end
    end

    -- Records an attempt's failure: another try after try_period, or the job's end.
    local function failed(job, err, final, deadline)
        local x = W.jobs.dialect()
        local text = message_of(err)
        local retry = not final and job.trys < job.try_max
        local n
        if retry then
            n = persist("job " .. job.id .. " retry", deadline, function (adp)
                return adp.exec(fmt("UPDATE %s SET status = 'pending', error = ?, run_at = %s, updated = %s WHERE id = ? AND status = 'running' AND trys = ?",
                    tbl, x.plus(math.floor(job.try_period * 1000)), x.now), text, job.id, job.trys)
            end)
        else
            n = persist("job " .. job.id .. " error", deadline, function (adp)
                return adp.exec(fmt("UPDATE %s SET status = 'error', error = ?, updated = %s WHERE id = ? AND status = 'running' AND trys = ?",
                    tbl, x.now), text, job.id, job.trys)
            end)
        end
        if n == 1 then
            if retry then
                stats.retried = stats.retried + 1
                log.warn(fmt("job %s %s attempt %d of %d failed, again in %d s: %s", job.id, job.action, job.trys, job.try_max, job.try_period, text))
            else
                stats.failed = stats.failed + 1
                log.error(fmt("job %s %s failed: %s", job.id, job.action, text))
                job.error = text
                notify(job, text)
            end
        elseif n == 0 then
            log.warn("job " .. job.id .. " lost its lease before its failure was recorded")
        end
    end

    local function finished(job, result, deadline)
        local x = W.jobs.dialect()
        local ok, text = pcall(to_json, result)
        if not ok then
            return failed(job, "the result cannot be stored as JSON: " .. message_of(text), true, deadline)
        end
        local n = persist("job " .. job.id .. " result", deadline, function (adp)
            return adp.exec(fmt("UPDATE %s SET status = 'finished', result = ?, error = NULL, updated = %s WHERE id = ? AND status = 'running' AND trys = ?",
                tbl, x.now), text or null, job.id, job.trys)
        end)
        if n == 1 then
            stats.finished = stats.finished + 1
        elseif n == 0 then
            stats.lost = stats.lost + 1
            log.warn("job " .. job.id .. " finished after losing its lease; its result was not recorded")
        end
    end

    local function start(job)
        stats.picked = stats.picked + 1
        stats.running = stats.running + 1
        if stats.running > stats.max_running then stats.max_running = stats.running end
        job.trys = math.tointeger(job.trys) or job.trys
        job.try_max = math.tointeger(job.try_max) or job.try_max
        job.try_period = math.tointeger(job.try_period) or job.try_period
        if job.project_id == null then job.project_id = nil end
        -- The lease ends lease_ms after the claim; records are retried until shortly before.
        local deadline = process.tick + W.exec_timeout + W.lease_margin * 0.9
        local ex = { over = false }
        ex.timer = stage.addtask(W.exec_timeout * 1000, function ()
            if ex.over then return end
            ex.over = true
            stats.timeouts = stats.timeouts + 1
            release()
            failed(job, fmt("timeout: no result after %s s (exec_timeout)", W.exec_timeout), false, deadline)
        end)
        stage.submit(0, function ()
            local handler = W.actions[job.action]
            local ok, res, final
            local params, perr = parse_object(job.params)
            if not handler then
                ok, res, final = false, M.error.ResourceNotFound("unknown action " .. tostring(job.action)), true
            elseif not params then
                ok, res, final = false, M.error.InvalidRequestParameter("job params: " .. perr), true
            else
                local ctx = { job_id = job.id, action = job.action, project_id = job.project_id, try = job.trys,
                    try_max = job.try_max, jobs = W.jobs.for_project(job.project_id),
                    log = prefixed("[" .. job.id .. "] ") }
                ok, res = xpcall(handler, function (e)
                    if M.error.is(e) then return e end
                    return debug.traceback(tostring(e), 2)
                end, params, ctx)
                if not ok and not M.error.is(res) then
                    log.warn("job " .. job.id .. " " .. job.action .. " raised: " .. tostring(res))
                end
            end
            if ex.over then
                stats.discarded = stats.discarded + 1
                log.warn("job " .. job.id .. " returned after its timeout; its outcome is discarded")
                return
            end
            ex.over = true
            stage.addtask(ex.timer, nil)
            if ok then finished(job, res, deadline) else failed(job, res, final, deadline) end
            release()
        end)
    end

    local function tick()
        local free = W.exec_size - stats.running
        if free <= 0 then
            waiting_slot = true
            return nil
        end
        local asked = math.min(W.pick_size, free)
        local ok, got, lost = pcall(claim, asked)
        if not ok then
            stats.pick_errors = stats.pick_errors + 1
            log.warn("pick failed: " .. message_of(got) .. "; next in " .. W.interval .. " s")
            return W.interval * 1000
        end
        for _, j in ipairs(lost or {}) do
            stats.failed = stats.failed + 1
            log.error("job " .. j.id .. " " .. j.action .. ": " .. j.error)
            notify(j, j.error)
        end
        for _, job in ipairs(got) do start(job) end
        if stats.running >= W.exec_size then
            waiting_slot = true -- the next finishing job wakes the picker
            return nil
        end
        if #got > 0 and #got == asked then return 0 end -- there may be more
        return W.interval * 1000
    end

    schedule = function (ms)
        if stopped then return end
        local due = process.tick + ms / 1000
        if timer then
            if timer_due <= due then return end
            stage.addtask(timer, nil)
        end
        timer_due = due
        timer = stage.addtask(ms, function ()
            timer = nil
            if stopped or picking then return end
            picking, rewake = true, false
            local ok, nxt = pcall(tick)
            picking = false
            if rewake and nxt then nxt = 0 end
            if not ok then
                log.error("picker: " .. tostring(nxt))
                nxt = W.interval * 1000
            end
            if nxt and not timer then schedule(nxt) end
        end)
    end

    --- Starts picking (done by densefog.worker unless start = false).
    function W.start()
        if not stopped then return W end
        stopped = false
        local key = db_key(db, tbl)
        local_workers[key] = local_workers[key] or setmetatable({}, { __mode = "k" })
        local_workers[key][W] = true
        schedule(0)
        return W
    end

    --- Stops picking; running jobs finish (or time out) and are recorded.
    function W.stop()
        stopped = true
        local set = local_workers[db_key(db, tbl)]
        if set then set[W] = nil end
        if timer then stage.addtask(timer, nil) timer = nil end
    end

    --- Picks now instead of at the next interval.
    function W.wake()
        if picking then rewake = true else schedule(0) end
    end

    if o.migrate ~= false then W.jobs.migrate() end
    if o.start ~= false then W.start() end
    return W
end

------------------------------------------------------------------------------------------
-- API: JSON bodies routed by their `action` field.
------------------------------------------------------------------------------------------

--- `densefog.api{ listen = "http://0.0.0.0:8080" | "tcp://...?bson", db = ..., table = "job" }`
function M.api(o)
    o = o or {}
    if type(o) ~= "table" then error("densefog.api: expected an options table", 2) end
    local A = { routes = {} }
    if o.db ~= nil then
        A.jobs = M.jobs({ db = o.db, table = o.table, dialect = o.dialect })
        if o.migrate ~= false then A.jobs.migrate() end
    end

    --- Adds routes: action name → function(params, ctx) returning a table.
    function A.route(routes)
        if type(routes) ~= "table" then error("api.route: expected a table of action name → function", 2) end
        for name, f in pairs(routes) do
            if type(name) ~= "string" or type(f) ~= "function" then
                error("api.route: " .. tostring(name) .. " must map an action name to a function", 2)
            end
            A.routes[name] = f
        end
        return A
    end

    local function answer(request_id, action, code, message, data)
        local r = { ret_code = code, action = action and (action .. "Response") or nil, request_id = request_id }
        if message then r.message = message end
        if data ~= nil then r.data = data end
        return M.http_status(code), r
    end

    --- Handles one request: `body` is JSON text or an already decoded table; `meta` may carry
    --- `headers` (lower-case names) and `remote`. Returns the HTTP status and the response table.
    function A.handle(body, meta)
        meta = meta or {}
        local request_id = hex_id("req-")
        local params, perr
        if type(body) == "table" then params = body else params, perr = parse_object(body) end
        if not params then
            return answer(request_id, nil, 4100, "request body: " .. perr)
        end
        local action = params.action
        if type(action) ~= "string" or action == "" then
            return answer(request_id, nil, 4100, "the request has no action")
        end
        local handler = A.routes[action]
        if not handler then
            return answer(request_id, action, 4104, "action " .. action .. " not found")
        end
        local headers = meta.headers or {}
        local project = params.project_id or headers["x-project-id"]
        if project == null then project = nil end
        local log = prefixed("[" .. request_id .. " " .. action .. "] ")
        local ctx = { request_id = request_id, action = action, project_id = project, log = log,
            remote = meta.remote, headers = headers,
            jobs = A.jobs and A.jobs.for_project(project) or nil }
        local ok, res = xpcall(handler, function (e)
            if M.error.is(e) then return e end
            return debug.traceback(tostring(e), 2)
        end, params, ctx)
        if ok then
            local status, r = answer(request_id, action, 0)
            if type(res) == "table" then
                for k, v in pairs(res) do
                    if r[k] == nil then r[k] = v end
                end
            elseif res ~= nil then
                r.data = res
            end
            return status, r
        end
        if M.error.is(res) then
            log.info(tostring(res))
            return answer(request_id, action, res.code, res.message, res.data)
        end
        log.error("unexpected error: " .. tostring(res))
        return answer(request_id, action, 5000, "internal error (request " .. request_id .. ")")
    end

    --- The `broker.ready("http://...")` handler: POST with a JSON body.
    function A.http(req)
        local status, r
        if req.method ~= "POST" then
            status, r = answer(hex_id("req-"), nil, 4100, "use POST with a JSON body")
            status = 405
        else
            status, r = A.handle(req.body, { headers = req.headers, remote = req.remote })
        end
        return { status = status, headers = { ["content-type"] = "application/json", ["x-request-id"] = r.request_id },
            body = json(r) }
    end

    --- Listens on `uri`: http(s):// answers JSON over HTTP, tcp://...?bson one BSON document per request.
    function A.listen(uri, opts)
        local port, err
        if uri:match("^https?://") then
            port, err = broker.ready(uri, A.http, opts)
        elseif uri:match("^tcp://") then
            port, err = broker.ready(uri, function (_, addr)
                return function (_, data)
                    local _, r = A.handle(data, { remote = addr and broker.ntoa(addr) or nil })
                    return r
                end
            end)
        else
            error("densefog.api: listen must be an http://, https:// or tcp:// URI, got " .. tostring(uri), 2)
        end
        if type(port) ~= "table" then
            error("densefog.api: cannot listen on " .. uri .. ": " .. tostring(err or port), 2)
        end
        A.port = port
        return port
    end

    if o.listen then A.listen(o.listen, o.http) end
    return A
end

return M
