-- Sends pre-signed, distinct Qonto webhooks (one per line of the file in WEBHOOKS_FILE:
-- "<X-Qonto-Signature>\t<body>"), each wrk thread taking every Nth line so no event is sent twice.
-- done() prints one JSON line with what the Python harness needs.
local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
  table.insert(threads, thread)
end

function init(args)
  local path = os.getenv("WEBHOOKS_FILE")
  local nthreads = tonumber(os.getenv("WRK_THREADS"))
  sigs, bodies = {}, {}
  local i = 0
  for line in io.lines(path) do
    if i % nthreads == id - 1 then
      local tab = line:find("\t", 1, true)
      table.insert(sigs, line:sub(1, tab - 1))
      table.insert(bodies, line:sub(tab + 1))
    end
    i = i + 1
  end
  n = 0
  statuses = {}
end

function request()
  n = n + 1
  local k = ((n - 1) % #bodies) + 1
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["X-Qonto-Signature"] = sigs[k],
  }, bodies[k])
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local accepted = 0
  for _, thread in ipairs(threads) do
    local s = thread:get("statuses")
    if s and s[202] then accepted = accepted + s[202] end
  end
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "accepted": %d, "non_2xx": %d, "socket_errors": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, accepted, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
