-- bundle.viewof (STAGE's docs): fixed-size records of a file, changed in place,
-- commit/rollback, views over views, scope, and STAGE's preload giving stage.viewof.
local F = "records.bin"
-- viewof(format, rows): 3 rows of { char name[10]; int32 age; } from 0; the file is created
local buffer = bundle.viewof({ F, { "c10 i" } }, 3)
eq(buffer.size, 14)
eq(buffer.count, 3)
eq(#buffer, 3)
eq(#read(F), 42, "the file was created to hold the rows")
buffer[2] = { "HELLO", 100 }
eq(buffer[2][2], 100, "a change is visible before commit")
eq(read(F), string.rep("\0", 42), "the file is unchanged before commit")
buffer.commit()
local bytes = read(F)
eq(bytes:sub(15, 19), "HELLO")
eq(string.unpack("<i4", bytes, 25), 100)
-- a new view of the whole file
local again = bundle.viewof({ F, { "c10 i" } })
eq(again.count, 3, "without rows: the whole file")
eq(again[2][1], "HELLO\0\0\0\0\0")
eq(again[2][2], 100)
again[2] = { nil, 7 }
eq(again[2][1], "HELLO\0\0\0\0\0", "a nil field keeps its bytes")
eq(again[2][2], 7)
again.rollback()
eq(again[2][2], 100, "rollback drops changes")
-- the docs' byte view over row 2 of the buffer: 14 uint8, 1 row from byte 14
bundle.viewof({ buffer, buffer.size }, buffer.size, 1, function (row)
    eq(row.count, 1)
    eq(row[1][1], string.byte("H"))
    row[1] = 32                                   -- 'H' -> ' ', the other bytes kept
end)
eq(buffer[2][1]:sub(1, 5), " ELLO", "the view's commit reached the parent buffer")
buffer.commit()
eq(read(F):sub(15, 19), " ELLO")
-- arrays of numbers and NUL-terminated strings (STAGE's b4, s10)
local G = "arrays.bin"
bundle.viewof({ G, { "b4 i", "s10" } }, 0, 2, function (b)
    b[1] = { { 1, 2 }, 2, "0123456789ABC" }
    b[2] = { { [3] = 4 }, 15, "xy" }
end)
local arr = bundle.viewof({ G, { "b4 i", "s10" } })
eq(arr.size, 18)
eq(table.concat(arr[1][1], ","), "1,2,0,0")
eq(arr[1][3], "012345678", "s10 keeps 9 characters and the NUL")
eq(table.concat(arr[2][1], ","), "0,0,4,0")
eq(arr[2][3], "xy")
-- scope "ro" refuses writes
local ok, err = pcall(buffer.scope, "ro", function (b) b[1] = { "no", 1 } end)
check(not ok and err:find("read-only", 1, true), tostring(err))
-- a plain file name: rows of one byte
local raw = bundle.viewof(F)
eq(raw.count, 42)
eq(raw[15], 32)
for k, v in pairs(bundle) do stage[k] = v end
eq(stage.viewof, bundle.viewof)
ok, err = pcall(bundle.viewof, { F, { "q3" } })
check(not ok and err:find("unknown field 'q3'", 1, true), tostring(err))
ok, err = pcall(bundle.viewof, { "missing.bin", { "i" } })
check(not ok and err:find("cannot open missing.bin", 1, true), tostring(err))
done()
