-- stage.require loads once and never reloads.
write("package/cfg.lua", "return 'first'")
eq(stage.require("cfg"), "first")
stage.sleep(50)
write("package/cfg.lua", "return 'second'")
stage.sleep(300)
eq(stage.require("cfg"), "first")
eq(stage.load("cfg"), "second", "stage.load of the same file does reload")
done()
