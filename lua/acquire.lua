-- acquire: pick an available key, count the request, charge its budgets, open a lease.
--
-- KEYS[1..9]  the provider's keys (see lib.lua)
-- ARGV[1]  key prefix "<ns>:{<provider>}:"
-- ARGV[2]  strategy: round_robin | weighted | best | least_busy | latency
-- ARGV[3]  tokens: estimated tokens to reserve on the key's tpm budget (>= 0)
-- ARGV[4]  lease ttl, ms; 0 = count the request but hold no lease
-- ARGV[5]  lease id (unique per acquire; ignored when ARGV[4] is 0)
-- ARGV[6]  model, '' for any key of the provider; a model with assigned keys is
--          served only by them
-- ARGV[7]  key id to avoid while another key is available ('' for none)
-- ARGV[8]  the pool epoch this process registered its keys under ('' to skip the check)
-- ARGV[9]  '1' when only the model's keys may serve even if it has none here (the provider
--          was found through the model), '' otherwise
-- ARGV[10] key ids this process cannot use (no secret for them here), space-separated
--
-- Reply:
--   {'OK', key_id, fingerprint, sealed_secret_or_empty, now_ms}
--   {'NONE', retry_after_ms (-1 = no key ever will), why}
--   {'LOST', current_epoch_or_empty}      the pool's state is gone or was re-created:
--                                         re-register and call again

local strategy = ARGV[2]
local tokens = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local lease_id = ARGV[5]
local model = ARGV[6]
local avoid = ARGV[7]
local want_epoch = ARGV[8]
local model_only = ARGV[9] == '1'
local unusable = {}
for id in string.gmatch(ARGV[10] or '', '%S+') do unusable[id] = true end

local zi = STRATEGY_INDEX[strategy]
if not zi then return redis.error_reply('ERR keypool: unknown strategy ' .. strategy) end
if want_epoch ~= '' and EPOCH ~= want_epoch then return { 'LOST', EPOCH or '' } end

local now = now_ms()
housekeeping(now)
ensure_strategy(zi)
local zset = STRATEGY_ZSETS[zi]

local earliest = NEVER   -- earliest time a skipped key could take this request
local why_none = 'no_keys'

-- Can the key take this request now? Parks keys that cannot take any request.
local function admits(s)
  local rpm_at = budget_at(s.rpm, MINUTE, s.t_rpm, 1)
  local rpd_at = budget_at(s.rpd, DAY, s.t_rpd, 1)
  local tpm_at = budget_at(s.tpm, MINUTE, s.t_tpm, tokens)
  local at = math.max(rpm_at, rpd_at, tpm_at)
  if at <= now then return true end
  if rpm_at > now or rpd_at > now or budget_at(s.tpm, MINUTE, s.t_tpm, 0) > now then
    replace(s, now)   -- spent for every request: out of the rotation until it refills
  end
  if at < earliest then earliest = at end
  why_none = 'budget'
  return false
end

local function take(s)
  s.t_rpm = budget_charge(s.rpm, MINUTE, s.t_rpm, 1, now)
  s.t_rpd = budget_charge(s.rpd, DAY, s.t_rpd, 1, now)
  s.t_tpm = budget_charge(s.tpm, MINUTE, s.t_tpm, tokens, now)
  -- Round-robin is least-recently-served order: exact rotation, ties impossible because
  -- each script runs at its own TIME.
  s.pass = math.max(NOW_US - EPOCH_US, s.pass + 1)
  s.wpass = s.wpass + 1 / math.max(s.weight, 1e-6)
  s.total = s.total + 1
  s.last_used = math.floor(now)
  if ttl > 0 then
    local expiry = math.floor(now) + ttl
    redis.call('ZADD', K_LEASES, expiry, s.id .. '/' .. lease_id)
    if s.maxc > 0 then redis.call('ZADD', key_leases(s.id), expiry, lease_id) end
    note_due(expiry)
    s.inflight = s.inflight + 1
  end
  if s.circ == 'open' or s.circ == 'half' then
    -- The circuit's cooldown is over: this request is its one probe.
    s.circ = 'half'
    s.probe_until = now + (ttl > 0 and ttl or 60000)
  end
  place(s, now, {}, 'all')   -- what it changes is in s, all of it packed
  save(s)
  return { 'OK', s.id, s.fp, s.sealed, math.floor(now) }
end

local fallback = nil   -- the avoided key, when it is the only one that could serve

local function consider(id)
  if unusable[id] then return nil end
  local s = load(id)
  if not s then
    for j = 1, #ACTIVE do redis.call('ZREM', STRATEGY_ZSETS[ACTIVE[j]], id) end
    return nil
  end
  if not admits(s) then return nil end
  if id == avoid then
    fallback = s
    return nil
  end
  return s
end

local function none()
  if earliest >= NEVER then
    if why_none == 'no_keys' and redis.call('SCARD', K_ALL) > 0 then why_none = 'disabled' end
    return { 'NONE', -1, why_none }
  end
  return { 'NONE', math.ceil(math.max(0, earliest - now)), why_none }
end

-- The earliest moment a waiting key could take this request (exact for its size).
-- (The wait score is that moment rounded up to the ms; the state gives it exactly.)
local function consider_waiting(id, wait_score)
  if unusable[id] then return end
  local s = load(id)
  if not s then return end
  local at, why = available_at(s, now)
  if at == 0 then at = wait_score end
  at = math.max(at, budget_at(s.tpm, MINUTE, s.t_tpm, tokens))
  if at < earliest then
    earliest = at
    why_none = (why ~= '' and why) or 'cooling'
  end
end

if model ~= '' then
  local members = redis.call('SMEMBERS', model_set(model))
  if #members > 0 then
    local ranked = {}
    for i = 1, #members do
      local sc = redis.call('ZSCORE', zset, members[i])
      if sc then ranked[#ranked + 1] = { tonumber(sc), members[i] } end
    end
    table.sort(ranked, function(a, b)
      if a[1] ~= b[1] then return a[1] < b[1] end
      return a[2] < b[2]
    end)
    for i = 1, #ranked do
      local s = consider(ranked[i][2])
      if s then return take(s) end
    end
    if fallback then return take(fallback) end
    for i = 1, #members do
      local sc = redis.call('ZSCORE', K_WAIT, members[i])
      if sc then consider_waiting(members[i], tonumber(sc)) end
    end
    return none()
  elseif model_only then
    return { 'NONE', -1, 'no_keys' }
  end
end

-- The whole provider: walk the strategy's order; parked keys leave it, so this is short.
local start, scanned = 0, 0
while scanned < 512 do
  local batch = redis.call('ZRANGE', zset, start, start + 3)
  if #batch == 0 then break end
  local parked = 0
  for i = 1, #batch do
    local s = consider(batch[i])
    if s then return take(s) end
    if not redis.call('ZSCORE', zset, batch[i]) then parked = parked + 1 end
  end
  scanned = scanned + #batch
  -- keys parked by `admits` left the set: continue from where the survivors end
  start = start + #batch - parked
end
if fallback then return take(fallback) end

local waiting = redis.call('ZRANGE', K_WAIT, 0, 63, 'WITHSCORES')
for i = 1, #waiting, 2 do
  local sc = tonumber(waiting[i + 1])
  if sc >= earliest then break end
  consider_waiting(waiting[i], sc)
end
return none()
