-- register: add a key or update it in place (idempotent upsert). Counters and state of an
-- existing key are kept; a new secret (another fingerprint) lifts an auth disable and
-- closes the circuit, since those judged the old secret. One secret is one key: a secret
-- another key id of the provider holds is refused, with nothing written.
--
-- KEYS[1]   "<prefix>meta" (see lib.lua)
-- ARGV[1]   prefix "<ns>:{<provider>}:"
-- ARGV[2]   key id
-- ARGV[3]   fingerprint of the secret
-- ARGV[4]   weight (> 0)                    ARGV[4..8]: '' = keep the key's current value
-- ARGV[5]   rpm limit (0 = none)                         (the default for a new key)
-- ARGV[6]   tpm limit (0 = none)
-- ARGV[7]   rpd limit (0 = none)
-- ARGV[8]   max concurrent leases (0 = none)
-- ARGV[9]   sealed secret ('' in the default mode: Redis never holds the secret)
-- ARGV[10]  epoch to create the pool under when it does not exist yet
-- ARGV[11]  JSON array of models to assign the key to (may be '[]')
-- ARGV[12]  '1': a new key starts with its budgets spent (put back after the pool's state
--           was lost), '' : with its budgets full
-- ARGV[13]  account the key belongs to ('' = keep the key's; a new key: none); its keys
--           share the account's limit scopes
--
-- Reply: {epoch, 'created' | 'updated' | 'rekeyed'} or {'DUP', key_id_holding_the_secret}

local id, fp = ARGV[2], ARGV[3]
local h = key_hash(id)
keep_nothing(id)

local holder = redis.call('HGET', K_FPS, fp)
if holder and holder ~= id and redis.call('SISMEMBER', K_ALL, holder) == 1 then
  return { 'DUP', holder }
end

local now = now_ms()
local epoch = EPOCH
if not epoch then
  epoch = ARGV[10]
  EPOCH = epoch
  redis.call('HSET', K_META, 'epoch', epoch, 'created', now)
end

local old_fp = redis.call('HGET', h, 'fp')
local result = 'updated'
redis.call('SADD', K_ALL, id)
redis.call('HSET', K_FPS, fp, id)
if not old_fp then
  -- A new hash starts with the fields every call reads or writes: a small hash is a list
  -- that a command searches from its start.
  redis.call('HSET', h, 'v', STAMP, 'inflight', 0, 'pass', 0, 'total', 0, 'last_used', 0,
    'ok', 0, 'last_ok', 0, 'tokens', 0)
end
-- (`v` too: whatever this call writes to the hash below, every kept state sees it)
redis.call('HSET', h, 'id', id, 'fp', fp, 'v', STAMP)
if old_fp and old_fp ~= fp and redis.call('HGET', K_FPS, old_fp) == id then
  redis.call('HDEL', K_FPS, old_fp)
end
if ARGV[9] ~= '' then
  redis.call('HSET', h, 'sealed', ARGV[9])
elseif old_fp ~= fp then
  -- a process without the sealing key re-keyed it: the sealed copy is stale
  redis.call('HDEL', h, 'sealed')
end

local s = load(id)
local w = {}
if not old_fp then
  result = 'created'
  set(s, w, 'created', now)
  -- pass 0: place() lines it up with the rotation's current round
  set(s, w, 'en', 1); set(s, w, 'pass', 0); set(s, w, 'inflight', 0)
  set(s, w, 'wpass', min_score(STRATEGY_ZSETS[2]) or 0)
  s.loc = ''
elseif old_fp ~= fp then
  result = 'rekeyed'
  set(s, w, 'consec', 0); set(s, w, 'circ', ''); set(s, w, 'probe_until', 0); set(s, w, 'opens', 0)
  local reason = redis.call('HGET', h, 'disabled_reason') or ''
  if string.sub(reason, 1, 4) == 'auth' then
    set(s, w, 'en', 1)
    redis.call('HDEL', h, 'disabled_reason')
  end
end
-- weight and limits: '' keeps what the key has (keys loaded from the environment must not
-- undo limits an operator set), or the default for a new key
local names = { 'weight', 'rpm', 'tpm', 'rpd', 'maxc' }
for i = 1, 5 do
  local v = ARGV[3 + i]
  if v ~= '' then set(s, w, names[i], tonumber(v)) end
end
if result == 'created' and ARGV[12] == '1' then budgets_spend_all(s, w, now) end
local account = ARGV[13] or ''
if account ~= '' and account ~= s.acct then
  if s.acct ~= '' then redis.call('SREM', account_set(s.acct), id) end
  redis.call('SADD', account_set(account), id)
  set(s, w, 'acct', account)
end

local models = cjson.decode(ARGV[11])
if #models > 0 then
  local have = cjson.decode(redis.call('HGET', h, 'models') or '[]')
  local seen = {}
  for i = 1, #have do seen[have[i]] = true end
  for i = 1, #models do
    redis.call('SADD', model_set(models[i]), id)
    if not seen[models[i]] then have[#have + 1] = models[i]; seen[models[i]] = true end
    ensure_model_rotation(models[i])
    if s.loc == 'r' then redis.call('ZADD', model_rotation(models[i]), s.pass, id) end
  end
  set(s, w, 'models', cjson.encode(have))
  s.model_list = nil
end

replace(s, w, now)
return { epoch, result }
