-- bundle.json never reads a file for text that starts with `{`, `[` or `"` (after whitespace),
-- even when it ends in ".json": a request body such as `{"a":1} x.json` is JSON text (here
-- invalid), never a path. Files with exactly those names exist, so reading one would succeed.
local names = { '{"a":1} x.json', '  [1, 2] y.json', '\n\t{"z":1}.json', '"q".json' }
for _, name in ipairs(names) do
    local trimmed = name:match("^%s*(.-)%s*$")
    write(trimmed, '{"from_file": true}')
    local ok, err = pcall(bundle.json, name)
    check(not ok, "parsed as a file: " .. name)
    check(err:find("invalid JSON in text", 1, true), "error names JSON text for " .. name .. ": " .. tostring(err))
    check(not err:find("cannot read", 1, true), tostring(err))
end
-- valid JSON text whose value ends in .json is its value
eq(bundle.json('  "conf/x.json"'), "conf/x.json")
eq(bundle.json('{"file": "a.json"}').file, "a.json")
eq(bundle.json(' ["b.json"]')[1], "b.json")
-- a bare name ending in .json is still a file (the documented form)
write("plain.json", '{"from_file": true}')
eq(bundle.json("plain.json").from_file, true)
eq(bundle.json("  plain.json \n").from_file, true)
local ok, err = pcall(bundle.json, "missing.json")
check(not ok and err:find("cannot read missing.json", 1, true), tostring(err))
done()
