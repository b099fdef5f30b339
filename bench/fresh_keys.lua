-- wrk script: every request polls a job key never seen before, so neither pollguard's memory of
-- recent records nor a cache can answer it: each guarded 202 needs its Redis round trip.
local run = os.getenv("BENCH_RUN") or "run"
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, "/pending/" .. run .. "-" .. counter)
end
