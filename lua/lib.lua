-- keypool shared library. Loaded once with every script as one Redis function library
-- (FCALL), or, where functions are not available, prepended to each script (EVALSHA);
-- either way each call is one round trip, one atomic step. Each script's body is a
-- function of (KEYS, ARGV) run after begin(KEYS, ARGV).
--
-- Every script receives the same nine provider-level keys, all under one hash tag
-- "<ns>:{<provider>}:" so that they live in one cluster slot:
--   KEYS[1] meta    hash  epoch, created, zs (strategy sets kept up to date), due (ms of
--                         the next expected lease expiry or cooldown end: housekeeping)
--   KEYS[2] all     set   every registered key id
--   KEYS[3] wait    zset  key ids that are unavailable for now; score = ms when to look again
--   KEYS[4] leases  zset  "<key_id>/<lease_id>"; score = expiry, ms
--   KEYS[5] rr      zset  available key ids; score = when last served    (round_robin)
--   KEYS[6] wrr     zset  available key ids; score = weighted pass       (weighted)
--   KEYS[7] best    zset  available key ids; score = errors, then usage  (best)
--   KEYS[8] busy    zset  available key ids; score = in-flight, then last served (least_busy)
--   KEYS[9] lat     zset  available key ids; score = latency ms, then last served (latency)
-- The rr set is always kept; the other four are built the first time their strategy is
-- used and kept from then on (meta `zs` lists them), so unused strategies cost nothing.
-- ARGV[1] is the same prefix "<ns>:{<provider>}:"; per-key names derive from it (same slot):
--   <prefix>k:<key_id>   hash  the key's configuration and state
--   <prefix>kl:<key_id>  zset  the key's open leases (only for keys with max_concurrency)
--   <prefix>m:<model>    set   key ids assigned to a model
-- A key hash's `loc` says where the key is: 'r' in the strategy sets, 'w' in wait,
-- '' nowhere (disabled). All time is Redis TIME, in milliseconds.

-- The call's keys and the pool's meta state: set by begin() at the start of every call
-- (the library is loaded once as Redis functions, or prepended to each script).
local K_META, K_ALL, K_WAIT, K_LEASES, STRATEGY_ZSETS, PREFIX
local EPOCH, ACTIVE, ACTIVE_SET, DUE
local BEGUN_META, BEGUN_ZS   -- what KEYS[1] and the meta `zs` were when those were made
local STRATEGY_INDEX = { round_robin = 1, weighted = 2, best = 3, least_busy = 4, latency = 5 }

local NEVER = 1e300
local MINUTE, DAY = 60000, 86400000
local HI = 1099511627776   -- 2^40: separates a score's primary part from its tie-breaker
local EPOCH_US = 1704067200000000  -- 2024-01-01: `pass` (last served) counts µs from here
-- Scores written to sorted sets are whole numbers (ms, or µs for `pass`): Redis turns a
-- fractional Lua number into a 17-digit string for every call, which costs more than the
-- ZADD itself.

local NOW_US = 0   -- the call's TIME in µs (set by now_ms)
local function now_ms()
  local t = redis.call('TIME')
  NOW_US = tonumber(t[1]) * 1000000 + tonumber(t[2])
  return NOW_US / 1000
end

local function key_hash(id) return PREFIX .. 'k:' .. id end
local function key_leases(id) return PREFIX .. 'kl:' .. id end
local function model_set(model) return PREFIX .. 'm:' .. model end

local function num(v, default)
  if v == false or v == nil or v == '' then return default end
  return tonumber(v) or default
end

-- Remember the earliest time housekeeping has work to do.
local function note_due(at)
  if at < DUE then
    DUE = at
    redis.call('HSET', K_META, 'due', at)
  end
end

-- A key's numbers and short states live packed in one hash field, `st`: little-endian
-- doubles in PACKED's order (en: 1/0; circ: 0 '', 1 open, 2 half; loc: 0 '', 1 r, 2 w),
-- so a call reads and writes one field instead of thirty. (A Lua without the `struct`
-- library, as in the embedded store, keeps them as space-separated text instead.) Text stays in fields of its
-- own: id, fp, sealed, why, models, created, last_error, last_error_at, disabled_reason,
-- e:<kind> (error counts). stats() and `keypool status` show every value by name.
local PACKED = { 'en', 'until', 'rpm', 'tpm', 'rpd', 't_rpm', 't_tpm', 't_rpd', 'maxc',
  'inflight', 'circ', 'probe_until', 'pass', 'wpass', 'consec', 'total', 'lat', 'weight',
  'loc', 'ok', 'err', 'lat_n', 'tokens', 'rl_strikes', 'opens', 'last_used', 'last_ok' }
local N_PACKED = #PACKED
local PACKED_FMT = '<ddddddddddddddddddddddddddd'   -- N_PACKED doubles
local PACKED_AT = {}
for i = 1, N_PACKED do PACKED_AT[PACKED[i]] = i end
local ENCODE = {
  en = { ['0'] = 0, ['1'] = 1 },
  circ = { [''] = 0, open = 1, half = 2 },
  loc = { [''] = 0, r = 1, w = 2 },
}
local DECODE = {
  en = { [0] = '0', [1] = '1' },
  circ = { [0] = '', [1] = 'open', [2] = 'half' },
  loc = { [0] = '', [1] = 'r', [2] = 'w' },
}

-- The key's state as a table, or nil when the key is not registered. (Written out field
-- by field, in PACKED's order: one table built at once is much cheaper than a loop.)
local function load(id)
  local v = redis.call('HMGET', key_hash(id), 'st', 'fp', 'why', 'sealed')
  if not v[2] then return nil end
  if v[1] and struct then
    local v_en, v_until, v_rpm, v_tpm, v_rpd, v_t_rpm, v_t_tpm, v_t_rpd, v_maxc, v_inflight,
      v_circ, v_probe_until, v_pass, v_wpass, v_consec, v_total, v_lat, v_weight, v_loc, v_ok,
      v_err, v_lat_n, v_tokens, v_rl_strikes, v_opens, v_last_used, v_last_ok =
      struct.unpack(PACKED_FMT, v[1])
    return {
      id = id, fp = v[2], why = v[3] or '', sealed = v[4] or '',
      en = DECODE.en[v_en] or '1', ['until'] = v_until, rpm = v_rpm, tpm = v_tpm, rpd = v_rpd,
      t_rpm = v_t_rpm, t_tpm = v_t_tpm, t_rpd = v_t_rpd, maxc = v_maxc, inflight = v_inflight,
      circ = DECODE.circ[v_circ] or '', probe_until = v_probe_until, pass = v_pass,
      wpass = v_wpass, consec = v_consec, total = v_total, lat = v_lat, weight = v_weight,
      loc = DECODE.loc[v_loc] or '', ok = v_ok, err = v_err, lat_n = v_lat_n,
      tokens = v_tokens, rl_strikes = v_rl_strikes, opens = v_opens, last_used = v_last_used,
      last_ok = v_last_ok,
    }
  end
  local s = { id = id, fp = v[2], why = v[3] or '', sealed = v[4] or '' }
  if v[1] then   -- packed as text (a Lua without struct)
    local t = {}
    for w in string.gmatch(v[1], '%S+') do t[#t + 1] = tonumber(w) end
    for i = 1, N_PACKED do s[PACKED[i]] = t[i] or 0 end
    s.en = DECODE.en[s.en] or '1'
    s.circ = DECODE.circ[s.circ] or ''
    s.loc = DECODE.loc[s.loc] or ''
    return s
  end
  -- No packed state: a key being created, or one written by an earlier keypool that kept
  -- each number in a field of its own (moved into `st` by its next write).
  local old = redis.call('HMGET', key_hash(id), unpack(PACKED))
  local found = false
  for i = 1, N_PACKED do
    local name = PACKED[i]
    if old[i] then found = true end
    if ENCODE[name] then s[name] = old[i] or '' else s[name] = tonumber(old[i]) or 0 end
  end
  if s.en ~= '0' then s.en = '1' end
  if s.weight <= 0 then s.weight = 1 end
  if found then
    s.unpacked = true
    s.pass = s.pass * 1000   -- it counted ms then
  end
  return s
end

-- Drop the fields an earlier keypool kept each number in, once `st` holds them.
local function drop_unpacked(s)
  if s.unpacked then
    redis.call('HDEL', key_hash(s.id), unpack(PACKED))
    s.unpacked = nil
  end
end

local function pack_state(s)
  if struct then
    return struct.pack(PACKED_FMT,
      ENCODE.en[s.en] or 0, s['until'], s.rpm, s.tpm, s.rpd, s.t_rpm, s.t_tpm, s.t_rpd, s.maxc,
      s.inflight, ENCODE.circ[s.circ] or 0, s.probe_until, s.pass, s.wpass, s.consec, s.total,
      s.lat, s.weight, ENCODE.loc[s.loc] or 0, s.ok, s.err, s.lat_n, s.tokens, s.rl_strikes,
      s.opens, s.last_used, s.last_ok)
  end
  local t = {}
  for i = 1, N_PACKED do
    local name = PACKED[i]
    local code = ENCODE[name]
    if code then t[i] = code[s[name]] or 0 else t[i] = tonumber(s[name]) or 0 end
    t[i] = string.format('%.17g', t[i])
  end
  return table.concat(t, ' ')
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
  first = redis.call('ZRANGE', K_LEASES, 0, 0, 'WITHSCORES')
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

local function score(s, i)
  if i == 1 then return s.pass end
  if i == 2 then return s.wpass end
  if i == 3 then return math.min(s.consec, 8191) * HI + math.min(s.total, HI - 1) end
  local served_ms = math.floor(s.pass / 1000) % HI
  if i == 4 then return math.min(s.inflight, 8191) * HI + served_ms end
  return math.min(math.floor(s.lat), 8191) * HI + served_ms
end

-- Put the key where its state says: in the strategy sets when available, in `wait` with
-- the time to look again when not, nowhere when disabled. `fields` collects the hash
-- fields the caller writes afterwards; `rescore` (when the key stays available) names
-- whether its scores changed. Returns available_at, why.
local function place(s, now, fields, rescore)
  local at, why = available_at(s, now)
  if at == 0 then
    if s.loc ~= 'r' then
      -- Joining the weighted rotation at its current pass, so it cannot monopolise it.
      -- (The plain rotation is least-recently-served order: a key coming back is served
      -- once, then queues behind the others.)
      if ACTIVE_SET[2] then
        local floor_wrr = min_score(STRATEGY_ZSETS[2])
        if floor_wrr and s.wpass < floor_wrr then s.wpass = floor_wrr; fields[#fields + 1] = 'wpass'; fields[#fields + 1] = s.wpass end
      end
      for j = 1, #ACTIVE do redis.call('ZADD', STRATEGY_ZSETS[ACTIVE[j]], score(s, ACTIVE[j]), s.id) end
      if s.loc == 'w' then redis.call('ZREM', K_WAIT, s.id) end
      s.loc = 'r'
      fields[#fields + 1] = 'loc'; fields[#fields + 1] = 'r'
    elseif rescore then
      for j = 1, #ACTIVE do
        local i = ACTIVE[j]
        if rescore == 'all' or i > 2 then redis.call('ZADD', STRATEGY_ZSETS[i], score(s, i), s.id) end
      end
    end
  else
    if s.loc == 'r' then
      for j = 1, #ACTIVE do redis.call('ZREM', STRATEGY_ZSETS[ACTIVE[j]], s.id) end
    end
    if at >= NEVER then
      if s.loc == 'w' then redis.call('ZREM', K_WAIT, s.id) end
      if s.loc ~= '' then fields[#fields + 1] = 'loc'; fields[#fields + 1] = '' end
      s.loc = ''
    else
      local wake = math.ceil(at)
      redis.call('ZADD', K_WAIT, wake, s.id)
      note_due(wake)
      if s.loc ~= 'w' then fields[#fields + 1] = 'loc'; fields[#fields + 1] = 'w' end
      s.loc = 'w'
    end
  end
  return at, why
end

-- Write the key's changed fields ({name, value, ...}): packed ones into `st` (and into
-- s), the others as they are.
local function flush(s, fields)
  if #fields == 0 then return end
  local plain, packed = {}, false
  for i = 1, #fields, 2 do
    local name, value = fields[i], fields[i + 1]
    if PACKED_AT[name] then
      if ENCODE[name] then s[name] = value else s[name] = tonumber(value) or 0 end
      packed = true
    else
      plain[#plain + 1] = name; plain[#plain + 1] = value
    end
  end
  if packed then
    drop_unpacked(s)
    plain[#plain + 1] = 'st'; plain[#plain + 1] = pack_state(s)
  end
  redis.call('HSET', key_hash(s.id), unpack(plain))
end

-- Write the key's packed state as it is in s.
local function save(s)
  drop_unpacked(s)
  redis.call('HSET', key_hash(s.id), 'st', pack_state(s))
end

-- Re-place a key after a change made elsewhere, writing what moved.
local function replace(s, now)
  local fields = {}
  local at, why = place(s, now, fields, 'all')
  flush(s, fields)
  return at, why
end

-- Drop a lease of the key; true when it was open. Updates s.inflight (caller writes it).
local function drop_lease(s, lease_id)
  if lease_id == '' then return false end
  if redis.call('ZREM', K_LEASES, s.id .. '/' .. lease_id) == 0 then return false end
  if s.maxc > 0 then redis.call('ZREM', key_leases(s.id), lease_id) end
  s.inflight = math.max(0, s.inflight - 1)
  return true
end

-- Free leases whose holder did not report in time (a crashed or hung process), and bring
-- back the keys whose cooldown, budget refill or lease expiry has come. Only runs when
-- something is due.
local function housekeeping(now)
  if now < DUE then return end
  local expired = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, 256)
  for i = 1, #expired do
    local member = expired[i]
    local slash = string.find(member, '/', 1, true)
    local id, lease_id = string.sub(member, 1, slash - 1), string.sub(member, slash + 1)
    local s = load(id)
    if s then
      drop_lease(s, lease_id)
      local fields = { 'inflight', s.inflight }
      place(s, now, fields, 'all')
      flush(s, fields)
    else
      redis.call('ZREM', K_LEASES, member)
    end
  end
  for _ = 1, 8 do
    local due = redis.call('ZRANGEBYSCORE', K_WAIT, '-inf', now, 'LIMIT', 0, 128)
    if #due == 0 then break end
    for i = 1, #due do
      local s = load(due[i])
      if s then
        s.loc = 'w'   -- it is in wait, whatever the hash says
        replace(s, now)
      else
        redis.call('ZREM', K_WAIT, due[i])
      end
    end
  end
  -- the next time anything is due
  local next_due = NEVER
  local w = min_score(K_WAIT)
  if w and w < next_due then next_due = w end
  local l = min_score(K_LEASES)
  if l and l < next_due then next_due = l end
  DUE = next_due
  redis.call('HSET', K_META, 'due', next_due)
end

-- Make sure the strategy's set exists (built from the available keys the first time).
local function ensure_strategy(i)
  if ACTIVE_SET[i] then return end
  local ids = redis.call('SMEMBERS', K_ALL)
  for j = 1, #ids do
    local s = load(ids[j])
    if s and s.loc == 'r' then redis.call('ZADD', STRATEGY_ZSETS[i], score(s, i), s.id) end
  end
  ACTIVE[#ACTIVE + 1] = i
  ACTIVE_SET[i] = true
  local zs = {}
  for j = 1, #ACTIVE do zs[j] = tostring(ACTIVE[j]) end
  BEGUN_ZS = table.concat(zs, ',')
  redis.call('HSET', K_META, 'zs', BEGUN_ZS)
end

-- Start a call: its keys, and the pool's meta state (read once per call). Loaded as
-- functions, the library lives on between calls: the tables made from the keys and from
-- the meta `zs` are kept while they stay the same.
local function begin(keys, args)
  if keys[1] ~= BEGUN_META then
    K_META, K_ALL, K_WAIT, K_LEASES = keys[1], keys[2], keys[3], keys[4]
    STRATEGY_ZSETS = { keys[5], keys[6], keys[7], keys[8], keys[9] }
    BEGUN_META, BEGUN_ZS = keys[1], nil
  end
  PREFIX = args[1]
  local meta = redis.call('HMGET', K_META, 'epoch', 'zs', 'due')
  EPOCH = meta[1]
  local zs = meta[2] or ''
  if zs ~= BEGUN_ZS then
    ACTIVE = { 1 }            -- indexes into STRATEGY_ZSETS kept up to date
    ACTIVE_SET = { [1] = true }
    for i in string.gmatch(zs, '%d') do
      local n = tonumber(i)
      if not ACTIVE_SET[n] then ACTIVE[#ACTIVE + 1] = n; ACTIVE_SET[n] = true end
    end
    BEGUN_ZS = zs
  end
  DUE = num(meta[3], NEVER)
end
