-- GET pass-through: wrk's prebuilt request; only the report is added.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "report.lua")
