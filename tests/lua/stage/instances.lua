--! {"#startup": [["lua+stage"], ["lua+stage"], ["lua+worker"]],
--!  "lua": {"lua+worker": "worker"}}
-- Three instances: two of `stage` running this script, one of `worker` running worker.lua.
write("package/worker.lua", "")
if process.stage == 0 then
    -- instance numbers are distinct; once is process-wide
    stage.sleep(100)
    local seen = stage.once("who", function() return "me" end)
    check(seen == nil, "instance 1 ran once() first")
    done()
else
    stage.once("who", function() end)
end
