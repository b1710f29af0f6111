-- report: the outcome of a call made with a key; closes its lease (if any).
-- Takes effect once per call id: a lease report changes the books only when it closes
-- that lease (or settles the record of one that expired unreported); a report without a
-- lease is recognised by its own id. A repeat answers {'DONE'} and changes nothing.
--
-- KEYS[1]   "<prefix>meta" (see lib.lua)
-- ARGV[1]   prefix "<ns>:{<provider>}:"
-- ARGV[2]   call id: the lease id, or a new id for a report without a lease
-- ARGV[3]   key id
-- ARGV[4]   outcome: success | release | rate_limit | quota | auth | server | timeout |
--           connection | bad_request | other
-- ARGV[5]   '1' when ARGV[2] names a lease, '' for a report without one
-- ARGV[6]   tokens used in all ('' = as estimated)
-- ARGV[7]   input tokens used ('' = as estimated)
-- ARGV[8]   output tokens used ('' = as estimated)
-- ARGV[9]   latency, ms ('' = unknown)
-- ARGV[10]  retry after, ms ('' = none given: the default or the backoff applies)
-- ARGV[11]  detail: short, secret-free description ("HTTP 429", "TimeoutError")
-- ARGV[12]  rate-limit cooldown, ms (first one, without a hint)
-- ARGV[13]  rate-limit cooldown cap, ms
-- ARGV[14]  quota cooldown, ms (when no reset time is given)
-- ARGV[15]  consecutive failures that open the circuit
-- ARGV[16]  first circuit-open cooldown, ms
-- ARGV[17]  circuit-open cooldown cap, ms
-- ARGV[18]  scope a rate limit or quota cools: key | model | account; '' = as the failure
--           says: a rate limit on a lease for a model cools that key for that model only,
--           a quota the key's account when it has one, anything else the key
-- (ARGV[12..18] may be left out of a success or release: only a failure reads them.)
--
-- Reply: {'OK', event, why_unavailable, available_at_ms (0 = now, -1 = never), now_ms}
--   event: '' | 'cooldown_set' | 'cooldown_extended' | 'key_exhausted' | 'key_disabled' |
--          'circuit_opened' | 'circuit_closed'
-- or {'DONE'} when this call was already reported (nothing changed),
-- or {'UNKNOWN'} when the key is not registered (the caller re-registers it and retries).

local call_id, id, outcome = ARGV[2], ARGV[3], ARGV[4]
local leased = ARGV[5] == '1'
local actual, actual_in, actual_out = number_arg(ARGV[6]), number_arg(ARGV[7]), number_arg(ARGV[8])
local latency = number_arg(ARGV[9])
local retry_ms = number_arg(ARGV[10])
local detail = ARGV[11]
-- (ARGV[12..17], cooldowns and the circuit breaker's settings, are read where used)
local scope = ARGV[18] or ''

local now = now_ms()
local s = load(id)
local seen = redis.call('HGET', K_LEASE, call_id)
if not s then
  if leased and seen then
    close_lease(nil, {}, call_id)
    redis.call('HDEL', K_LEASE, call_id)
    redis.call('ZREM', K_DONE, call_id)
  end
  return { 'UNKNOWN' }
end

local w = {}
local est = NO_ESTIMATE   -- what the call reserved: its record's tok, inp, out
local model, acct = '', s.acct
local scoped = {}   -- the limit scopes the call was charged to: {letter, state, writes}
if leased then
  local r = seen and parse_record(seen)
  if not r or r.key_id ~= id then return { 'DONE' } end
  local open = close_lease(s, w, call_id)   -- false when it expired: in-flight untouched
  redis.call('HDEL', K_LEASE, call_id)
  if not open then redis.call('ZREM', K_DONE, call_id) end   -- the record of an expired one
  est = r
  model, acct = r.model, r.acct
  if acct ~= '' or model ~= '' then
    for _, entry in ipairs(scopes_for({ id = id, acct = acct }, model)) do
      -- {letter, state, writes, whether the lease held one of its in-flight slots}
      scoped[#scoped + 1] = { entry[1], entry[2], {}, open and string.find(r.held, entry[1], 1, true) }
    end
  end
else
  if seen then return { 'DONE' } end
  keep_record(call_id, record(id, 0, 0, 0, 0, '', acct, ''), now + REPEAT_MS)
end
local event = ''

-- Only ever extends a cooldown (of the key, or of a scope h with its writes hw); returns
-- the event name for the change.
local function cool(until_ms, why, h, hw)
  h, hw = h or s, hw or w
  until_ms = math.floor(until_ms)
  if until_ms > h['until'] then
    local was = h['until'] > now
    set(h, hw, 'until', until_ms)
    set(h, hw, 'why', why)
    if was then return 'cooldown_extended' end
    return 'cooldown_set'
  end
  return ''
end

-- Where a rate limit or quota lands: the key, the key for the call's model, or the account.
local account_cooled = false
local function cool_scoped(until_ms, why, default)
  local where = scope ~= '' and scope or default
  local name
  if where == 'model' and model ~= '' then
    name = 'km:' .. id .. ':' .. model
  elseif where == 'account' and acct ~= '' then
    name = 'a:' .. acct
  else
    return cool(until_ms, why)
  end
  local h, hw = scope_or_new(name), {}
  local event = cool(until_ms, why, h, hw)
  scope_flush(h, hw)
  if event ~= '' and where == 'model' then   -- forgotten when it ends, unless limited
    redis.call('ZADD', PREFIX .. 'sw', h['until'], h.name)
    note_due(h['until'])
  end
  account_cooled = account_cooled or (event ~= '' and where == 'account')
  return event
end

if outcome == 'success' or outcome == 'release' then
  if outcome == 'success' then
    set(s, w, 'ok', s.ok + 1)
    set(s, w, 'last_ok', now)
    if s.consec ~= 0 then set(s, w, 'consec', 0) end
    if s.rl_strikes ~= 0 then set(s, w, 'rl_strikes', 0) end
    if s.circ ~= '' then
      set(s, w, 'circ', ''); set(s, w, 'probe_until', 0); set(s, w, 'opens', 0)
      event = 'circuit_closed'
    end
    if latency then
      set(s, w, 'lat_n', s.lat_n + 1)
      if s.lat_n == 1 then set(s, w, 'lat', latency) else set(s, w, 'lat', s.lat * 0.8 + latency * 0.2) end
    end
  elseif s.circ == 'half' then
    -- a released probe proves nothing: let another probe go
    set(s, w, 'probe_until', 0)
  end
  local used = {
    tok = actual or ((actual_in or actual_out) and ((actual_in or est.inp) + (actual_out or est.out))) or est.tok,
    inp = actual_in or est.inp,
    out = actual_out or est.out,
  }
  if used.tok > 0 then set(s, w, 'tokens', s.tokens + math.floor(used.tok)) end
  if used.inp > 0 then set(s, w, 'tokens_in', s.tokens_in + math.floor(used.inp)) end
  if used.out > 0 then set(s, w, 'tokens_out', s.tokens_out + math.floor(used.out)) end
  budgets_settle(s, w, est, used, now)
  for i = 1, #scoped do budgets_settle(scoped[i][2], scoped[i][3], est, used, now) end
else
  set(s, w, 'err', s.err + 1)
  local count = 'e:' .. outcome   -- errors of this kind
  set(s, w, count, (tonumber(s[count]) or 0) + 1)
  set(s, w, 'last_error', outcome .. (detail ~= '' and (' ' .. detail) or ''))
  set(s, w, 'last_error_at', now)
  if outcome == 'rate_limit' then
    set(s, w, 'rl_strikes', s.rl_strikes + 1)
    local dur = retry_ms
    if not dur then dur = math.min(ARGV[12] * 2 ^ (s.rl_strikes - 1), ARGV[13] + 0) end
    event = cool_scoped(now + dur, 'rate_limit', model ~= '' and 'model' or 'key')
  elseif outcome == 'quota' then
    event = cool_scoped(now + (retry_ms or ARGV[14] + 0), 'quota', acct ~= '' and 'account' or 'key')
    if event ~= '' then event = 'key_exhausted' end
  elseif outcome == 'auth' then
    if s.en ~= 0 then
      set(s, w, 'en', 0)
      set(s, w, 'disabled_reason', 'auth' .. (detail ~= '' and (': ' .. detail) or ''))
      event = 'key_disabled'
    end
  elseif outcome == 'bad_request' then
    -- the request was wrong, not the key
    if s.circ == 'half' then set(s, w, 'probe_until', 0) end
  else
    set(s, w, 'consec', s.consec + 1)
    -- server, timeout, connection: the circuit breaker. 'other' (an unclassified error,
    -- often the caller's own bug) is counted and ranks the key lower for `best`, but
    -- does not take the key out of service.
    if outcome ~= 'other' and (s.circ == 'half' or s.circ == 'open' or s.consec >= ARGV[15] + 0) then
      set(s, w, 'opens', s.opens + 1)
      local dur = math.min(ARGV[16] * 2 ^ (s.opens - 1), ARGV[17] + 0)
      set(s, w, 'circ', 'open'); set(s, w, 'probe_until', 0)
      cool(now + dur, 'circuit')
      event = 'circuit_opened'
    end
  end
end

for i = 1, #scoped do
  scope_flush(scoped[i][2], scoped[i][3])
  if scoped[i][4] then scope_released(scoped[i][1], scoped[i][2], id, acct, model, now) end
end
local at, why = place(s, w, now, 'stats')
flush(s, w)
if account_cooled then replace_account(acct, now) end
if at >= NEVER then at = -1 end
return { 'OK', event, why, math.floor(at), now }
