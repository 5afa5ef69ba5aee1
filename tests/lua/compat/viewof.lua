-- bundle.viewof: fixed-size records of a file, changed in place, commit/rollback, views
-- over views, scope, and STAGE's preload copying it to stage.viewof.
local F = "records.bin"
write(F, string.rep("\0", 14 * 3))                       -- three { char name[10]; int32 age; }
local buffer = bundle.viewof({ F, { "c10 i" } }, 0, 3)
eq(buffer.size, 14)
eq(buffer.count, 3)
eq(#buffer, 3)
buffer[2] = { "HELLO", 100 }
eq(buffer[2][2], 100, "a change is visible before commit")
eq(read(F), string.rep("\0", 42), "the file is unchanged before commit")
buffer.commit()
local bytes = read(F)
eq(bytes:sub(15, 19), "HELLO")
eq(string.unpack("<i4", bytes, 25), 100)
-- reading it back through a new view
local again = bundle.viewof({ F, "c10 i" })
eq(again.count, 3, "rows default to the whole file")
eq(again[2][1], "HELLO\0\0\0\0\0")
eq(again[2][2], 100)
-- rollback drops changes
again[1] = { "X", 1 }
again.rollback()
eq(again[1][2], 0)
-- a byte view over row 2 of the buffer (STAGE's docs example): byte 1 of 'HELLO'
bundle.viewof({ buffer, buffer.size }, buffer.size, 1, function (row)
    eq(row.count, 1)
    local r = row[1]
    eq(r[1], string.byte("H"))
    r[1] = 32
    row[1] = r
end)
eq(buffer[2][1]:sub(1, 5), " ELLO", "the view's commit reached the parent buffer")
buffer.commit()
eq(read(F):sub(15, 19), " ELLO")
-- scope "ro" refuses writes
local ok, err = pcall(buffer.scope, "ro", function (b) b[1] = { "no", 1 } end)
check(not ok and err:find("read-only", 1, true), tostring(err))
-- s fields are NUL-terminated; a plain file name is a view of int8 bytes
local names = bundle.viewof({ F, "s10 i" })
eq(names[2][1], " ELLO")
local raw = bundle.viewof(F, 14, 5)
eq(raw.count, 5)
eq(raw[1], 32)
for k, v in pairs(bundle) do stage[k] = v end
eq(stage.viewof, bundle.viewof)
ok, err = pcall(bundle.viewof, { F, "q3" })
check(not ok and err:find("unknown field 'q3'", 1, true), tostring(err))
done()
