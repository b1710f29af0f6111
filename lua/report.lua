-- report: the outcome of a call made with a key; closes its lease (if any).
--
-- KEYS[1..9]  the provider's keys (see lib.lua)
-- ARGV[1]   key prefix "<ns>:{<provider>}:"
-- ARGV[2]   key id
-- ARGV[3]   lease id ('' when the request held no lease)
-- ARGV[4]   outcome: success | release | rate_limit | quota | auth | server | timeout |
--           connection | bad_request | other
-- ARGV[5]   tokens reserved at acquire (the estimate)
-- ARGV[6]   tokens actually used ('' = as estimated)
-- ARGV[7]   latency, ms ('' = unknown)
-- ARGV[8]   retry after, ms ('' = none given: the default or the backoff applies)
-- ARGV[9]   detail: short, secret-free description ("HTTP 429", "TimeoutError")
-- ARGV[10]  rate-limit cooldown, ms (first one, without a hint)
-- ARGV[11]  rate-limit cooldown cap, ms
-- ARGV[12]  quota cooldown, ms (when no reset time is given)
-- ARGV[13]  consecutive failures that open the circuit
-- ARGV[14]  first circuit-open cooldown, ms
-- ARGV[15]  circuit-open cooldown cap, ms
--
-- Reply: {'OK', event, why_unavailable, available_at_ms (0 = now, -1 = never), now_ms}
--   event: '' | 'cooldown_set' | 'cooldown_extended' | 'key_exhausted' | 'key_disabled' |
--          'circuit_opened' | 'circuit_closed'
-- or {'UNKNOWN'} when the key is not registered (the caller re-registers it and retries).

local id, lease_id, outcome = ARGV[2], ARGV[3], ARGV[4]
local est = tonumber(ARGV[5]) or 0
local actual = tonumber(ARGV[6])
local latency = tonumber(ARGV[7])
local retry_ms = tonumber(ARGV[8])
local detail = ARGV[9]
local rl_base, rl_cap = tonumber(ARGV[10]), tonumber(ARGV[11])
local quota_ms, threshold = tonumber(ARGV[12]), tonumber(ARGV[13])
local cb_base, cb_cap = tonumber(ARGV[14]), tonumber(ARGV[15])

local s = load(id)
if not s then
  if lease_id ~= '' then redis.call('ZREM', K_LEASES, id .. '/' .. lease_id) end
  return { 'UNKNOWN' }
end

local now = now_ms()
local fields = {}
local function set(k, v) fields[#fields + 1] = k; fields[#fields + 1] = v end
if drop_lease(s, lease_id) then set('inflight', s.inflight) end
local event = ''

-- Only ever extends a cooldown; returns the event name for the change.
local function cool(until_ms, why)
  until_ms = math.floor(until_ms)
  if until_ms > s['until'] then
    local was = s['until'] > now
    s['until'] = until_ms
    s.why = why
    set('until', until_ms); set('why', why)
    if was then return 'cooldown_extended' end
    return 'cooldown_set'
  end
  return ''
end

if outcome == 'success' or outcome == 'release' then
  if outcome == 'success' then
    s.ok = s.ok + 1
    set('ok', s.ok); set('last_ok', math.floor(now))
    if s.consec ~= 0 then s.consec = 0; set('consec', 0) end
    if s.rl_strikes ~= 0 then set('rl_strikes', 0) end
    if s.circ ~= '' then
      s.circ = ''
      s.opens = 0
      set('circ', ''); set('probe_until', 0); set('opens', 0)
      event = 'circuit_closed'
    end
    if latency then
      s.lat_n = s.lat_n + 1
      if s.lat_n == 1 then s.lat = latency else s.lat = s.lat * 0.8 + latency * 0.2 end
      set('lat_n', s.lat_n); set('lat', s.lat)
    end
  elseif s.circ == 'half' then
    -- a released probe proves nothing: let another probe go
    s.probe_until = 0; set('probe_until', 0)
  end
  local used = actual or est
  if used > 0 then s.tokens = s.tokens + math.floor(used); set('tokens', s.tokens) end
  if actual and s.tpm > 0 and actual ~= est then
    -- reconcile the reservation: charge the overrun, give back what was not used
    local e = MINUTE / s.tpm
    if actual > est then
      s.t_tpm = math.max(s.t_tpm, now) + (actual - est) * e
    else
      s.t_tpm = s.t_tpm - (est - actual) * e
    end
    set('t_tpm', s.t_tpm)
  end
else
  local h = key_hash(id)
  s.err = s.err + 1
  set('err', s.err)
  redis.call('HINCRBY', h, 'e:' .. outcome, 1)
  set('last_error', outcome .. (detail ~= '' and (' ' .. detail) or ''))
  set('last_error_at', math.floor(now))
  if outcome == 'rate_limit' then
    s.rl_strikes = s.rl_strikes + 1
    set('rl_strikes', s.rl_strikes)
    local dur = retry_ms
    if not dur then dur = math.min(rl_base * 2 ^ (s.rl_strikes - 1), rl_cap) end
    event = cool(now + dur, 'rate_limit')
  elseif outcome == 'quota' then
    event = cool(now + (retry_ms or quota_ms), 'quota')
    if event ~= '' then event = 'key_exhausted' end
  elseif outcome == 'auth' then
    if s.en ~= '0' then
      s.en = '0'
      set('en', '0'); set('disabled_reason', 'auth' .. (detail ~= '' and (': ' .. detail) or ''))
      event = 'key_disabled'
    end
  elseif outcome == 'bad_request' then
    -- the request was wrong, not the key
    if s.circ == 'half' then s.probe_until = 0; set('probe_until', 0) end
  else
    s.consec = s.consec + 1
    set('consec', s.consec)
    -- server, timeout, connection: the circuit breaker. 'other' (an unclassified error,
    -- often the caller's own bug) is counted and ranks the key lower for `best`, but
    -- does not take the key out of service.
    if outcome ~= 'other' and (s.circ == 'half' or s.circ == 'open' or s.consec >= threshold) then
      s.opens = s.opens + 1
      set('opens', s.opens)
      local dur = math.min(cb_base * 2 ^ (s.opens - 1), cb_cap)
      s.circ = 'open'; s.probe_until = 0
      set('circ', 'open'); set('probe_until', 0)
      cool(now + dur, 'circuit')
      event = 'circuit_opened'
    end
  end
end

local at, why = place(s, now, fields, 'stats')
flush(s, fields)
if at >= NEVER then at = -1 end
return { 'OK', event, why, math.floor(at), math.floor(now) }
