-- One decision over the counters of one request (or over the share of them that lives in one
-- Redis Cluster slot), atomically: Redis runs a script to its end before any other command.
--
-- KEYS  per counter i = 1..n: KEYS[2i-1] the counter (hash), KEYS[2i] its reservations (sorted set:
--       reservation id -> expiry ms); then, when ARGV[7] == '1', KEYS[2n+i] the index of counter i's
--       limit (sorted set: counter key -> the time the counter stops being live), which /counters reads.
-- ARGV  1 mode: A check-and-update, C check, U update, R reserve, M commit (release the reservation
--         if held, then charge)
--       2 now in ms, or '' to take Redis' own TIME (so every replica uses one clock)
--       3 delta (A, C, U, M) or amount (R)
--       4 reservation id (R, M)      5 reservation ttl ms (R)
--       6 extra ms keys outlive their window (window ends are stored, so eviction is only cleanup)
--       7 '1' when index keys follow the counters' keys
--       then per counter i: ARGV[6+2i] max_value, ARGV[7+2i] window ms
-- Counter fields: v value, e window end ms, r total reserved, 'r:'..id the amount reservation id holds.
-- Reply {now, first counter without room (1-based, 0 = none), 1 if the reservation was held (M),
--        then per counter: value in the running window, window end (0 = none), reserved,
--        new live-until time (0 = unchanged; the caller indexes it when the script could not)}.

local mode = ARGV[1]
local now = tonumber(ARGV[2])
if not now then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
local delta = tonumber(ARGV[3])
local id = ARGV[4]
local ttl = tonumber(ARGV[5])
local grace = tonumber(ARGV[6])
local indexed = ARGV[7] == '1'
local n = (#ARGV - 7) / 2
local decides = mode == 'A' or mode == 'C' or mode == 'R'

local value, ends, raw_ends, reserved, live_until = {}, {}, {}, {}, {}
local first = 0

-- The latest reservation expiry on a counter (0 when none).
local function last_expiry(z)
  local top = redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')
  return tonumber(top[2]) or 0
end

-- Reservations whose ttl has passed give their hold back before anything is decided.
local function release_expired(k, z)
  local ids = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  if #ids == 0 then
    return
  end
  local freed = 0
  for _, rid in ipairs(ids) do
    freed = freed + (tonumber(redis.call('HGET', k, 'r:' .. rid)) or 0)
    redis.call('HDEL', k, 'r:' .. rid)
  end
  redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
  if freed ~= 0 then
    redis.call('HINCRBY', k, 'r', -freed)
  end
end

for i = 1, n do
  local k, z = KEYS[2 * i - 1], KEYS[2 * i]
  release_expired(k, z)
  local state = redis.call('HMGET', k, 'v', 'e', 'r')
  raw_ends[i] = tonumber(state[2]) or 0
  if raw_ends[i] > now then
    value[i], ends[i] = tonumber(state[1]), raw_ends[i]
  else
    value[i], ends[i] = 0, 0
  end
  reserved[i] = tonumber(state[3]) or 0
  live_until[i] = 0
  if decides and first == 0 and value[i] + reserved[i] + delta > tonumber(ARGV[6 + 2 * i]) then
    first = i
  end
end

local held = 0
if mode == 'M' then
  for i = 1, n do
    local k = KEYS[2 * i - 1]
    local amount = tonumber(redis.call('HGET', k, 'r:' .. id))
    if amount then
      redis.call('HDEL', k, 'r:' .. id)
      redis.call('ZREM', KEYS[2 * i], id)
      if amount ~= 0 then
        redis.call('HINCRBY', k, 'r', -amount)
      end
      reserved[i] = reserved[i] - amount
      held = 1
    end
  end
end

-- Keys live as long as their window or their last reservation; a counter whose live-until time
-- grew gets a longer PEXPIRE (Redis' cleanup) and a fresh index entry.
local function extend(i, before)
  local k, z = KEYS[2 * i - 1], KEYS[2 * i]
  local after = math.max(ends[i], last_expiry(z))
  if after <= before then
    return
  end
  local keep = string.format('%d', after - now + grace)
  redis.call('PEXPIRE', k, keep)
  redis.call('PEXPIRE', z, keep)
  live_until[i] = after
  if indexed then
    local index = KEYS[2 * n + i]
    redis.call('ZADD', index, 'GT', string.format('%d', after), k)
    redis.call('ZREMRANGEBYSCORE', index, '-inf', string.format('%d', now))
  end
end

local charge = delta > 0 and (mode == 'U' or mode == 'M' or (mode == 'A' and first == 0))
if charge then
  for i = 1, n do
    local k = KEYS[2 * i - 1]
    if ends[i] == 0 then
      -- A new window starts at the counter's first hit (Limitador's fixed window).
      local before = math.max(raw_ends[i], last_expiry(KEYS[2 * i]))
      value[i], ends[i] = delta, now + tonumber(ARGV[7 + 2 * i])
      redis.call('HSET', k, 'v', delta, 'e', string.format('%d', ends[i]))
      extend(i, before)
    else
      value[i] = value[i] + delta
      redis.call('HINCRBY', k, 'v', delta)
    end
  end
elseif mode == 'R' and first == 0 then
  local expires = now + ttl
  for i = 1, n do
    local k, z = KEYS[2 * i - 1], KEYS[2 * i]
    local before = math.max(raw_ends[i], last_expiry(z))
    -- An amount of 0 holds nothing but is still recorded, so commit can tell it was held.
    redis.call('HSET', k, 'r:' .. id, delta)
    redis.call('HINCRBY', k, 'r', delta)
    redis.call('ZADD', z, string.format('%d', expires), id)
    reserved[i] = reserved[i] + delta
    extend(i, before)
  end
end

local reply = {now, first, held}
for i = 1, n do
  reply[#reply + 1] = value[i]
  reply[#reply + 1] = ends[i]
  reply[#reply + 1] = reserved[i]
  reply[#reply + 1] = live_until[i]
end
return reply
