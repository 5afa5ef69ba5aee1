--! {"lua": {"%compat": false}}
-- "%compat": false leaves plain Lua 5.4.
eq(unpack, nil)
eq(bit32, nil)
eq(bit, nil)
done()
