-- limits: set or show the limits of the provider's limit scopes.
--
-- KEYS[1]   "<prefix>meta" (see lib.lua)
-- ARGV[1]   prefix "<ns>:{<provider>}:"
-- ARGV[2]   action: set | show
-- set:
--   ARGV[3]   scope: key | key_model | account | account_model
--   ARGV[4]   key id (key, key_model) or account (account, account_model)
--   ARGV[5]   model (key_model, account_model; '' otherwise)
--   ARGV[6..12]  rpm, tpm, rpd, tpd, itpm, otpm, maxc: '' = keep, 0 = no limit
--   Reply: {'OK'} or {'UNKNOWN'} (no such key)
-- show: every limit scope of the provider (keys' own limits are in stats).
--   Reply: {now_ms, {name, {field, value, ...}, {available_at_ms, why, rpm_left, tpm_left,
--           rpd_left, tpd_left, itpm_left, otpm_left}}, ...}

local action = ARGV[2]
local now = now_ms()
local LIMITS = { 'rpm', 'tpm', 'rpd', 'tpd', 'itpm', 'otpm', 'maxc' }

if action == 'set' then
  local scope, owner, model = ARGV[3], ARGV[4], ARGV[5]
  local h, w
  if scope == 'key' then
    h = load(owner)
    if not h then return { 'UNKNOWN' } end
    w = {}
    for i = 1, #LIMITS do
      if ARGV[5 + i] ~= '' then set(h, w, LIMITS[i], tonumber(ARGV[5 + i])) end
    end
    replace(h, w, now)
    return { 'OK' }
  end
  local name
  if scope == 'key_model' then
    if redis.call('SISMEMBER', K_ALL, owner) == 0 then return { 'UNKNOWN' } end
    name = 'km:' .. owner .. ':' .. model
  elseif scope == 'account' then
    name = 'a:' .. owner
  elseif scope == 'account_model' then
    name = 'am:' .. owner .. ':' .. model
  else
    return redis.error_reply('ERR keypool: unknown limit scope ' .. scope)
  end
  h = scope_or_new(name)
  w = {}
  for i = 1, #LIMITS do
    if ARGV[5 + i] ~= '' then set(h, w, LIMITS[i], tonumber(ARGV[5 + i])) end
  end
  scope_flush(h, w)
  if scope == 'account' then replace_account(owner, now) end
  return { 'OK' }
elseif action == 'show' then
  local names = redis.call('SMEMBERS', PREFIX .. 'scopes')
  table.sort(names)
  local out = { now }
  for i = 1, #names do
    local h = load_scope(names[i])
    if h then
      local at, why = scope_at(h, ONE_REQUEST, now)
      out[#out + 1] = names[i]
      out[#out + 1] = redis.call('HGETALL', PREFIX .. 's:' .. names[i])
      out[#out + 1] = { math.floor(at), why,
        budget_left(h.rpm, MINUTE, h.t_rpm, now), budget_left(h.tpm, MINUTE, h.t_tpm, now),
        budget_left(h.rpd, DAY, h.t_rpd, now), budget_left(h.tpd, DAY, h.t_tpd, now),
        budget_left(h.itpm, MINUTE, h.t_itpm, now), budget_left(h.otpm, MINUTE, h.t_otpm, now) }
    else
      redis.call('SREM', PREFIX .. 'scopes', names[i])
    end
  end
  return out
end
return redis.error_reply('ERR keypool: unknown limits action ' .. tostring(action))
