-- The embedded database example: SQLite through ODBC (the "GAME" connection of
-- conf/stage.json, file data/game.db), no server needed. Every odbc call yields, so the
-- instance keeps serving other callbacks while the database works.
local M = {}

-- Creates the table on first run and records this start; returns the number of starts.
function M.record_start(who)
    return odbc.new("GAME", function (adp)
        adp.execute([[CREATE TABLE IF NOT EXISTS starts (
            id INTEGER PRIMARY KEY AUTOINCREMENT, who TEXT, at TEXT)]])
        -- fetch keyed by id, add a row with key 0 (the database picks the id), apply.
        local rs = adp.execute({ "SELECT id, who, at FROM starts WHERE who = ?", "c" }, who)
        local rows = rs.fetch({ "id" })
        rows[0] = { who = who, at = os.date("!%Y-%m-%d %H:%M:%S") }
        local ai_keys = rs.apply(rows)
        local total = adp.query("SELECT COUNT(*) AS n FROM starts")[1].n
        logger.info("start #" .. ai_keys[1] .. " recorded in data/game.db (" .. total .. " in all)")
        return total
    end)
end

return M
