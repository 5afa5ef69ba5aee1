--! {"#startup": [["lua+stage"], ["=ticket+ticket"]], "#threads": [2, 20000], "=ticket+ticket": {"db": 5}}
-- 10,000 concurrent requests for 5 tickets: never more than 5 holders, every request served.
-- (A grant that waits in the queue longer than the 1 s lease is taken back: the sender
-- yields now and then so that grants are handled while it sends.)
local active, most, served = 0, 0, 0
stage.waitfor("work", function(i)
    active = active + 1
    if active > most then most = active end
    if active > 5 then fail("holders: " .. active) end
    stage.sleep(0)                   -- yield: other handlers run meanwhile
    active = active - 1
    served = served + 1
    return 0                          -- the implicit answer gives the ticket back
end)
local sent = 0
while sent < 10000 do
    if stage.signal("ticket:db=work", sent) == 1 then sent = sent + 1 else stage.sleep(1) end
    if sent % 100 == 0 then stage.sleep(0) end
end
check(wait_until(function() return served == 10000 end, 60000), "served " .. served)
eq(most, 5, "the bound was reached and never exceeded")
done()
