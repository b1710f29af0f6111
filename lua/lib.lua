-- keypool shared library. Loaded once with every script as one Redis function library
-- (FCALL), or, where functions are not available, prepended to each script (EVALSHA);
-- either way each call is one round trip, one atomic step. Each script's body is a
-- function of (KEYS, ARGV) run after begin(KEYS, ARGV).
--
-- Every script declares one key, KEYS[1] = "<prefix>meta", and gets the prefix
-- "<ns>:{<provider>}:" as ARGV[1]; every other key it touches derives from the prefix and
-- so lives in the same cluster slot (the hash tag {<provider>}):
--   meta        hash  epoch, created, zs (strategy sets kept up to date), due (ms of the
--                     next expected lease expiry, cooldown end or record to forget)
--   all         set   every registered key id
--   fps         hash  fingerprint -> key id (one secret is one key of the provider)
--   wait        zset  key ids unavailable for now; score = ms when to look again
--   leases      zset  open lease ids; score = expiry, ms
--   lease       hash  lease id -> record "<key_id>\n<tokens> <input> <output> <ttl> <account>
--                     <scopes>\n<model>" (see record() below)
--                     (open leases, and records kept a while to recognise a repeated call)
--   done        zset  ids of records kept only to recognise repeats; score = ms to forget
--   rr wrr best busy lat   zsets of available key ids, one per strategy (scores: last
--                     served µs; weighted pass; errors·2^40+usage; in-flight·2^40+served;
--                     latency·2^40+served). rr is always kept; the others are built the
--                     first time their strategy is used (meta `zs` lists them).
--   k:<id>      hash  one key: configuration and state, one plain field each (HGETALL)
--   m:<model>   set   key ids assigned to a model
--   mr:<model>  zset  the model's keys available now, in round-robin order (score as rr),
--                     so routing a model is as flat as routing the provider
--   mrs         set   the models whose rotation mr:<model> is kept (built on first use)
--   mw:<model>  zset  the model's keys held back by a limit scope of that model (a cooldown
--                     or a spent budget of key·model or account·model); score = ms when to
--                     look again
--   ak:<account>  set  key ids of an account
--   scopes      set   names of the limit scopes below that exist
--   sw          zset  limit scopes that hold only a cooldown; score = ms when it ends (they
--                     are forgotten then)
--   s:a:<account>, s:am:<account>:<model>, s:km:<key_id>:<model>   hash  a limit scope
--                     (an account, an account for one model, a key for one model): its
--                     limits, budget times, in-flight and cooldown, in the key hash's names
-- A key hash's `loc` says where the key is: 'r' in the strategy sets, 'w' in wait,
-- '' nowhere (disabled). All time is Redis TIME, in milliseconds.

local K_META, PREFIX, K_ALL, K_FPS, K_WAIT, K_LEASES, K_LEASE, K_DONE, STRATEGY_ZSETS
local EPOCH, ACTIVE, ACTIVE_SET, DUE
local BEGUN_PREFIX, BEGUN_ZS
local STRATEGY_INDEX = { round_robin = 1, weighted = 2, best = 3, least_busy = 4, latency = 5 }

local NEVER = 1e300
local MINUTE, DAY = 60000, 86400000
local HI = 1099511627776   -- 2^40: separates a score's primary part from its tie-breaker
local EPOCH_US = 1704067200000000  -- 2024-01-01: `pass` (last served) counts µs from here
-- How long a record is kept: an expired lease's, for a late report; any other call's, to
-- recognise its repeat (a client resends within its socket timeout).
local KEEP_RECORD_MS, REPEAT_MS = 3600000, 60000
-- Scores written to sorted sets are whole numbers (ms, or µs for `pass`): Redis turns a
-- fractional Lua number into a long decimal string for every call.

-- A number argument as the client sends it (digits; '' = none).
local function number_arg(text)
  if text == '' or text == nil then return nil end
  return text + 0
end

local NOW_US = 0
local STAMP = nil   -- this call's time as text, "<seconds>.<microseconds>": see `v` below
local PAD_US = { '.00000', '.0000', '.000', '.00', '.0', '.' }
local function now_ms()
  local t = redis.call('TIME')
  NOW_US = t[1] * 1000000 + t[2]
  STAMP = t[1] .. PAD_US[#t[2]] .. t[2]
  return math.floor(NOW_US / 1000)
end


local function key_hash(id) return PREFIX .. 'k:' .. id end
local function model_set(model) return PREFIX .. 'm:' .. model end
local function account_set(account) return PREFIX .. 'ak:' .. account end
local function model_rotation(model) return PREFIX .. 'mr:' .. model end
local function model_waiting(model) return PREFIX .. 'mw:' .. model end

-- The models a key is assigned to (decoded once per call), or nil.
local function key_models(s)
  if s.models == nil or s.models == '' or s.models == '[]' then return nil end
  if s.model_list == nil then s.model_list = cjson.decode(s.models) end
  return s.model_list
end

-- Remember the earliest time housekeeping has work to do (only for a pool that exists:
-- a read of an unknown provider writes nothing).
local function note_due(at)
  if at < DUE and EPOCH then
    DUE = at
    redis.call('HSET', K_META, 'due', at)
  end
end

-- ---------------------------------------------------------------- a key's state

-- Numbers of a key hash (and their value when absent); every other field is text.
local NUMBERS = {
  en = 1, ['until'] = 0, probe_until = 0, weight = 1, maxc = 0, inflight = 0,
  rpm = 0, tpm = 0, rpd = 0, tpd = 0, itpm = 0, otpm = 0,
  t_rpm = 0, t_tpm = 0, t_rpd = 0, t_tpd = 0, t_itpm = 0, t_otpm = 0,
  pass = 0, wpass = 0, consec = 0, total = 0, ok = 0, err = 0, lat = 0, lat_n = 0,
  tokens = 0, tokens_in = 0, tokens_out = 0, rl_strikes = 0, opens = 0,
  last_used = 0, last_ok = 0, created = 0,
}

-- The key's state as a table, or nil when the key is not registered.
-- Absent fields read as their default (numbers) or '' (text), through a metatable: a key
-- hash holds only the fields that were ever written.
local DEFAULTS = nil   -- NUMBERS and the text fields' '' (made by begin(): a library's
                      -- top level may not iterate)
local STATE_MT = {}

-- Key states read by earlier calls. Loaded as functions, the library lives on between
-- calls, and reading a state back costs one field instead of the whole hash: every write
-- sets the hash's `v` to the writing call's STAMP, and a kept state is used only while `v`
-- is still the one it was kept at (and the pool's epoch the same). A hash edited by hand
-- without `v` is read whole again. (Run as scripts, every call starts with none kept.)
local KEPT, KEPT_COUNT, KEPT_MAX = {}, 0, 20000   -- (about 1.7 KB of the server's Lua each)
local KEEP_OFF = false   -- this call writes key hashes directly (register, admin): keep none

local function keep(key, s)
  if KEPT[key] == nil then
    if KEPT_COUNT >= KEPT_MAX then
      -- full: half of them go (whichever the table yields first)
      for name in pairs(KEPT) do
        KEPT[name] = nil
        KEPT_COUNT = KEPT_COUNT - 1
        if KEPT_COUNT <= KEPT_MAX / 2 then break end
      end
    end
    KEPT_COUNT = KEPT_COUNT + 1
  end
  KEPT[key] = s
end

-- For a call that writes key `id`'s hash other than through flush(): nothing is kept during
-- it, and what was kept of that key is forgotten.
local function forget_kept(key)
  if KEPT[key] ~= nil then
    KEPT[key] = nil
    KEPT_COUNT = KEPT_COUNT - 1
  end
end

local function keep_nothing(id)
  KEEP_OFF = true
  forget_kept(key_hash(id))
end

-- The state kept for hash `key`, while its `v` says it is the hash's (else nil).
local function kept_state(key)
  local kept = not KEEP_OFF and KEPT[key]
  if not kept then return nil end
  if kept.ep == EPOCH and kept.v == redis.call('HGET', key, 'v') then return kept end
  forget_kept(key)
  return nil
end

-- Hash `key` read whole into state table `s` (which holds its name); nil when the hash
-- does not exist.
local function read_state(key, s)
  local raw = redis.call('HGETALL', key)
  if #raw == 0 then return nil end
  setmetatable(s, STATE_MT)
  for i = 1, #raw, 2 do
    local name = raw[i]
    -- (`+ 0` turns the stored text into a number without a function call)
    if NUMBERS[name] then s[name] = raw[i + 1] + 0 else s[name] = raw[i + 1] end
  end
  return s
end

-- Keep state `s` of hash `key` for later calls, if it carries a stamp.
local function keep_stamped(key, s)
  if s.v and EPOCH and not KEEP_OFF then
    s.ep = EPOCH
    keep(key, s)
  end
end

-- Write the changes queued in w to hash `key` with this call's stamp; `s` is kept as written.
local function write_state(key, s, w)
  w[#w + 1] = 'v'
  w[#w + 1] = STAMP
  redis.call('HSET', key, unpack(w))
  s.v = STAMP
  keep_stamped(key, s)
end

local function load(id)
  local key = key_hash(id)
  local s = kept_state(key)
  if s then return s end
  s = read_state(key, { id = id })
  if not s or not rawget(s, 'fp') then return nil end
  if s.weight <= 0 then s.weight = 1 end
  keep_stamped(key, s)
  return s
end

-- The limits whose change makes a state work out its budgets again (active_budgets).
local LIMIT_NAMES = { rpm = true, tpm = true, rpd = true, tpd = true, itpm = true, otpm = true }

-- Changes to write: set(s, w, name, value) updates s and queues the field; flush writes.
-- (A state changed but not yet written is never taken as the hash's: `v` is cleared.)
local function set(s, w, name, value)
  s[name] = value
  s.v = false
  if LIMIT_NAMES[name] then s.budgets = nil end
  w[#w + 1] = name
  w[#w + 1] = value
end

local function flush(s, w)
  if #w > 0 then write_state(key_hash(s.id), s, w) end
end

-- ---------------------------------------------------------------- limit scopes

local SCOPE_CACHE = nil   -- scope suffix -> state table, or false when absent (per call;
                         -- made on first use)

-- A limit scope's state ("a:<account>", "am:<account>:<model>", "km:<key_id>:<model>"),
-- or false when it does not exist. Kept between calls as key states are (by `v`).
local function load_scope(name)
  if not SCOPE_CACHE then SCOPE_CACHE = {} end
  local cached = SCOPE_CACHE[name]
  if cached ~= nil then return cached end
  local key = PREFIX .. 's:' .. name
  local h = kept_state(key)
  if not h then
    h = read_state(key, { name = name }) or false
    if h then keep_stamped(key, h) end
  end
  SCOPE_CACHE[name] = h
  return h
end

local function scope_flush(h, w)
  if #w == 0 then return end
  write_state(PREFIX .. 's:' .. h.name, h, w)
  if h.new then   -- listed once, when made
    redis.call('SADD', PREFIX .. 'scopes', h.name)
    h.new = nil
  end
end

-- A scope made on first use (a cooldown for a key and model, an account's limits).
local function scope_or_new(name)
  local h = load_scope(name)
  if h then return h end
  h = setmetatable({ name = name, new = true }, STATE_MT)
  SCOPE_CACHE[name] = h   -- (made by load_scope above)
  return h
end

-- A scope that holds nothing but a cooldown is forgotten when the cooldown ends.
local SCOPE_LIMITS = { 'rpm', 'tpm', 'rpd', 'tpd', 'itpm', 'otpm', 'maxc' }
local function scope_idle(h, now)
  if h['until'] > now or h.inflight > 0 then return false end
  for i = 1, #SCOPE_LIMITS do
    if h[SCOPE_LIMITS[i]] > 0 then return false end
  end
  return true
end

local function forget_scope(name)
  redis.call('DEL', PREFIX .. 's:' .. name)
  forget_kept(PREFIX .. 's:' .. name)
  redis.call('SREM', PREFIX .. 'scopes', name)
  redis.call('ZREM', PREFIX .. 'sw', name)
  if SCOPE_CACHE then SCOPE_CACHE[name] = false end
end

-- ---------------------------------------------------------------- budgets (GCRA)
-- Each budget of a key (or of a limit scope) is a token bucket of `limit` units per
-- `period` ms, kept as its theoretical arrival time t_<name> (ms).
-- The units a request costs: req (1 per request), tok (all tokens), inp, out.
local BUDGETS = {
  { 'rpm', 't_rpm', MINUTE, 'req' }, { 'rpd', 't_rpd', DAY, 'req' },
  { 'tpm', 't_tpm', MINUTE, 'tok' }, { 'tpd', 't_tpd', DAY, 'tok' },
  { 'itpm', 't_itpm', MINUTE, 'inp' }, { 'otpm', 't_otpm', MINUTE, 'out' },
}

-- The budgets h has a limit for (worked out once per state, again when a limit changes).
local function active_budgets(h)
  local list = rawget(h, 'budgets')
  if list == nil then
    list = {}
    for i = 1, #BUDGETS do
      if h[BUDGETS[i][1]] > 0 then list[#list + 1] = BUDGETS[i] end
    end
    h.budgets = list
  end
  return list
end

-- When could a request costing n units be admitted? (0 = no limit; NEVER = it never can.)
local function budget_at(limit, period, tat, n)
  if limit <= 0 then return 0 end
  if n > limit then return NEVER end
  return tat + n * (period / limit) - period
end

-- Units a budget still admits right now (-1 = no limit).
local function budget_left(limit, period, tat, now)
  if limit <= 0 then return -1 end
  local used = math.max(tat, now) - now
  return math.max(0, math.floor((period - used) / (period / limit) + 1e-9))
end

-- The earliest time every budget of h admits `cost` ({req=, tok=, inp=, out=}), and which
-- budget is the last to; 0 when all admit it now.
local function budgets_at(h, cost, now)
  local at, why = 0, ''
  local list = active_budgets(h)
  for i = 1, #list do
    local b = list[i]
    local t = budget_at(h[b[1]], b[3], h[b[2]], cost[b[4]])
    if t > now and t > at then at, why = t, b[1] end
  end
  return at, why
end

-- Charge `cost` to every budget of h (queued in w).
local function budgets_charge(h, w, cost, now)
  local list = active_budgets(h)
  for i = 1, #list do
    local b = list[i]
    if cost[b[4]] ~= 0 then
      set(h, w, b[2], math.max(h[b[2]], now) + cost[b[4]] * (b[3] / h[b[1]]))
    end
  end
end

-- Settle a reservation: charge what was used beyond the estimate, give back what was not
-- (never below now: unused units are not banked for later).
local function budgets_settle(h, w, est, used, now)
  local list = active_budgets(h)
  for i = 1, #list do
    local b = list[i]
    local limit = h[b[1]]
    local unit = b[4]
    if unit ~= 'req' and used[unit] and used[unit] ~= est[unit] then
      local tat = h[b[2]]
      local delta = (used[unit] - est[unit]) * (b[3] / limit)
      if delta > 0 then tat = math.max(tat, now) + delta else tat = math.max(now, tat + delta) end
      set(h, w, b[2], tat)
    end
  end
end

-- Start every budget spent (a key re-registered after the pool's state was lost): the
-- bound "admitted over D <= limit + limit*D/period" then holds across the loss.
local function budgets_spend_all(h, w, now)
  for i = 1, #BUDGETS do
    local b = BUDGETS[i]
    if h[b[1]] > 0 then set(h, w, b[2], now + b[3]) end
  end
end

-- ---------------------------------------------------------------- availability

-- When the key's earliest own lease expires (for a key full of leases).
local function min_score(zset)
  local first = redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')
  if first[2] then return tonumber(first[2]) end
  return nil
end

-- When a key full of leases looks again: when the first open lease expires (its own or
-- another key's: never later than its own; a report frees a slot at once anyway).
local function first_lease_expiry()
  return min_score(K_LEASES) or 0
end

local ONE_REQUEST = { req = 1, tok = 0, inp = 0, out = 0 }

-- When could scope h take a request of `cost`? 0 = now. Also says why.
local function scope_at(h, cost, now)
  local at, why = 0, ''
  if h['until'] > now then at, why = h['until'], h.why end
  local b, bwhy = budgets_at(h, cost, now)
  if b > at then at, why = b, bwhy end
  if h.maxc > 0 and h.inflight >= h.maxc then
    local t = min_score(K_LEASES) or NEVER
    if t > at then at, why = t, 'concurrency' end
  end
  if at <= now then return 0, '' end
  return at, why
end

-- When could the key take a request again (ignoring its size)? 0 = now, NEVER = not
-- before an operator acts. Also says why.
local function available_at(s, now)
  if s.en == 0 then return NEVER, 'disabled' end
  local at, why = 0, ''
  if s['until'] > now then at, why = s['until'], s.why end
  if s.circ == 'half' and s.probe_until > now and s.probe_until > at then
    at, why = s.probe_until, 'probe'
  end
  local b, bwhy = budgets_at(s, ONE_REQUEST, now)
  if b > at then at, why = b, bwhy end
  if s.maxc > 0 and s.inflight >= s.maxc then
    b = first_lease_expiry()
    if b > at then at, why = b, 'concurrency' end
  end
  if s.acct ~= '' then   -- the key's account, for any model
    local a = load_scope('a:' .. s.acct)
    if a then
      b, bwhy = scope_at(a, ONE_REQUEST, now)
      if b > at then at, why = b, bwhy end
    end
  end
  if at <= now then return 0, '' end
  return at, why
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
-- the time to look again when not, nowhere when disabled. Changes are queued in w;
-- `rescore` (when the key stays available): 'all' or 'stats' (the sets whose scores
-- follow errors, in-flight and latency). Returns available_at, why.
local function place(s, w, now, rescore)
  local at, why = available_at(s, now)
  if at == 0 then
    if s.loc ~= 'r' then
      -- Joining the weighted rotation at its current pass, so it cannot monopolise it.
      -- (The plain rotation is least-recently-served order: a key coming back is served
      -- once, then queues behind the others.)
      if ACTIVE_SET[2] then
        local floor_wrr = min_score(STRATEGY_ZSETS[2])
        if floor_wrr and s.wpass < floor_wrr then set(s, w, 'wpass', floor_wrr) end
      end
      for j = 1, #ACTIVE do redis.call('ZADD', STRATEGY_ZSETS[ACTIVE[j]], score(s, ACTIVE[j]), s.id) end
      local models = key_models(s)
      if models then
        for j = 1, #models do redis.call('ZADD', model_rotation(models[j]), s.pass, s.id) end
      end
      if s.loc == 'w' then redis.call('ZREM', K_WAIT, s.id) end
      set(s, w, 'loc', 'r')
    elseif rescore then
      for j = 1, #ACTIVE do
        local i = ACTIVE[j]
        if rescore == 'all' or i > 2 then redis.call('ZADD', STRATEGY_ZSETS[i], score(s, i), s.id) end
      end
      local models = rescore == 'all' and key_models(s)
      if models then
        for j = 1, #models do redis.call('ZADD', model_rotation(models[j]), 'XX', s.pass, s.id) end
      end
    end
  else
    if s.loc == 'r' then
      for j = 1, #ACTIVE do redis.call('ZREM', STRATEGY_ZSETS[ACTIVE[j]], s.id) end
      local models = key_models(s)
      if models then
        for j = 1, #models do redis.call('ZREM', model_rotation(models[j]), s.id) end
      end
    end
    if at >= NEVER then
      if s.loc == 'w' then redis.call('ZREM', K_WAIT, s.id) end
      if s.loc ~= '' then set(s, w, 'loc', '') end
    else
      local wake = math.ceil(at)
      redis.call('ZADD', K_WAIT, wake, s.id)
      note_due(wake)
      if s.loc ~= 'w' then set(s, w, 'loc', 'w') end
    end
  end
  return at, why
end

-- Re-place a key after a change, writing the queued changes.
local function replace(s, w, now)
  local at, why = place(s, w, now, 'all')
  flush(s, w)
  return at, why
end

-- Re-place every key of an account (its limits or cooldown changed).
local function replace_account(acct, now)
  local ids = redis.call('SMEMBERS', account_set(acct))
  for i = 1, #ids do
    local s = load(ids[i])
    if s then replace(s, {}, now) end
  end
end

-- The limit scopes that apply to a request on key s for `model` ('' = any): the
-- account's, the account's for the model, the key's for the model (those that exist).
-- Each entry: {letter, state}.
local NO_SCOPES = {}   -- (shared: never added to)
local NO_ESTIMATE = { tok = 0, inp = 0, out = 0 }   -- (shared: never changed)
local function scopes_for(s, model)
  if s.acct == '' and model == '' then return NO_SCOPES end
  local out = {}
  if s.acct ~= '' then
    local a = load_scope('a:' .. s.acct)
    if a then out[#out + 1] = { 'a', a } end
    if model ~= '' then
      local am = load_scope('am:' .. s.acct .. ':' .. model)
      if am then out[#out + 1] = { 'm', am } end
    end
  end
  if model ~= '' then
    local km = load_scope('km:' .. s.id .. ':' .. model)
    if km then out[#out + 1] = { 'k', km } end
  end
  return out
end

-- A scope's in-flight count went down: if it was full, the keys it held back may serve
-- again (out of `wait`, or back into the model's rotation) before the time they were
-- parked until.
local function scope_released(letter, h, key_id, acct, model, now)
  local w = {}
  local was_full = h.maxc > 0 and h.inflight >= h.maxc
  set(h, w, 'inflight', math.max(0, h.inflight - 1))
  scope_flush(h, w)
  if not was_full then return end
  if letter == 'a' then
    replace_account(acct, now)
    return
  end
  local ids = { key_id }
  if letter == 'm' then ids = redis.call('SMEMBERS', account_set(acct)) end
  for i = 1, #ids do
    if redis.call('ZREM', model_waiting(model), ids[i]) == 1 then
      local s = load(ids[i])
      if s and s.loc == 'r' then redis.call('ZADD', model_rotation(model), s.pass, s.id) end
    end
  end
end

-- The scope a record's letter names.
local function scope_of(letter, key_id, acct, model)
  if letter == 'a' then return load_scope('a:' .. acct) end
  if letter == 'm' then return load_scope('am:' .. acct .. ':' .. model) end
  return load_scope('km:' .. key_id .. ':' .. model)
end

-- Make sure the model's rotation exists (built from its available keys the first time:
-- kept up to date from then on by place()).
local function ensure_model_rotation(model)
  if redis.call('SADD', PREFIX .. 'mrs', model) == 0 then return end
  local ids = redis.call('SMEMBERS', model_set(model))
  for i = 1, #ids do
    local s = load(ids[i])
    if s and s.loc == 'r' then redis.call('ZADD', model_rotation(model), s.pass, s.id) end
  end
end

-- A model left with no key: its rotation goes too.
local function drop_model_rotation(model)
  redis.call('DEL', model_rotation(model), model_waiting(model))
  redis.call('SREM', PREFIX .. 'mrs', model)
end

-- ---------------------------------------------------------------- leases and records

-- A call's record: which key served it, what it reserved, the key's account ('-': none)
-- and the scopes whose in-flight count it holds (letters: a account, m account·model,
-- k key·model; '-': none).
local function record(key_id, tok, inp, out, ttl, model, acct, held)
  return key_id .. '\n' .. tok .. ' ' .. inp .. ' ' .. out .. ' ' .. ttl .. ' ' ..
    ((acct or '') ~= '' and acct or '-') .. ' ' .. ((held or '') ~= '' and held or '-') ..
    '\n' .. model
end

local function parse_record(r)
  local key_id, tok, inp, out, ttl, acct, held, model =
    string.match(r, '^([^\n]*)\n(%d+) (%d+) (%d+) (%d+) (%S+) (%S+)\n(.*)$')
  if not key_id then return nil end
  -- (`+ 0`: the digits matched are a number)
  return { key_id = key_id, tok = tok + 0, inp = inp + 0, out = out + 0, ttl = ttl + 0,
    model = model, acct = acct ~= '-' and acct or '', held = held ~= '-' and held or '' }
end

-- Keep a record (without an open lease) until `forget_at`, to recognise a repeated call.
local function keep_record(id, rec, forget_at)
  redis.call('HSET', K_LEASE, id, rec)
  redis.call('ZADD', K_DONE, forget_at, id)
  note_due(forget_at)
end

-- Close an open lease of key s: it leaves the lease sets and the key's in-flight count.
-- True when it was open (so in-flight always equals the open leases).
local function close_lease(s, w, lease_id)
  if redis.call('ZREM', K_LEASES, lease_id) == 0 then return false end
  if s then set(s, w, 'inflight', math.max(0, s.inflight - 1)) end
  return true
end

-- Free leases whose holder did not report in time (a crashed or hung process), forget
-- old records, and bring back the keys whose cooldown, budget refill or lease expiry has
-- come. Runs only when something is due.
local function housekeeping(now)
  if now < DUE or not EPOCH then return end
  local expired = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, 256)
  for i = 1, #expired do
    local lease_id = expired[i]
    local rec = redis.call('HGET', K_LEASE, lease_id)
    local r = rec and parse_record(rec)
    local s = r and load(r.key_id)
    local w = {}
    if close_lease(s, w, lease_id) and r then
      for letter in string.gmatch(r.held, '%a') do
        local h = scope_of(letter, r.key_id, r.acct, r.model)
        if h then scope_released(letter, h, r.key_id, r.acct, r.model, now) end
      end
    end
    if s then replace(s, w, now) end
    -- a report may still come (the call did run): it is counted, once
    if rec then keep_record(lease_id, rec, now + KEEP_RECORD_MS) end
  end
  local ended = redis.call('ZRANGEBYSCORE', PREFIX .. 'sw', '-inf', now, 'LIMIT', 0, 64)
  for i = 1, #ended do
    local h = load_scope(ended[i])
    if h and scope_idle(h, now) then
      forget_scope(ended[i])
    else
      redis.call('ZREM', PREFIX .. 'sw', ended[i])
    end
  end
  local old = redis.call('ZRANGEBYSCORE', K_DONE, '-inf', now, 'LIMIT', 0, 256)
  if #old > 0 then
    redis.call('HDEL', K_LEASE, unpack(old))
    redis.call('ZREM', K_DONE, unpack(old))
  end
  for _ = 1, 8 do
    local due = redis.call('ZRANGEBYSCORE', K_WAIT, '-inf', now, 'LIMIT', 0, 128)
    if #due == 0 then break end
    for i = 1, #due do
      local s = load(due[i])
      if s then
        local w = {}
        if s.loc ~= 'w' then set(s, w, 'loc', 'w') end   -- it is in wait, whatever the hash says
        replace(s, w, now)
      else
        redis.call('ZREM', K_WAIT, due[i])
      end
    end
  end
  local next_due = NEVER
  for _, z in ipairs({ K_WAIT, K_LEASES, K_DONE, PREFIX .. 'sw' }) do
    local m = min_score(z)
    -- old records are forgotten in batches, at most once a second
    if m and z == K_DONE then m = m + 1000 end
    if m and m < next_due then next_due = m end
  end
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
-- functions, the library lives on between calls: the tables made from the prefix and from
-- the meta `zs` are kept while they stay the same.
local function begin(keys, args)
  if args[1] ~= BEGUN_PREFIX then
    K_META, PREFIX = keys[1], args[1]
    K_ALL, K_FPS, K_WAIT = PREFIX .. 'all', PREFIX .. 'fps', PREFIX .. 'wait'
    K_LEASES, K_LEASE, K_DONE = PREFIX .. 'leases', PREFIX .. 'lease', PREFIX .. 'done'
    STRATEGY_ZSETS = { PREFIX .. 'rr', PREFIX .. 'wrr', PREFIX .. 'best', PREFIX .. 'busy', PREFIX .. 'lat' }
    BEGUN_PREFIX, BEGUN_ZS = args[1], nil
  end
  SCOPE_CACHE = nil
  KEEP_OFF = false
  STAMP = nil   -- set by now_ms(): a write before it fails rather than reuse an older stamp
  if not DEFAULTS then
    DEFAULTS = { circ = '', loc = '', why = '', sealed = '', acct = '' }
    for name, default in pairs(NUMBERS) do DEFAULTS[name] = default end
    STATE_MT.__index = DEFAULTS
  end
  local meta = redis.call('HMGET', K_META, 'epoch', 'zs', 'due')
  EPOCH = meta[1]
  local zs = meta[2] or ''
  if zs ~= BEGUN_ZS then
    ACTIVE = { 1 }
    ACTIVE_SET = { [1] = true }
    for i in string.gmatch(zs, '%d') do
      local n = tonumber(i)
      if not ACTIVE_SET[n] then ACTIVE[#ACTIVE + 1] = n; ACTIVE_SET[n] = true end
    end
    BEGUN_ZS = zs
  end
  DUE = tonumber(meta[3]) or NEVER
end
