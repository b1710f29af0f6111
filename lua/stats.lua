-- stats: read keys' state, with what follows from it now (budgets left, in flight, status).
-- Writes nothing but the housekeeping every script does (expired leases, due keys), and
-- nothing at all for a provider without a pool.
--
-- KEYS[1]     "<prefix>meta" (see lib.lua)
-- ARGV[1]     prefix "<ns>:{<provider>}:"
-- ARGV[2..n]  key ids; none = every key of the provider
--
-- Reply: {now_ms, {key_id, {field, value, ...}, {available_at_ms_or_-1, why, rpm_left,
--         tpm_left, rpd_left, in_flight, tpd_left, itpm_left, otpm_left},
--         {model, cooling_until_ms, why, ...}}, ...} ; a key that is not registered is left
--         out. The last list names the models the key cools for (its key·model scopes).

local now = now_ms()
DUE = 0
housekeeping(now)

local ids = {}
if #ARGV > 1 then
  for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  ids = redis.call('SMEMBERS', K_ALL)
  table.sort(ids)
end

-- the key·model scopes cooling now, by key
local cooling = {}
local scope_names = redis.call('SMEMBERS', PREFIX .. 'scopes')
for i = 1, #scope_names do
  local key_id, model = string.match(scope_names[i], '^km:([^:]+):(.*)$')
  if key_id then
    local h = load_scope(scope_names[i])
    if h and h['until'] > now then
      cooling[key_id] = cooling[key_id] or {}
      local list = cooling[key_id]
      list[#list + 1] = model; list[#list + 1] = math.floor(h['until']); list[#list + 1] = h.why
    end
  end
end

local out = { now }
for i = 1, #ids do
  local s = load(ids[i])
  if s then
    local at, why = available_at(s, now)
    if at >= NEVER then at = -1 end
    local raw = redis.call('HGETALL', key_hash(ids[i]))
    local clean = {}
    for j = 1, #raw, 2 do
      if raw[j] ~= 'sealed' then
        clean[#clean + 1] = raw[j]; clean[#clean + 1] = raw[j + 1]
      end
    end
    out[#out + 1] = ids[i]
    out[#out + 1] = clean
    out[#out + 1] = { math.floor(at), why,
      budget_left(s.rpm, MINUTE, s.t_rpm, now),
      budget_left(s.tpm, MINUTE, s.t_tpm, now),
      budget_left(s.rpd, DAY, s.t_rpd, now),
      s.inflight,
      budget_left(s.tpd, DAY, s.t_tpd, now),
      budget_left(s.itpm, MINUTE, s.t_itpm, now),
      budget_left(s.otpm, MINUTE, s.t_otpm, now) }
    out[#out + 1] = cooling[ids[i]] or {}
  end
end
return out
