-- wrk script for bench/bench_daemon.py: alternate POST /v1/buffers (64 KiB) and DELETE of a
-- buffer this thread allocated, with one client token (SHAREDPOOL_TOKEN; empty for the
-- trivial server, which ignores it). A 201 answer queues its id; the next request a
-- connection sends frees a queued id if there is one, else allocates: every connection
-- alternates, and live buffers never exceed the connection count.
local token = os.getenv("SHAREDPOOL_TOKEN") or ""
local auth = {}
if token ~= "" then auth["Authorization"] = "Bearer " .. token end
local post_headers = {["Content-Type"] = "application/json"}
for k, v in pairs(auth) do post_headers[k] = v end
local body = '{"size": 65536, "purpose": "bench"}'
local ids = {}

request = function()
  local n = #ids
  if n > 0 then
    local id = ids[n]
    ids[n] = nil
    return wrk.format("DELETE", "/v1/buffers/" .. id, auth)
  end
  return wrk.format("POST", "/v1/buffers", post_headers, body)
end

response = function(status, headers, resp_body)
  if status == 201 then
    local id = resp_body:match('"id":%s*(%d+)')
    if id then ids[#ids + 1] = id end
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"errors": %d, "non2xx": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
