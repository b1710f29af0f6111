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
--
-- Reply:
--   {'OK', key_id, fingerprint, sealed_secret_or_empty, now_ms}
--   {'NONE', retry_after_ms_or_-1, why}   no key can serve it now; -1 = none ever will
--   {'LOST', current_epoch_or_empty}      the pool's state is gone or was re-created:
--                                         re-register and call again

local strategy = ARGV[2]
local tokens = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local lease_id = ARGV[5]
local model = ARGV[6]
local avoid = ARGV[7]
local want_epoch = ARGV[8]

local zi = STRATEGY_INDEX[strategy]
if not zi then return redis.error_reply('ERR keypool: unknown strategy ' .. strategy) end
local zset = KEYS[zi]

local epoch = redis.call('HGET', K_META, 'epoch')
if want_epoch ~= '' and epoch ~= want_epoch then return { 'LOST', epoch or '' } end

local now = now_ms()
reap_leases(now)
promote(now)

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
    place(s, now)   -- spent for every request: out of the rotation until it refills
  end
  if at < earliest then earliest = at end
  why_none = 'budget'
  return false
end

local function take(s)
  local h = key_hash(s.id)
  s.t_rpm = budget_charge(s.rpm, MINUTE, s.t_rpm, 1, now)
  s.t_rpd = budget_charge(s.rpd, DAY, s.t_rpd, 1, now)
  s.t_tpm = budget_charge(s.tpm, MINUTE, s.t_tpm, tokens, now)
  s.pass = s.pass + 1
  s.wpass = s.wpass + 1 / math.max(s.weight, 1e-6)
  s.total = s.total + 1
  local fields = { 'total', n2s(s.total), 'last_used', n2s(math.floor(now)),
    'pass', n2s(s.pass), 'wpass', n2s(s.wpass) }
  if s.rpm > 0 then fields[#fields + 1] = 't_rpm'; fields[#fields + 1] = n2s(s.t_rpm) end
  if s.rpd > 0 then fields[#fields + 1] = 't_rpd'; fields[#fields + 1] = n2s(s.t_rpd) end
  if s.tpm > 0 then fields[#fields + 1] = 't_tpm'; fields[#fields + 1] = n2s(s.t_tpm) end
  if ttl > 0 then
    local expiry = now + ttl
    redis.call('ZADD', K_LEASES, expiry, s.id .. '/' .. lease_id)
    redis.call('ZADD', key_leases(s.id), expiry, lease_id)
    s.inflight = redis.call('ZCARD', key_leases(s.id))
    fields[#fields + 1] = 'inflight'; fields[#fields + 1] = s.inflight
  end
  if s.circ == 'open' or s.circ == 'half' then
    -- The circuit's cooldown is over: this request is its one probe.
    s.circ = 'half'
    s.probe_until = now + (ttl > 0 and ttl or 60000)
    fields[#fields + 1] = 'circ'; fields[#fields + 1] = 'half'
    fields[#fields + 1] = 'probe_until'; fields[#fields + 1] = n2s(s.probe_until)
  end
  redis.call('HSET', h, unpack(fields))
  place(s, now)
  local sealed = redis.call('HGET', h, 'sealed') or ''
  return { 'OK', s.id, s.fp, sealed, n2s(now) }
end

local fallback = nil   -- the avoided key, when it is the only one that could serve

local function consider(id)
  local s = load(id)
  if not s then
    for i = 1, 5 do redis.call('ZREM', STRATEGY_ZSETS[i], id) end
    return nil
  end
  if not admits(s) then return nil end
  if id == avoid then
    fallback = s
    return nil
  end
  return s
end

if model ~= '' then
  local members = redis.call('SMEMBERS', model_set(model))
  if #members > 0 then
    local ranked = {}
    for i = 1, #members do
      local score = redis.call('ZSCORE', zset, members[i])
      if score then ranked[#ranked + 1] = { tonumber(score), members[i] } end
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
    -- Nothing available now: the earliest of the model's keys in `wait` decides.
    for i = 1, #members do
      local score = redis.call('ZSCORE', K_WAIT, members[i])
      if score then
        local s = load(members[i])
        if s then
          local at = math.max(tonumber(score), budget_at(s.tpm, MINUTE, s.t_tpm, tokens))
          if at < earliest then earliest = at end
          why_none = 'cooling'
        end
      end
    end
    if earliest >= NEVER then return { 'NONE', '-1', why_none } end
    return { 'NONE', n2s(math.max(0, earliest - now)), why_none }
  end
end

-- The whole provider: walk the strategy's order; parked keys leave it, so this is short.
local start = 0
local scanned = 0
while scanned < 512 do
  local batch = redis.call('ZRANGE', zset, start, start + 15)
  if #batch == 0 then break end
  local parked_before = redis.call('ZCARD', zset)
  for i = 1, #batch do
    local s = consider(batch[i])
    if s then return take(s) end
  end
  scanned = scanned + #batch
  -- keys parked by `admits` left the set: continue from where the survivors end
  start = start + #batch - (parked_before - redis.call('ZCARD', zset))
end
if fallback then return take(fallback) end

-- Nothing available now: the earliest key in `wait` decides (exact for this request size).
local waiting = redis.call('ZRANGE', K_WAIT, 0, 63, 'WITHSCORES')
for i = 1, #waiting, 2 do
  local score = tonumber(waiting[i + 1])
  if score >= earliest then break end
  local s = load(waiting[i])
  if s then
    local at = math.max(score, budget_at(s.tpm, MINUTE, s.t_tpm, tokens))
    if at < earliest then earliest = at end
    why_none = 'cooling'
  end
end
if earliest >= NEVER then
  if redis.call('SCARD', K_ALL) == 0 then why_none = 'no_keys'
  elseif why_none == 'no_keys' then why_none = 'disabled' end
  return { 'NONE', '-1', why_none }
end
return { 'NONE', n2s(math.max(0, earliest - now)), why_none }
