-- Shared by the bench scripts: one machine-readable line at the end of a wrk run.
function done(summary, latency, requests)
  local secs = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format(
    "RESULT rps=%.0f p50_us=%d p99_us=%d requests=%d non2xx=%d errors=%d\n",
    summary.requests / secs, latency:percentile(50), latency:percentile(99),
    summary.requests, e.status, e.connect + e.read + e.write + e.timeout))
end
