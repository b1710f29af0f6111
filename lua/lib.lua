-- keypool shared library: prepended to every script before it is loaded, so each
-- script is still one EVALSHA, one round trip, one atomic step.
--
-- Every script receives the same nine provider-level keys, all under one hash tag
-- "<ns>:{<provider>}:" so that they live in one cluster slot:
--   KEYS[1] meta    hash  epoch, created
--   KEYS[2] all     set   every registered key id
--   KEYS[3] wait    zset  key ids that are unavailable for now; score = ms when to look again
--   KEYS[4] leases  zset  "<key_id>/<lease_id>"; score = expiry, ms
--   KEYS[5] rr      zset  available key ids; score = rotation pass       (round_robin)
--   KEYS[6] wrr     zset  available key ids; score = weighted pass       (weighted)
--   KEYS[7] best    zset  available key ids; score = errors, then usage  (best)
--   KEYS[8] busy    zset  available key ids; score = in-flight, then pass (least_busy)
--   KEYS[9] lat     zset  available key ids; score = latency, then pass  (latency)
-- ARGV[1] is the same prefix "<ns>:{<provider>}:"; per-key names derive from it (same slot):
--   <prefix>k:<key_id>   hash  the key's configuration and state
--   <prefix>kl:<key_id>  zset  the key's open leases; score = expiry, ms
--   <prefix>m:<model>    set   key ids assigned to a model
-- All time is Redis TIME, in milliseconds.

local K_META, K_ALL, K_WAIT, K_LEASES = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_RR, K_WRR, K_BEST, K_BUSY, K_LAT = KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local STRATEGY_ZSETS = { K_RR, K_WRR, K_BEST, K_BUSY, K_LAT }
local STRATEGY_INDEX = { round_robin = 5, weighted = 6, best = 7, least_busy = 8, latency = 9 }
local PREFIX = ARGV[1]

local NEVER = 1e300
local MINUTE, DAY = 60000, 86400000
local HI = 1099511627776   -- 2^40: separates a score's primary part from its tie-breaker
local LO = 1048576         -- 2^20

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end

local function key_hash(id) return PREFIX .. 'k:' .. id end
local function key_leases(id) return PREFIX .. 'kl:' .. id end
local function model_set(model) return PREFIX .. 'm:' .. model end

-- Numbers written to hashes: integers plainly, fractions with enough digits.
local function n2s(x)
  if x == math.floor(x) and x > -1e15 and x < 1e15 then return string.format('%d', x) end
  return string.format('%.17g', x)
end

local function num(v, default)
  if v == false or v == nil or v == '' then return default end
  return tonumber(v) or default
end

local FIELDS = { 'en', 'until', 'why', 'rpm', 'tpm', 'rpd', 't_rpm', 't_tpm', 't_rpd',
  'maxc', 'inflight', 'circ', 'probe_until', 'pass', 'wpass', 'consec', 'total', 'lat',
  'weight', 'fp' }

-- The key's state as a table, or nil when the key is not registered.
local function load(id)
  local v = redis.call('HMGET', key_hash(id), unpack(FIELDS))
  if not v[1] then return nil end
  return {
    id = id, en = v[1], ['until'] = num(v[2], 0), why = v[3] or '',
    rpm = num(v[4], 0), tpm = num(v[5], 0), rpd = num(v[6], 0),
    t_rpm = num(v[7], 0), t_tpm = num(v[8], 0), t_rpd = num(v[9], 0),
    maxc = num(v[10], 0), inflight = num(v[11], 0), circ = v[12] or '',
    probe_until = num(v[13], 0), pass = num(v[14], 0), wpass = num(v[15], 0),
    consec = num(v[16], 0), total = num(v[17], 0), lat = num(v[18], 0),
    weight = num(v[19], 1), fp = v[20] or '',
  }
end

-- GCRA: when could a request costing n units be admitted by a budget of `limit` units
-- per `period` ms whose theoretical arrival time is `tat`? Returns the time, or NEVER.
local function budget_at(limit, period, tat, n)
  if limit <= 0 then return 0 end
  if n > limit then return NEVER end
  return tat + n * (period / limit) - period
end

-- The new theoretical arrival time after charging n units.
local function budget_charge(limit, period, tat, n, now)
  if limit <= 0 then return tat end
  return math.max(tat, now) + n * (period / limit)
end

-- Units a budget still admits right now.
local function budget_left(limit, period, tat, now)
  if limit <= 0 then return -1 end
  local used = math.max(tat, now) - now
  return math.max(0, math.floor((period - used) / (period / limit) + 1e-9))
end

-- When the key's earliest own lease expires (for a key full of leases).
local function first_lease_expiry(id)
  local first = redis.call('ZRANGE', key_leases(id), 0, 0, 'WITHSCORES')
  if first[2] then return tonumber(first[2]) end
  return 0
end

-- When could the key take a request again (ignoring request size)? 0 = now, NEVER = not
-- before an operator acts. Also says why.
local function available_at(s, now)
  if s.en == '0' then return NEVER, 'disabled' end
  local at, why = 0, ''
  if s['until'] > now then at, why = s['until'], s.why end
  if s.circ == 'half' and s.probe_until > now and s.probe_until > at then
    at, why = s.probe_until, 'probe'
  end
  local b = budget_at(s.rpm, MINUTE, s.t_rpm, 1)
  if b > now and b > at then at, why = b, 'rpm' end
  b = budget_at(s.tpm, MINUTE, s.t_tpm, 0)
  if b > now and b > at then at, why = b, 'tpm' end
  b = budget_at(s.rpd, DAY, s.t_rpd, 1)
  if b > now and b > at then at, why = b, 'rpd' end
  if s.maxc > 0 and s.inflight >= s.maxc then
    b = first_lease_expiry(s.id)
    if b > at then at, why = b, 'concurrency' end
  end
  if at <= now then return 0, '' end
  return at, why
end

local function min_score(zset)
  local first = redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')
  if first[2] then return tonumber(first[2]) end
  return nil
end

local function scores(s)
  local consec = math.min(s.consec, 8191)
  return {
    s.pass,
    s.wpass,
    consec * HI + math.min(s.total, HI - 1),
    math.min(s.inflight, 8191) * HI + (s.pass % HI),
    math.min(math.floor(s.lat), 4294967295) * LO + (s.pass % LO),
  }
end

-- Put the key where its state says: in the strategy sets when available, in `wait` with the
-- time to look again when cooling, nowhere when disabled. Returns available_at, why.
local function place(s, now)
  local at, why = available_at(s, now)
  if at == 0 then
    if not redis.call('ZSCORE', K_RR, s.id) then
      -- Re-joining the rotation: never behind the keys that stayed, so it cannot monopolise.
      local floor_rr, floor_wrr = min_score(K_RR), min_score(K_WRR)
      local changed = false
      if floor_rr and s.pass < floor_rr then s.pass = floor_rr; changed = true end
      if floor_wrr and s.wpass < floor_wrr then s.wpass = floor_wrr; changed = true end
      if changed then
        redis.call('HSET', key_hash(s.id), 'pass', n2s(s.pass), 'wpass', n2s(s.wpass))
      end
    end
    local sc = scores(s)
    for i = 1, 5 do redis.call('ZADD', STRATEGY_ZSETS[i], sc[i], s.id) end
    redis.call('ZREM', K_WAIT, s.id)
  else
    for i = 1, 5 do redis.call('ZREM', STRATEGY_ZSETS[i], s.id) end
    if at >= NEVER then
      redis.call('ZREM', K_WAIT, s.id)
    else
      redis.call('ZADD', K_WAIT, at, s.id)
    end
  end
  return at, why
end

-- Drop a lease; returns true when it was open.
local function drop_lease(id, lease_id)
  if lease_id == '' then return false end
  local removed = redis.call('ZREM', K_LEASES, id .. '/' .. lease_id)
  redis.call('ZREM', key_leases(id), lease_id)
  local n = redis.call('ZCARD', key_leases(id))
  redis.call('HSET', key_hash(id), 'inflight', n)
  return removed == 1
end

-- Free leases whose holder did not report in time (a crashed or hung process).
local function reap_leases(now)
  local expired = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, 256)
  for i = 1, #expired do
    local member = expired[i]
    local slash = string.find(member, '/', 1, true)
    local id, lease_id = string.sub(member, 1, slash - 1), string.sub(member, slash + 1)
    redis.call('ZREM', K_LEASES, member)
    if redis.call('EXISTS', key_hash(id)) == 1 then
      drop_lease(id, lease_id)
      local s = load(id)
      if s then place(s, now) end
    end
  end
end

-- Bring back the keys whose cooldown, budget refill or lease expiry has come.
local function promote(now)
  for _ = 1, 8 do
    local due = redis.call('ZRANGEBYSCORE', K_WAIT, '-inf', now, 'LIMIT', 0, 128)
    if #due == 0 then return end
    for i = 1, #due do
      local s = load(due[i])
      if s then place(s, now) else redis.call('ZREM', K_WAIT, due[i]) end
    end
  end
end
