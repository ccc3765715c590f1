-- One decision over the counters of one request (or over the share of them that lives in one
-- Redis Cluster slot), atomically: Redis runs a script to its end before any other command.
-- This header is the one description of the call; ratelimit/storage/redis_counters.py builds the
-- call (SlotGroup) and decodes the reply (ScriptReply) by exactly this layout.
--
-- KEYS  per counter i = 1..n: KEYS[2i-1] the counter (hash), KEYS[2i] its reservations (sorted set:
--       reservation id -> expiry ms); then, when ARGV[7] == '1', KEYS[2n+i] the index of counter i's
--       limit (sorted set: counter key -> the time the counter stops being live), which /counters reads.
-- ARGV  1 mode (ratelimit.storage.base.Operation): A check-and-update, C check, U update, R reserve,
--         M commit (release the reservation if held, then charge; nothing when this id was committed before)
--       2 now in ms, or '' to take Redis' own TIME (so every replica uses one clock)
--       3 delta (A, C, U, M) or amount (R)
--       4 reservation id (R, M)      5 reservation ttl ms (R)
--       6 extra ms keys outlive their window (window ends are stored, so eviction is only cleanup)
--       7 '1' when index keys follow the counters' keys
--       then per counter i: ARGV[6+2i] max_value, ARGV[7+2i] window ms
-- Counter fields: v value, e window end ms, r total reserved, n reservations held, 'r:'..id the
-- amount reservation id holds, 'c:'..id present once id was committed, until the reservation's
-- ttl: a retried commit of the same id charges nothing. The mark is also a member 'c:'..id of the
-- reservations set, scored by minus the reservation's expiry: held reservations keep the positive
-- scores (so the top one is still the last to expire), and marks whose time has passed are the
-- range [-now, 0]. The script reads all fields first, so it writes absolute values.
-- Reply (integers)
--       1 now (ms)
--       2 first counter without room (1-based, 0 = none)
--       3 1 if the reservation was held (M), else 0
--       then 4 per counter i, at 4i .. 4i+3: value in the running window, window end ms (0 = none),
--         reserved, new live-until time ms (0 = unchanged; the caller indexes it when the script could not)

local mode = ARGV[1]
local now = tonumber(ARGV[2])
if not now then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
local delta = tonumber(ARGV[3])
local id = ARGV[4]
local n = (#ARGV - 7) / 2
local decides = mode == 'A' or mode == 'C' or mode == 'R'

local value, ends, raw_ends, reserved, held_count = {}, {}, {}, {}, {}
local first = 0

for i = 1, n do
  local k, z = KEYS[2 * i - 1], KEYS[2 * i]
  local state = redis.call('HMGET', k, 'v', 'e', 'r', 'n')
  raw_ends[i] = tonumber(state[2]) or 0
  if raw_ends[i] > now then
    value[i], ends[i] = tonumber(state[1]), raw_ends[i]
  else
    value[i], ends[i] = 0, 0
  end
  reserved[i], held_count[i] = tonumber(state[3]) or 0, tonumber(state[4]) or 0
  if held_count[i] > 0 then
    -- Reservations whose ttl has passed give their hold back before anything is decided.
    local expired = redis.call('ZRANGEBYSCORE', z, 0, now)
    if #expired > 0 then
      for _, rid in ipairs(expired) do
        reserved[i] = reserved[i] - (tonumber(redis.call('HGET', k, 'r:' .. rid)) or 0)
        redis.call('HDEL', k, 'r:' .. rid)
      end
      redis.call('ZREMRANGEBYSCORE', z, 0, now)
      held_count[i] = held_count[i] - #expired
      redis.call('HSET', k, 'r', reserved[i], 'n', held_count[i])
    end
    -- Committed ids' marks whose reservation ttl has passed (swept with the holds; otherwise they
    -- go with the keys' own expiry).
    local spent = redis.call('ZRANGEBYSCORE', z, -now, '(0')
    if #spent > 0 then
      for _, mark in ipairs(spent) do
        redis.call('HDEL', k, mark)
      end
      redis.call('ZREMRANGEBYSCORE', z, -now, '(0')
    end
  end
  if decides and first == 0 and value[i] + reserved[i] + delta > tonumber(ARGV[6 + 2 * i]) then
    first = i
  end
end

local held = 0
local repeated = false
if mode == 'M' then
  for i = 1, n do
    if redis.call('HEXISTS', KEYS[2 * i - 1], 'c:' .. id) == 1 then
      repeated = true
    end
  end
  for i = 1, n do
    local k, z = KEYS[2 * i - 1], KEYS[2 * i]
    local amount = tonumber(redis.call('HGET', k, 'r:' .. id))
    if amount and not repeated then
      local expires = tonumber(redis.call('ZSCORE', z, id)) or now
      redis.call('HDEL', k, 'r:' .. id)
      redis.call('ZREM', z, id)
      redis.call('HSET', k, 'c:' .. id, 1)
      redis.call('ZADD', z, string.format('%d', -expires), 'c:' .. id)
      reserved[i], held_count[i] = reserved[i] - amount, held_count[i] - 1
      redis.call('HSET', k, 'r', reserved[i], 'n', held_count[i])
      held = 1
    end
  end
end

-- A counter lives (keys kept, listed by /counters) until its window and its last reservation end.
local function live_until(i)
  local top = redis.call('ZRANGE', KEYS[2 * i], -1, -1, 'WITHSCORES')
  return math.max(ends[i], tonumber(top[2]) or 0)
end

-- When that time grew, Redis' own expiry (cleanup only) and the index follow.
local extended = {}
local function extend(i, before)
  local after = live_until(i)
  if after <= before then
    return
  end
  local keep = string.format('%d', after - now + tonumber(ARGV[6]))
  redis.call('PEXPIRE', KEYS[2 * i - 1], keep)
  redis.call('PEXPIRE', KEYS[2 * i], keep)
  extended[i] = after
  if ARGV[7] == '1' then
    local index = KEYS[2 * n + i]
    redis.call('ZADD', index, 'GT', string.format('%d', after), KEYS[2 * i - 1])
    redis.call('ZREMRANGEBYSCORE', index, '-inf', string.format('%d', now))
  end
end

local charge = delta > 0 and (mode == 'U' or (mode == 'M' and not repeated) or (mode == 'A' and first == 0))
if charge then
  for i = 1, n do
    if ends[i] == 0 then
      -- A new window starts at the counter's first hit (Limitador's fixed window).
      local before = math.max(live_until(i), raw_ends[i])
      value[i], ends[i] = delta, now + tonumber(ARGV[7 + 2 * i])
      redis.call('HSET', KEYS[2 * i - 1], 'v', delta, 'e', string.format('%d', ends[i]))
      extend(i, before)
    else
      value[i] = value[i] + delta
      redis.call('HSET', KEYS[2 * i - 1], 'v', value[i])
    end
  end
elseif mode == 'R' and first == 0 then
  local expires = string.format('%d', now + tonumber(ARGV[5]))
  for i = 1, n do
    local k = KEYS[2 * i - 1]
    local before = math.max(live_until(i), raw_ends[i])
    -- An amount of 0 holds nothing but is still recorded, so commit can tell it was held.
    reserved[i], held_count[i] = reserved[i] + delta, held_count[i] + 1
    redis.call('HSET', k, 'r:' .. id, delta, 'r', reserved[i], 'n', held_count[i])
    redis.call('ZADD', KEYS[2 * i], expires, id)
    extend(i, before)
  end
end

local reply = {now, first, held}
for i = 1, n do
  local at = 4 * i
  reply[at], reply[at + 1], reply[at + 2], reply[at + 3] = value[i], ends[i], reserved[i], extended[i] or 0
end
return reply
