-- POST replayed: the same Idempotency-Key and body every time (wrk's prebuilt request).
-- The first request stores the response; every later one is a replay.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "report.lua")

wrk.method = "POST"
wrk.body = '{"order":42,"item":"benchmark"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Idempotency-Key"] = "bench-replay"
