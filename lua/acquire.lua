-- acquire: pick an available key, count the request, charge its budgets, open a lease.
-- Takes effect once per call id: repeated with the same id (a call retried after its
-- connection dropped), it answers with the key the first run picked and changes nothing.
--
-- KEYS[1]  "<prefix>meta" (see lib.lua)
-- ARGV[1]  prefix "<ns>:{<provider>}:"
-- ARGV[2]  call id: the lease id (unique per acquire)
-- ARGV[3]  strategy: round_robin | weighted | best | least_busy | latency
-- ARGV[4]  tokens: estimated tokens in all (>= 0), charged to tpm/tpd
-- ARGV[5]  input tokens estimated (>= 0), charged to itpm (and to tpm/tpd)
-- ARGV[6]  output tokens estimated (>= 0), charged to otpm (and to tpm/tpd)
-- ARGV[7]  lease ttl, ms; 0 = count the request but hold no lease
-- ARGV[8]  model, '' for any key of the provider; a model with assigned keys is served
--          only by them
-- ARGV[9]  key id to avoid while another key is available ('' for none)
-- ARGV[10] the pool epoch this process registered its keys under ('' to skip the check)
-- ARGV[11] '1' when only the model's keys may serve even if it has none here (the
--          provider was found through the model), '' otherwise
-- ARGV[12] '' or the name of this process's set "<prefix>u:<name>" of the key ids it
--          cannot use (no secret for them here): asked only about the keys considered, so
--          the call costs the same however many there are
--
-- Reply:
--   {'OK', key_id, fingerprint, sealed_secret_or_empty, now_ms}
--   {'NONE', retry_after_ms (-1 = no key ever will), why}
--   {'LOST', current_epoch_or_empty}   the pool's state is gone or was re-created:
--                                      re-register and call again (with the same id)

local call_id = ARGV[2]
local strategy = ARGV[3]
local tokens, inp, out = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local ttl = tonumber(ARGV[7])
local model = ARGV[8]
local avoid = ARGV[9]
local want_epoch = ARGV[10]
local model_only = ARGV[11] == '1'
local unusable_set = (ARGV[12] or '') ~= '' and PREFIX .. 'u:' .. ARGV[12]
local function unusable(id)
  return unusable_set and redis.call('SISMEMBER', unusable_set, id) == 1
end

local zi = STRATEGY_INDEX[strategy]
if not zi then return redis.error_reply('ERR keypool: unknown strategy ' .. strategy) end
if not tokens or not inp or not out or not ttl then
  return redis.error_reply('ERR keypool: acquire needs numbers for tokens and ttl')
end
if want_epoch ~= '' and EPOCH ~= want_epoch then return { 'LOST', EPOCH or '' } end

local now = now_ms()

-- A repeat of a call that already ran: the same answer, nothing charged again.
local seen = redis.call('HGET', K_LEASE, call_id)
if seen then
  local r = parse_record(seen)
  local s = r and load(r.key_id)
  if s then return { 'OK', s.id, s.fp, s.sealed, now } end
end

housekeeping(now)
ensure_strategy(zi)
local zset = STRATEGY_ZSETS[zi]
local cost = { req = 1, tok = math.max(tokens, inp + out), inp = inp, out = out }

local earliest = NEVER   -- earliest time a skipped key could take this request
local routing_model = false   -- walking the model's own rotation (mr:<model>)
local why_none = 'no_keys'

-- Can the key (and every limit scope that applies: its account, the account for the model,
-- the key for the model) take this request now? Parks keys that cannot take any request.
local function admits(s)
  local at, why = budgets_at(s, cost, now)
  local scoped = scopes_for(s, model)
  for i = 1, #scoped do
    local t, twhy = scope_at(scoped[i][2], cost, now)
    if t > at then at, why = t, twhy end
  end
  if at <= now then return true, scoped end
  if available_at(s, now) > now then
    replace(s, {}, now)   -- can take no request at all: out of the rotation until then
  elseif routing_model then
    -- held back for this model only (a scope of the model): out of the model's rotation
    -- until then
    local held_until = 0
    for i = 1, #scoped do
      if scoped[i][1] ~= 'a' then
        local t = scope_at(scoped[i][2], ONE_REQUEST, now)
        if t > held_until then held_until = t end
      end
    end
    if held_until > now and held_until < NEVER then
      redis.call('ZREM', model_rotation(model), s.id)
      redis.call('ZADD', model_waiting(model), math.ceil(held_until), s.id)
    end
  end
  if at < earliest then earliest = at end
  why_none = why
  return false
end

local function take(s, scoped)
  local w = {}
  budgets_charge(s, w, cost, now)
  local held = ''
  for i = 1, #scoped do
    local letter, h = scoped[i][1], scoped[i][2]
    local hw = {}
    budgets_charge(h, hw, cost, now)
    if ttl > 0 and h.maxc > 0 then
      set(h, hw, 'inflight', h.inflight + 1)
      held = held .. letter
    end
    scope_flush(h, hw)
  end
  -- Round-robin is least-recently-served order: exact rotation, ties impossible because
  -- each script runs at its own TIME.
  set(s, w, 'pass', math.max(NOW_US - EPOCH_US, s.pass + 1))
  if ACTIVE_SET[2] then   -- the weighted pass matters once that strategy is in use
    set(s, w, 'wpass', s.wpass + 1 / math.max(s.weight, 1e-6))
  end
  set(s, w, 'total', s.total + 1)
  set(s, w, 'last_used', now)
  -- the figures as the caller sent them: text, nothing to format
  local rec = record(s.id, cost.tok == tokens and ARGV[4] or cost.tok, ARGV[5], ARGV[6], ARGV[7],
    model, s.acct, held)
  if ttl > 0 then
    local expiry = now + ttl
    redis.call('ZADD', K_LEASES, expiry, call_id)
    redis.call('HSET', K_LEASE, call_id, rec)
    note_due(expiry)
    set(s, w, 'inflight', s.inflight + 1)
  else
    keep_record(call_id, rec, now + REPEAT_MS)
  end
  if s.circ == 'open' or s.circ == 'half' then
    -- The circuit's cooldown is over: this request is its one probe.
    set(s, w, 'circ', 'half')
    set(s, w, 'probe_until', now + (ttl > 0 and ttl or 60000))
  end
  replace(s, w, now)
  return { 'OK', s.id, s.fp, s.sealed, now }
end

local fallback, fallback_scoped = nil, nil   -- the avoided key, when only it could serve

local function consider(id)
  if unusable(id) then return nil end
  local s = load(id)
  if not s then
    for j = 1, #ACTIVE do redis.call('ZREM', STRATEGY_ZSETS[ACTIVE[j]], id) end
    return nil
  end
  local ok, scoped = admits(s)
  if not ok then return nil end
  if id == avoid then
    fallback, fallback_scoped = s, scoped
    return nil
  end
  return s, scoped
end

local function none()
  if earliest >= NEVER then
    if why_none == 'no_keys' and redis.call('SCARD', K_ALL) > 0 then why_none = 'disabled' end
    return { 'NONE', -1, why_none }
  end
  return { 'NONE', math.ceil(math.max(0, earliest - now)), why_none }
end

-- The earliest moment a waiting key could take this request (exact for its size).
local function consider_waiting(id, wait_score)
  if unusable(id) then return end
  local s = load(id)
  if not s then return end
  local at, why = available_at(s, now)
  if at == 0 then at = wait_score end
  local b = budgets_at(s, cost, now)
  if b > at then at = b end
  local scoped = scopes_for(s, model)
  for i = 1, #scoped do
    b = scope_at(scoped[i][2], cost, now)
    if b > at then at = b end
  end
  if at < earliest then
    earliest = at
    why_none = (why ~= '' and why) or 'cooling'
  end
end

-- Walk a rotation in order to its end if need be (keys that cannot take any request leave
-- it as they are met, so only keys too short for this request's size are walked past).
local function walk(zset_name)
  local start = 0
  while true do
    local batch = redis.call('ZRANGE', zset_name, start, start + 7)
    if #batch == 0 then return nil end
    local parked = 0
    for i = 1, #batch do
      local s, scoped = consider(batch[i])
      if s then return take(s, scoped) end
      if not redis.call('ZSCORE', zset_name, batch[i]) then parked = parked + 1 end
    end
    -- keys parked by `admits` left the set: continue from where the survivors end
    start = start + #batch - parked
  end
end

-- No key of the model can serve: when the earliest of them could (those waiting, or held
-- back for this model).
local function none_of(members)
  for i = 1, #members do
    local sc = redis.call('ZSCORE', K_WAIT, members[i])
      or redis.call('ZSCORE', model_waiting(model), members[i])
    if sc then consider_waiting(members[i], tonumber(sc)) end
  end
  return none()
end

if model ~= '' and zi == 1 and redis.call('EXISTS', model_set(model)) == 1 then
  -- round robin over a model's keys: its own rotation, as flat as the provider's
  ensure_model_rotation(model)
  routing_model = true
  local rotation = model_rotation(model)
  local back = redis.call('ZRANGEBYSCORE', model_waiting(model), '-inf', now, 'LIMIT', 0, 64)
  for i = 1, #back do
    redis.call('ZREM', model_waiting(model), back[i])
    local s = load(back[i])
    if s and s.loc == 'r' then redis.call('ZADD', rotation, s.pass, s.id) end
  end
  local picked = walk(rotation)
  if picked then return picked end
  if fallback then return take(fallback, fallback_scoped) end
  return none_of(redis.call('SMEMBERS', model_set(model)))
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
      local s, scoped = consider(ranked[i][2])
      if s then return take(s, scoped) end
    end
    if fallback then return take(fallback, fallback_scoped) end
    return none_of(members)
  elseif model_only then
    return { 'NONE', -1, 'no_keys' }
  end
end

-- The whole provider, in the strategy's order.
local picked = walk(zset)
if picked then return picked end
if fallback then return take(fallback, fallback_scoped) end

local waiting = redis.call('ZRANGE', K_WAIT, 0, 63, 'WITHSCORES')
for i = 1, #waiting, 2 do
  local sc = tonumber(waiting[i + 1])
  if sc >= earliest then break end
  consider_waiting(waiting[i], sc)
end
return none()
