-- admin: operator actions on one key. Each is idempotent: repeated, it leaves the key as
-- the first run did (renew extends the lease to ttl from the latest run).
--
-- KEYS[1]   "<prefix>meta" (see lib.lua)
-- ARGV[1]   prefix "<ns>:{<provider>}:"
-- ARGV[2]   call id (a repeated remove is recognised by it: it answers as the first did)
-- ARGV[3]   key id
-- ARGV[4]   action:
--             disable   ARGV[5] = reason              the key serves nothing until enabled
--             enable                                  undo a disable (manual or auth)
--             reset                                   clear cooldown, circuit, error counts,
--                                                     budgets and usage; keeps enabled/
--                                                     disabled; in-flight recounted from
--                                                     the open leases
--             remove                                  forget the key, its leases and models
--             assign    ARGV[5] = model               the model is served by this key
--             unassign  ARGV[5] = model               it no longer is
--             renew     ARGV[5] = lease id, ARGV[6] = ttl ms   extend an open lease
--
-- Reply: {'OK', changed (1/0)[, models left with no key of this provider]} or {'UNKNOWN'}
-- when the key is not registered.

local call_id, id, action, arg = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local h = key_hash(id)
keep_nothing(id)
local s = load(id)
local now = now_ms()
if not s then
  if action == 'remove' and redis.call('HEXISTS', K_LEASE, call_id) == 1 then
    return { 'OK', 1, {} }   -- this very remove ran already
  end
  return { 'UNKNOWN' }
end
local changed = 1
local w = {}
-- Whatever an action writes to the hash below (some write it directly), every kept state
-- sees it: `v` changes now.
redis.call('HSET', h, 'v', STAMP)

-- The key's open lease ids (from the lease records).
local function open_leases()
  local mine, prefix = {}, id .. '\n'
  local open = redis.call('ZRANGE', K_LEASES, 0, -1, 'WITHSCORES')
  for i = 1, #open, 2 do
    local r = redis.call('HGET', K_LEASE, open[i])
    if r and string.sub(r, 1, #prefix) == prefix then
      mine[#mine + 1] = { open[i], open[i + 1], r }
    end
  end
  return mine
end

if action == 'disable' then
  if s.en == 0 then changed = 0 end
  set(s, w, 'en', 0)
  set(s, w, 'disabled_reason', (arg ~= '' and arg) or 'manual')
elseif action == 'enable' then
  if s.en ~= 0 then changed = 0 end
  set(s, w, 'en', 1)
  redis.call('HDEL', h, 'disabled_reason')
elseif action == 'reset' then
  local kinds = { 'rate_limit', 'quota', 'auth', 'server', 'timeout', 'connection',
    'bad_request', 'other' }
  for i = 1, #kinds do redis.call('HDEL', h, 'e:' .. kinds[i]) end
  redis.call('HDEL', h, 'why', 'last_error', 'last_error_at')
  s.why = ''
  local zero = { 'until', 't_rpm', 't_tpm', 't_rpd', 't_tpd', 't_itpm', 't_otpm', 'lat',
    'lat_n', 'rl_strikes', 'opens', 'probe_until', 'last_ok', 'total', 'ok', 'err', 'consec',
    'tokens', 'tokens_in', 'tokens_out' }
  set(s, w, 'circ', '')
  for i = 1, #zero do set(s, w, zero[i], 0) end
  -- in-flight is what the open leases say (whatever an earlier version left)
  local mine = open_leases()
  set(s, w, 'inflight', #mine)
elseif action == 'remove' then
  -- out of its account first: re-placing the account's keys must not bring it back
  if s.acct ~= '' then redis.call('SREM', account_set(s.acct), id) end
  for i = 1, 5 do redis.call('ZREM', STRATEGY_ZSETS[i], id) end
  redis.call('ZREM', K_WAIT, id)
  redis.call('SREM', K_ALL, id)
  if redis.call('HGET', K_FPS, s.fp) == id then redis.call('HDEL', K_FPS, s.fp) end
  local mine = open_leases()
  for i = 1, #mine do
    redis.call('ZREM', K_LEASES, mine[i][1])
    redis.call('HDEL', K_LEASE, mine[i][1])
    -- the limit scopes that counted the lease in flight count it no more
    local r = parse_record(mine[i][3])
    if r then
      for letter in string.gmatch(r.held, '%a') do
        local sc = scope_of(letter, id, r.acct, r.model)
        if sc then scope_released(letter, sc, id, r.acct, r.model, now) end
      end
    end
  end
  local models = cjson.decode(s.models or '[]')
  local emptied = {}
  for i = 1, #models do
    redis.call('ZREM', model_rotation(models[i]), id)
    redis.call('ZREM', model_waiting(models[i]), id)
    redis.call('SREM', model_set(models[i]), id)
    if redis.call('EXISTS', model_set(models[i])) == 0 then
      emptied[#emptied + 1] = models[i]
      drop_model_rotation(models[i])
    end
  end
  local mine_prefix = 'km:' .. id .. ':'
  local scopes = redis.call('SMEMBERS', PREFIX .. 'scopes')
  for i = 1, #scopes do
    if string.sub(scopes[i], 1, #mine_prefix) == mine_prefix then
      redis.call('DEL', PREFIX .. 's:' .. scopes[i])
      forget_kept(PREFIX .. 's:' .. scopes[i])
      redis.call('SREM', PREFIX .. 'scopes', scopes[i])
    end
  end
  redis.call('DEL', h, PREFIX .. 'kl:' .. id)   -- (a zset earlier versions kept per key)
  keep_record(call_id, record(id, 0, 0, 0, 0, '', '', ''), now + REPEAT_MS)
  return { 'OK', 1, emptied }
elseif action == 'assign' or action == 'unassign' then
  local models = cjson.decode(s.models or '[]')
  local kept, found = {}, false
  for i = 1, #models do
    if models[i] == arg then found = true end
    if models[i] ~= arg then kept[#kept + 1] = models[i] end
  end
  if action == 'assign' then
    redis.call('SADD', model_set(arg), id)
    ensure_model_rotation(arg)
    if s.loc == 'r' then redis.call('ZADD', model_rotation(arg), s.pass, id) end
    kept[#kept + 1] = arg
    if found then changed = 0 end
  else
    redis.call('SREM', model_set(arg), id)
    redis.call('ZREM', model_rotation(arg), id)
    redis.call('ZREM', model_waiting(arg), id)
    if not found then changed = 0 end
  end
  if #kept > 0 then
    redis.call('HSET', h, 'models', cjson.encode(kept))
  else
    redis.call('HDEL', h, 'models')
  end
  local emptied = {}
  if redis.call('EXISTS', model_set(arg)) == 0 then
    emptied[1] = arg
    drop_model_rotation(arg)
  end
  return { 'OK', changed, emptied }
elseif action == 'renew' then
  if not redis.call('ZSCORE', K_LEASES, arg) then return { 'OK', 0 } end
  local expiry = now + tonumber(ARGV[6])
  redis.call('ZADD', K_LEASES, expiry, arg)
  note_due(expiry)
else
  return redis.error_reply('ERR keypool: unknown admin action ' .. action)
end

replace(s, w, now)
return { 'OK', changed }
