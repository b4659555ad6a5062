-- POST with a fresh Idempotency-Key on every request: every request is a leader.
-- Keys: <run nonce>-<thread id>-<counter>; the nonce (first script argument) keeps keys of
-- different runs against one idem apart.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "report.lua")

local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local nonce, counter = "run", 0
local body = '{"order":42,"item":"benchmark"}'
local headers = { ["Content-Type"] = "application/json" }
function init(args)
  nonce = args[1] or nonce
end

function request()
  counter = counter + 1
  headers["Idempotency-Key"] = nonce .. "-" .. tid .. "-" .. counter
  return wrk.format("POST", nil, headers, body)
end
