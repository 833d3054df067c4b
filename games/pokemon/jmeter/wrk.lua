-- The game's plans for wrk (Debian's wrk 4.1, LuaJIT), for the rates JMeter cannot offer
-- on a small machine: the same steps, players and think times as the JMeter plans, at a
-- small fraction of JMeter's CPU per request.
--
-- Each wrk thread holds one keep-alive connection and stands for one JMeter thread: each
-- iteration plays the next of its players (every THREADS-th line of the CSV, from its own
-- offset) through the plan's steps, thinking `pause_ms + uniform(0, pause_jitter_ms)` ms
-- before each request. Every request is written to a CSV .jtl with JMeter's columns, one
-- file per thread, so that bench.jmeter.parse_jtl reads wrk's runs as it reads JMeter's.
-- A request whose connection failed before its answer is written as a failed sample.
--
-- Settings come from the environment (bench.jmeter sets them): ENORM_PLAYERS (the CSV
-- uid,token,lat,lng,src), ENORM_STEPS (one step a line: label TAB method TAB path TAB
-- body, `${lat}` / `${lng}` replaced by the player's), ENORM_JTL (a prefix:
-- `<prefix>.<thread>.jtl`), ENORM_PAUSE_MS, ENORM_PAUSE_JITTER_MS.

local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } enorm_timespec;
  int clock_gettime(int clock, enorm_timespec *ts);
]]
local ts = ffi.new("enorm_timespec")
local function now_ms() -- wall clock, as JMeter's time stamps
  ffi.C.clock_gettime(0, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local function lines(path)
  local out = {}
  for line in io.lines(path) do
    if line ~= "" then out[#out + 1] = line end
  end
  return out
end

-- setup phase (its own Lua state): each thread gets its share of the players
local all, nthreads, next_id = nil, tonumber(os.getenv("ENORM_THREADS")), 0

-- a flat list (uid, token, lat, lng, uid, ...): thread:set copies no nested table
local function add_player(mine, line)
  local uid, token, lat, lng = line:match("^([^,]*),([^,]*),([^,]*),([^,]*)")
  for _, v in ipairs({ uid, token, lat, lng }) do mine[#mine + 1] = v end
end

function setup(thread)
  all = all or lines(os.getenv("ENORM_PLAYERS"))
  local k, mine = next_id, {}
  next_id = next_id + 1
  for i = k + 1, #all, nthreads do add_player(mine, all[i]) end
  if #mine == 0 then add_player(mine, all[k % #all + 1]) end -- more threads than players
  thread:set("id", k)
  thread:set("players", mine)
end

-- running phase (one Lua state per thread)
local steps, jtl, pending = {}, nil, nil
local player, step = 1, 1
local pause, jitter = 0, 0

function init(args)
  for _, line in ipairs(lines(os.getenv("ENORM_STEPS"))) do
    local label, method, path, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t?(.*)$")
    steps[#steps + 1] = { label = label, method = method, path = path, body = body }
  end
  pause = tonumber(os.getenv("ENORM_PAUSE_MS") or "0")
  jitter = tonumber(os.getenv("ENORM_PAUSE_JITTER_MS") or "0")
  jtl = io.open(os.getenv("ENORM_JTL") .. "." .. id .. ".jtl", "w")
  jtl:setvbuf("full")
  jtl:write("timeStamp,elapsed,label,responseCode,success,bytes\n")
  math.randomseed(id * 7919 + 1)
end

local function record(code, ok, bytes) -- the pending request's sample; on to the next step
  jtl:write(string.format("%d,%d,%s,%s,%s,%d\n", pending.start, now_ms() - pending.start,
    pending.label, code, ok and "true" or "false", bytes))
  pending = nil
  step = step + 1
  if step > #steps then -- the next player's iteration
    step = 1
    player = player % (#players / 4) + 1
  end
end

function delay()
  -- wrk asks thread 0 for one request before it starts, to check it, and never sends
  -- it: a request still pending here is that one (a sent one has had its response)
  pending = nil
  if jitter <= 0 then return pause end
  return pause + math.random() * jitter
end

function request()
  if pending then record("connection", false, 0) end -- reset or closed before the answer
  local p, s = (player - 1) * 4, steps[step]
  local body = nil
  if s.body ~= "" then
    body = s.body:gsub("%${lat}", players[p + 3]):gsub("%${lng}", players[p + 4])
  end
  pending = { start = now_ms(), label = s.label }
  return wrk.format(s.method, s.path, {
    ["X-User"] = players[p + 1], ["X-Token"] = players[p + 2],
    ["Content-Type"] = "application/json",
  }, body)
end

function response(status, headers, body)
  if pending then record(status, status < 400, #body) end
end

function done(summary, latency, requests)
  -- wrk's own count of socket errors (a connect error has no request to record)
  local e = summary.errors
  io.stderr:write(string.format(
    "wrk-summary requests=%d connect=%d read=%d write=%d timeout=%d status=%d\n",
    summary.requests, e.connect, e.read, e.write, e.timeout, e.status))
end
