--! {"#startup": [["lua+stage"], ["lua+other"], ["=ticket+ticket"]], "=ticket+ticket": [100, {"odbc": 1}]}
-- The ticket stage as STAGE's docs use it: one holder at a time per ticket of "odbc", the
-- holder extends with stage.signal(nil, ms) and gives the ticket back with 0, feedback
-- reports granted / queued / refused, "@room" creates a category, "=room" reaches everyone
-- holding or waiting there, and a ticket not extended is taken back after 1 s.
if process.stage == 1 then
    stage.waitfor("enter", function() return 5000 end)   -- a number returned extends too
    stage.waitfor("ticket:room", function(v) stage.signal("stage:heard", v, process.stage) end)
    stage.waitfor("join", function() stage.signal("ticket:room=enter") end)
    return
end
local log = {}
stage.waitfor("login_query", function(sid, user)
    log[#log + 1] = "in " .. user
    stage.signal(nil, 3000)          -- keep the ticket for 3 s
    stage.sleep(50)
    log[#log + 1] = "out " .. user
    stage.signal(nil, 0)             -- give it back
end)
local fb = {}
stage.waitfor("fb", function(request, result) fb[#fb + 1] = { request, result } end)
stage.signal("ticket:odbc=login_query?fb", 1, "kim")
stage.signal("ticket:odbc=login_query?fb", 2, "lee")
stage.signal("ticket:nope=login_query?fb", 3, "park")
check(wait_until(function() return #log == 4 end), "both logins ran")
eq(table.concat(log, ","), "in kim,out kim,in lee,out lee", "one holder at a time")
eq(#fb, 3)
eq(fb[1][1], "ticket:odbc=login_query?fb")
eq(fb[1][2], true, "granted at once")
check(type(fb[2][2]) == "string" and fb[2][2]:sub(1, 1) == "@", "queued: " .. tostring(fb[2][2]))
eq(fb[3][2], false, "no such category")

-- a room of 2 without waiting; everyone in it hears "=room"
stage.signal("ticket:@room", -2)
stage.sleep(20)
local entered = 0
stage.waitfor("enter", function() entered = entered + 1; return 5000 end)
local heard = {}
stage.waitfor("heard", function(v, who) heard[#heard + 1] = v .. who end)
stage.waitfor("ticket:room", function(v) heard[#heard + 1] = v .. process.stage end)
stage.signal("ticket:room=enter")
stage.signal("other:join")           -- instance 1 asks too
stage.sleep(100)
stage.signal("ticket:room=enter?fb")
check(wait_until(function() return #fb == 4 end))
stage.sleep(100)
eq(fb[4][2], false, "the room is full and does not queue")
stage.signal("ticket:=room", "hello ")
check(wait_until(function() return #heard == 2 end), "two instances in the room")
table.sort(heard)
eq(table.concat(heard, ","), "hello 0,hello 1")
eq(entered, 1)

-- a ticket nobody extends is taken back after ~1 s
local t = {}
stage.waitfor("lazy", function() t[#t + 1] = process.tick end)
stage.signal("ticket:@one", 1)
stage.sleep(20)
stage.signal("ticket:one=lazy")
stage.signal("ticket:one=lazy")
check(wait_until(function() return #t == 2 end, 5000), "the second got the ticket")
local gap = t[2] - t[1]
check(gap > 0.8 and gap < 3, "taken back after " .. gap .. " s")
done()
