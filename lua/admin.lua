-- admin: operator actions on one key.
--
-- KEYS[1..9]  the provider's keys (see lib.lua)
-- ARGV[1]   key prefix "<ns>:{<provider>}:"
-- ARGV[2]   key id
-- ARGV[3]   action:
--             disable   ARGV[4] = reason              the key serves nothing until enabled
--             enable                                  undo a disable (manual or auth)
--             reset                                   clear cooldown, circuit, error counts,
--                                                     budgets and usage; keeps enabled/disabled
--             remove                                  forget the key, its leases and models
--             assign    ARGV[4] = model               the model is served by this key
--             unassign  ARGV[4] = model               it no longer is
--             renew     ARGV[4] = lease id, ARGV[5] = ttl ms   extend an open lease
--
-- Reply: {'OK', changed (1/0)[, models left with no key of this provider]} or {'UNKNOWN'}
-- when the key is not registered.

local id, action, arg = ARGV[2], ARGV[3], ARGV[4]
local h = key_hash(id)
local s = load(id)
if not s then return { 'UNKNOWN' } end
local now = now_ms()
local changed = 1

if action == 'disable' then
  if s.en == '0' then changed = 0 end
  flush(s, { 'en', '0', 'disabled_reason', (arg ~= '' and arg) or 'manual' })
elseif action == 'enable' then
  if s.en ~= '0' then changed = 0 end
  flush(s, { 'en', '1' })
  redis.call('HDEL', h, 'disabled_reason')
elseif action == 'reset' then
  local kinds = { 'rate_limit', 'quota', 'auth', 'server', 'timeout', 'connection',
    'bad_request', 'other' }
  for i = 1, #kinds do redis.call('HDEL', h, 'e:' .. kinds[i]) end
  redis.call('HDEL', h, 'why', 'last_error', 'last_error_at')
  local zero = { 'until', 't_rpm', 't_tpm', 't_rpd', 'lat', 'lat_n', 'rl_strikes', 'opens',
    'probe_until', 'last_ok', 'total', 'ok', 'err', 'consec', 'tokens' }
  local changes = { 'circ', '' }
  for i = 1, #zero do changes[#changes + 1] = zero[i]; changes[#changes + 1] = 0 end
  flush(s, changes)
elseif action == 'remove' then
  for i = 1, 5 do redis.call('ZREM', STRATEGY_ZSETS[i], id) end
  redis.call('ZREM', K_WAIT, id)
  redis.call('SREM', K_ALL, id)
  local mine = id .. '/'
  local leases = redis.call('ZRANGE', K_LEASES, 0, -1)
  for i = 1, #leases do
    if string.sub(leases[i], 1, #mine) == mine then redis.call('ZREM', K_LEASES, leases[i]) end
  end
  local models = cjson.decode(redis.call('HGET', h, 'models') or '[]')
  local emptied = {}
  for i = 1, #models do
    redis.call('SREM', model_set(models[i]), id)
    if redis.call('EXISTS', model_set(models[i])) == 0 then emptied[#emptied + 1] = models[i] end
  end
  redis.call('DEL', h, key_leases(id))
  return { 'OK', 1, emptied }
elseif action == 'assign' or action == 'unassign' then
  local models = cjson.decode(redis.call('HGET', h, 'models') or '[]')
  local kept, found = {}, false
  for i = 1, #models do
    if models[i] == arg then found = true end
    if models[i] ~= arg then kept[#kept + 1] = models[i] end
  end
  if action == 'assign' then
    redis.call('SADD', model_set(arg), id)
    kept[#kept + 1] = arg
    if found then changed = 0 end
  else
    redis.call('SREM', model_set(arg), id)
    if not found then changed = 0 end
  end
  if #kept > 0 then
    redis.call('HSET', h, 'models', cjson.encode(kept))
  else
    redis.call('HDEL', h, 'models')
  end
  local emptied = {}
  if redis.call('EXISTS', model_set(arg)) == 0 then emptied[1] = arg end
  return { 'OK', changed, emptied }
elseif action == 'renew' then
  local member = id .. '/' .. arg
  if not redis.call('ZSCORE', K_LEASES, member) then return { 'OK', 0 } end
  local expiry = math.floor(now) + tonumber(ARGV[5])
  redis.call('ZADD', K_LEASES, expiry, member)
  if s.maxc > 0 then redis.call('ZADD', key_leases(id), expiry, arg) end
  note_due(expiry)
else
  return redis.error_reply('ERR keypool: unknown admin action ' .. action)
end

replace(load(id), now)
return { 'OK', changed }
