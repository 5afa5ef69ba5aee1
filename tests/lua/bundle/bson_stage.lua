-- bundle.bson with STAGE's mapping rules: null decodes to nil, dates are integer seconds,
-- `name@X` keys choose the BSON type, and STAGE's array mapping is an opt-in ("stage").
local b = bundle.bson({ gone = bundle.null, ["at@D"] = 1700000000, ["n@i"] = 7, ["r@d"] = 2, ["yes@b"] = 1,
    list = { "a", "b" } })
local t = bundle.bson(b)
eq(t.gone, nil, "BSON null is nil")
check(t.at == 1700000000 and math.type(t.at) == "integer", "a date is integer seconds")
eq(t.n, 7); eq(math.type(t.r), "float", "@d writes a double"); eq(t.yes, true, "@b writes a bool")
eq(t["at@D"], nil, "the hint is not part of the key")
eq(t.list[1], "a", "standard arrays by default: 1-based")

-- STAGE's mapping: sequences travel as {"#1": ...}, arrays decode 0-based.
local s = bundle.bson({ list = { "a", "b" }, [3] = "three" }, "stage")
local back = bundle.bson(s, "stage")
eq(back.list[1], "a", "#1 keys come back as integers"); eq(back[3], "three")
local std = bundle.bson(s)
eq(std.list["#1"], "a", "the standard mapping sees the #n keys as text")
local arr = bundle.bson(bundle.bson({ ["x@A"] = { 10, 20 } }), "stage")
eq(arr.x[0], 10, "a BSON array is 0-based in STAGE's mapping"); eq(arr.x[1], 20)
check(not pcall(bundle.bson, {}, "nope"), "an unknown mapping is an error")
done()
