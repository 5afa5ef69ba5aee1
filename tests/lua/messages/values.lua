--! {"#startup": [["lua+stage"], ["lua+b"]]}
-- Values of every kind cross instances intact; what cannot cross is an error that says
-- what and where.
if process.stage == 1 then
    SCALE = 3
    stage.waitfor("echo", function(...) return ... end)
    stage.waitfor("types", function(i, f, s, t, fn)
        return math.type(i), math.type(f), #s, t.a.b[2], fn(7), select("#", i, f, s, t, fn)
    end)
    stage.waitfor("count", function(...) return select("#", ...) end)
    return
end
SCALE = 100 -- the function's global resolves on the receiving side (3 there)
local bin = "\0\1\255\n\r\"x"
local a, b, c, d, e, f = stage.request("b:types", 2000, 1, 1.0, bin, { a = { b = { "x", "y" } } },
    function(n) return n * SCALE end)
eq(a, "integer")
eq(b, "float")
eq(c, #bin)
eq(d, "y")
eq(e, 21, "function ran with the receiver's globals")
eq(f, 5)
local t = { 1, 2.5, "s", true, false, nested = { deep = { [10] = "ten", [1.5] = "float key" } }, [true] = "bool key" }
local back = stage.request("b:echo", 2000, t)
eq(back[1], 1)
eq(back[2], 2.5)
eq(back[3], "s")
eq(back[4], true)
eq(back[5], false)
eq(back.nested.deep[10], "ten")
eq(back.nested.deep[1.5], "float key")
eq(back[true], "bool key")
local x, y = stage.request("b:echo", 2000, 3.0, bin)
eq(x, 3.0, "a float stays a float")
eq(y, bin, "binary strings are intact")
eq(stage.request("b:count", 2000, nil, 1, nil), 3, "nils between values are kept")
local fn = stage.request("b:echo", 2000, function() return "round trip", SCALE end)
local s, scale = fn()
eq(s, "round trip")
eq(scale, 100)

-- errors at the sending call, naming what and where
local count = 0
local ok, err = pcall(stage.signal, "b:echo", { handler = function() count = count + 1 end })
eq(err, "cannot send function with upvalue 'count' at arg 2.handler")
check(not ok)
local cyc = { list = {} }
cyc.list[1] = cyc
ok, err = pcall(stage.request, "b:echo", 100, 1, cyc)
eq(err, "cannot send table with a cycle at arg 4.list[1]")
ok, err = pcall(stage.signal, "b:echo", io.stdout)
eq(err, "cannot send userdata at arg 2")
ok, err = pcall(stage.signal, "b:echo", { print })
eq(err, "cannot send C function at arg 2[1]")
done()
