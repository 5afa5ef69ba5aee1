-- stage/package/iaas.lua (copied into the test home) against the Vultr emulator the test starts:
-- RunInstances answers a job id at once; the worker creates the instance and waits until it is
-- ready; DescribeJobs shows the result; DescribeInstances lists the project's instances;
-- bad parameters answer 4100, an unknown job 4104, a provider refusal ends the job as 5001.
-- The API listens on HTTP (the example's form); a BSON TCP listener is added beside it.
local iaas = stage.load("iaas")
local api = iaas.serve{ listen = "http://127.0.0.1:0", db = "DB", exec_size = 4, exec_timeout = 30,
    interval = 0.2, wait_timeout = 20000, wait_interval = 50 }
write("port", tostring(api.port.port))
-- the same API over BSON TCP as well (one document per request)
write("bson_port", tostring(api.listen("tcp://127.0.0.1:0?bson=64k,1m").port))
-- a file a body must never be read as (the test posts the body `x.json`)
write("x.json", '{"action":"DescribeInstances","project_id":"p-1"}')

local function call(t)
    local _, r = api.handle(bundle.json(t))
    return r
end

local r = call{ action = "RunInstances", region = "icn", plan = "vc2-1c-1gb", os_id = 1743, project_id = "p-1", label = "web-1" }
eq(r.ret_code, 0, "RunInstances: " .. tostring(r.message))
local job_id = r.job_id
check(job_id, "a job id at once")
local t0, job = process.tick, nil
repeat
    stage.sleep(100)
    r = call{ action = "DescribeJobs", job_id = job_id, project_id = "p-1" }
    eq(r.ret_code, 0, "DescribeJobs")
    job = r.job_set[1]
until job.status == "finished" or job.status == "error" or process.tick - t0 > 20
eq(job.status, "finished", "the job finished: " .. tostring(job.error))
check(job.result.instance_id and job.result.main_ip, "result has the instance")
eq(job.result.status, "running", "ready")
r = call{ action = "DescribeInstances", project_id = "p-1" }
eq(r.ret_code, 0, "DescribeInstances")
eq(#r.instance_set, 1, "one instance in p-1"); eq(r.instance_set[1].id, job.result.instance_id, "that instance")
eq(#call{ action = "DescribeInstances", project_id = "p-2" }.instance_set, 0, "none in p-2")
-- another project cannot see the job
eq(call{ action = "DescribeJobs", job_id = job_id, project_id = "p-2" }.ret_code, 4104, "other project")
eq(call{ action = "DescribeJobs", job_id = "job-nope", project_id = "p-1" }.ret_code, 4104, "unknown job")
r = call{ action = "RunInstances", region = "icn", os_id = 1743 }
eq(r.ret_code, 4100, "missing plan"); check(r.message:find("plan"), r.message)
-- the provider refuses: the job ends as an error carrying 5001
r = call{ action = "RunInstances", region = "nowhere", plan = "vc2-1c-1gb", os_id = 1743, project_id = "p-1" }
eq(r.ret_code, 0, "queued")
local bad = r.job_id
t0 = process.tick
repeat
    stage.sleep(100)
    job = call{ action = "DescribeJobs", job_id = bad, project_id = "p-1" }.job_set[1]
until job.error or job.status == "error" or process.tick - t0 > 20
-- try_max 3, try_period 10 s: the first failure is recorded and the job waits for its retry
if job.status == "pending" then
    check(job.error:find("5001"), "provider error recorded: " .. tostring(job.error))
else
    eq(job.status, "error", "provider refusal")
end
write("ready", "")
-- the test now talks to the HTTP port with curl and to the BSON port with `stage send`;
-- it ends the node when done
