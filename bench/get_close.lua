-- GET on a new connection per request (`Connection: close`): over TLS, a full handshake
-- per request, so req/s here is handshakes per second.
wrk.headers["Connection"] = "close"
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "report.lua")
