--! {"#startup": [["lua+stage"], ["index.so+rank"], ["=index+board"], ["+index+top"]],
--!  "index.so+rank": {"memory": "4m"}}
-- The index stage as STAGE's docs use it: the several-commands form ("rank:callback" with a
-- table of "cmd:table" keys), the short forms "rank:cmd?table=callback" (callback optional)
-- and the older "rank:callback=cmd?table", tiers, and the shapes of the answers.
local got = {}
stage.waitfor("callback", function(r, err) got[#got + 1] = { r = r, err = err, id = _WAITFOR[0] } end)
local function answer()
    local n = #got
    check(wait_until(function() return #got > n end), "an answer")
    return got[#got].r, got[#got].err
end

-- several commands in one message, as in STAGE's example; "#N." runs them in order
stage.signal("rank:callback", {
    ["#1.set:index"] = {
        KR0001 = { i = 10, v = "TEST1" },
        KR0002 = { i = 100, v = "TEST2" },
        KR0003 = { i = 200, v = "TEST3" },
    },
    ["#2.get:index"] = { "KR0001", "KR0002" },
    ["#3.range:index"] = { 100, 100 },
    ["#4.forEach:index"] = { 1, 100 },
})
local r, err = answer()
eq(err, nil, "no error")
eq(got[1].id, "callback", "the answer comes back as the same id")
eq(type(r["#1.set:index"].KR0001), "number", "set: the rank of each new score")
-- get: the value and the tier's scores with their ranks
local g = r["#2.get:index"]
eq(g.KR0001.v, "TEST1")
eq(g.KR0001.I[1].i, 10)
eq(g.KR0001.I[1].d, 3, "10 ranks third")
eq(g.KR0002.I[1].d, 2)
-- range from score 100: entries keyed by rank, each {k, v, i, d}
local rg = r["#3.range:index"]
eq(rg[1], nil, "200 is above 100")
eq(rg[2].k, "KR0002")
eq(rg[2].i, 100)
eq(rg[2].d, 2)
eq(rg[3].k, "KR0001")
-- forEach from rank 1
local fe = r["#4.forEach:index"]
eq(fe[1].k, "KR0003")
eq(fe[1].v, "TEST3")
eq(fe[2].k, "KR0002")
eq(fe[3].d, 3)

-- the short form: "s" for set, the callback after '=' (r1086); an update moves the id
stage.signal("rank:s?index=callback", { KR0001 = { i = 300, v = "TEST1b" } })
r = answer()
eq(r.KR0001, 1, "now first")
eq(got[#got].id, "callback")
-- without a callback: done, no answer
stage.signal("rank:s?index", { KR0004 = { i = 50 } })
-- STAGE's older spelling "callback=cmd?table" (r966)
stage.signal("rank:callback=g?index", "KR0004")
r = answer()
eq(r.KR0004.I[1].d, 4, "the silent set was done first")
eq(r.KR0004.v, nil, "no value given")
-- range by id: one rank above KR0002 (rank 3 now), two entries
stage.signal("rank:r?index=callback", { "KR0002", 1, 2 })
r = answer()
eq(r[2].k, "KR0003")
eq(r[3].k, "KR0002")
eq(r[4], nil)

-- tiers: "/2" chooses tier 2; "I" sets several tiers at once; "/" reads all of them
stage.signal("rank:s?index/2=callback", { KR0002 = { i = 7 } })
eq(answer().KR0002, 1)
stage.signal("rank:s?index=callback", { KR0005 = { I = { 40, 41, 42, 43 }, v = { 1, 2 } } })
eq(answer().KR0005, 5, "tier 1: 40 ranks fifth (300, 200, 100, 50 above)")
stage.signal("rank:g?index/=callback", { "KR0005" })
r = answer()
eq(r.KR0005.I[1][1], 40)
eq(r.KR0005.I[4][1], 43)
eq(r.KR0005.v[2], 2, "a table value comes back as it was set")
stage.signal("rank:f?index/2=callback", { 1, 10 })
r = answer()
eq(r[1].k, "KR0005", "41 > 7 in tier 2")
eq(r[2].k, "KR0002")
stage.signal("rank:t?index/2=callback", 0)
eq(answer(), 2, "two scores in tier 2")

-- del of a tier: {id = bool}; the id keeps its value; "/" deletes the id
stage.signal("rank:d?index=callback", { "KR0004", "NOPE" })
r = answer()
eq(r.KR0004, true)
eq(r.NOPE, false)
stage.signal("rank:d?index/=callback", "KR0003")
eq(answer().KR0003, true)
stage.signal("rank:g?index=callback", { "KR0003", "KR0001" })
r = answer()
eq(next(r.KR0003), nil, "a deleted id: an empty table")
eq(r.KR0001.I[1].d, 1)

-- stage.request (ext) waits for the answer
local total = stage.request("rank:t?index", 1000)
eq(total, 3, "KR0001, KR0002, KR0005 in tier 1")

-- errors are answered as a second value and name the problem
stage.signal("rank:s?index=callback", { KR9 = { i = 1.5 } })
r, err = answer()
eq(r.KR9, nil)
check(err:find("a score is an integer or a string", 1, true), err)
stage.signal("rank:x?index=callback", {})
r, err = answer()
check(err:find('unknown index command "x"', 1, true), err)

-- the "=" and "+" spellings of #startup start index stages too, each with its own tables
eq(stage.request("board:s?index", 1000, { A = { i = 1 } }).A, 1)
eq(stage.request("board:t?index", 1000), 1)
eq(stage.request("top:t?index", 1000), 0)
done()
