-- wrk script: POST AdmissionReviews to /mutate over keep-alive, cycling the bodies of
-- BENCH_BODIES (one JSON body per line). BENCH-UID-PLACEHOLDER (request.uid, and in the
-- unique-pod mix also a pod annotation) becomes a uid of its own per request;
-- BENCH-START-PLACEHOLDER (a pod annotation in the test-starts mix) becomes a number that is
-- new on each pass through the bodies, so each pass starts every test anew. Both carry
-- BENCH_RUN, a number of its own per wrk run: without it a run would send the same values as
-- the run before it, and the webhook could answer its first passes from what it remembered.
--
-- BENCH_RATE unset or 0: closed loop (each connection sends as soon as it has its answer).
-- BENCH_RATE=R: paced at R requests/s in total, evenly over the threads (run it with one
--   connection per thread: -t N -c N). Debian's wrk has no -R (wrk2), so delay() holds each
--   request until its slot on the schedule, and response() also measures latency from that
--   intended send time (or from the actual send when it went out early), so that a slow answer
--   that delays the next requests counts against the server (coordinated omission). wrk's own
--   latency, from the actual send, is reported too.
--
-- done() prints one line "BENCH_JSON {...}" for bench/run.py.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_us()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000000 + tonumber(ts.tv_nsec) / 1000
end

local UID, START = "BENCH-UID-PLACEHOLDER", "BENCH-START-PLACEHOLDER"
local rate = tonumber(os.getenv("BENCH_RATE") or "0") or 0
local run = tonumber(os.getenv("BENCH_RUN") or "0") or 0
local bodies_file = os.getenv("BENCH_BODIES")
local headers = { ["Content-Type"] = "application/json", ["Connection"] = "keep-alive" }

-- bodies[k]: the text between placeholders (parts) and which placeholder follows each (slots)
local bodies, count = {}, 0
local function load_bodies()
  local file = assert(io.open(bodies_file, "rb"), "BENCH_BODIES: cannot open " .. tostring(bodies_file))
  for line in file:lines() do
    if #line > 0 then
      local parts, slots, from, has_uid = {}, {}, 1, false
      while true do
        local at_uid = string.find(line, UID, from, true)
        local at_start = string.find(line, START, from, true)
        local at, slot = at_uid, UID
        if at_start ~= nil and (at == nil or at_start < at) then at, slot = at_start, START end
        if at == nil then break end
        parts[#parts + 1] = string.sub(line, from, at - 1)
        slots[#slots + 1] = slot
        has_uid = has_uid or slot == UID
        from = at + #slot
      end
      assert(has_uid, "a body has no uid placeholder")
      parts[#parts + 1] = string.sub(line, from)
      count = count + 1
      bodies[count] = { parts = parts, slots = slots }
    end
  end
  file:close()
  assert(count > 0, "BENCH_BODIES has no bodies")
end

-- main state: number the threads, keep them for done()
local threads, thread_count = {}, 0
function setup(thread)
  thread_count = thread_count + 1
  thread:set("id", thread_count)
  threads[thread_count] = thread
end

-- per-thread state
local sent, pass = 0, 0
local interval, next_slot, pending, start = 0, nil, nil, nil
lats, nlat, bad = {}, 0, 0

function init(args)
  load_bodies()
  sent = 0
  if rate > 0 then
    local nthreads = tonumber(os.getenv("BENCH_THREADS") or "1")
    interval = 1000000 * nthreads / rate
    -- Spread the threads' schedules over one interval: no synchronized bursts.
    next_slot = now_us() + 50000 + (id - 1) * interval / nthreads
  end
end

function request()
  local k = (sent % count) + 1
  if k == 1 then pass = pass + 1 end
  sent = sent + 1
  local values = {
    [UID] = string.format("%08x-%04x-4000-8000-%012x", id, run % 65536, sent),
    [START] = string.format("%d-%d-%d", run, id, pass),
  }
  local body, out = bodies[k], {}
  for i, slot in ipairs(body.slots) do
    out[2 * i - 1] = body.parts[i]
    out[2 * i] = values[slot]
  end
  out[#out + 1] = body.parts[#body.parts]
  if rate > 0 then
    local t = now_us()
    if pending ~= nil and pending < t then start = pending else start = t end
    pending = nil
  end
  return wrk.format("POST", "/mutate", headers, table.concat(out))
end

if rate > 0 then
  function delay()
    local t = now_us()
    local slot = next_slot
    next_slot = next_slot + interval
    pending = slot
    local ms = (slot - t) / 1000
    if ms < 1 then return 0 end
    return math.floor(ms)
  end

  function response(status, hdrs, body)
    if status ~= 200 or not string.find(body, '"allowed":true', 1, true) then
      bad = bad + 1
    end
    if start ~= nil then
      nlat = nlat + 1
      lats[nlat] = now_us() - start
      start = nil
    end
  end
end

local function percentile(sorted, p)
  if #sorted == 0 then return 0 end
  local index = math.ceil(#sorted * p / 100)
  if index < 1 then index = 1 end
  return sorted[index]
end

local function encode(fields)
  local parts = {}
  for key, value in pairs(fields) do
    parts[#parts + 1] = string.format('"%s":%s', key, tostring(value))
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

function done(summary, latency, requests)
  local e = summary.errors
  local out = {
    requests = summary.requests,
    duration_us = summary.duration,
    bytes = summary.bytes,
    err_connect = e.connect,
    err_read = e.read,
    err_write = e.write,
    err_status = e.status,
    err_timeout = e.timeout,
    p50_us = latency:percentile(50),
    p90_us = latency:percentile(90),
    p99_us = latency:percentile(99),
    p999_us = latency:percentile(99.9),
    max_us = latency.max,
    mean_us = latency.mean,
    rate = rate,
  }
  if rate > 0 then
    local all, n, bad_total = {}, 0, 0
    for _, thread in ipairs(threads) do
      bad_total = bad_total + (thread:get("bad") or 0)
      local thread_lats = thread:get("lats") or {}
      for _, v in ipairs(thread_lats) do
        n = n + 1
        all[n] = v
      end
    end
    table.sort(all)
    out.co_samples = n
    out.co_p50_us = percentile(all, 50)
    out.co_p90_us = percentile(all, 90)
    out.co_p99_us = percentile(all, 99)
    out.co_max_us = all[n] or 0
    out.bad_answers = bad_total
  end
  io.write("BENCH_JSON " .. encode(out) .. "\n")
end
