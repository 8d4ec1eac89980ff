-- wrk -s bench/wrk_post.lua URL -- BODY_FILE [CONTENT_TYPE]
-- POSTs the bytes of BODY_FILE with CONTENT_TYPE (default application/python-pickle) on every
-- request, and prints one machine-readable line at the end: WRK_JSON {...} (latencies in us).

function init(args)
   local path = args[1]
   if path == nil then
      error("usage: wrk -s wrk_post.lua URL -- BODY_FILE [CONTENT_TYPE]")
   end
   local file = assert(io.open(path, "rb"))
   wrk.body = file:read("*a")
   file:close()
   wrk.method = "POST"
   wrk.headers["Content-Type"] = args[2] or "application/python-pickle"
end

function done(summary, latency, requests)
   local errors = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, ' ..
      '"read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, ' ..
      '"p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f, "max_us": %d}\n',
      summary.requests, summary.duration, summary.bytes, errors.connect, errors.read,
      errors.write, errors.status, errors.timeout, latency:percentile(50),
      latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
