-- wrk script: spread /pending requests over many job keys, as many users polling their own
-- jobs would, so a per-key cache in the proxy cannot turn the guarded path into a no-op.
local keys = tonumber(os.getenv("BENCH_PENDING_KEYS") or "1000")
-- /pending/ is guarded on pollguard; /open/ is the same answer on a route no job guards.
local prefix = os.getenv("BENCH_PENDING_PREFIX") or "/pending/job"
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, prefix .. (counter % keys))
end
