"""The Lua scripts behind every state change of a job.

Each runs atomically on the server. Everything a worker writes after taking an entry carries the fencing token
it got from ``START``; a worker whose entry was reclaimed by another node holds a stale token, so its progress,
completion and acknowledgement are all refused. ``XACK`` itself checks no ownership, which is why it only ever
happens inside these scripts.
"""

# KEYS: job, stream, index, idempotency
# ARGV: job id, created (ms), idempotency ttl (s), has idempotency key ('1'/'0'), field, value, ...
CREATE = """
if ARGV[4] == '1' then
  local existing = redis.call('GET', KEYS[4])
  if existing then return {'exists', existing} end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists', ARGV[1]} end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
if ARGV[4] == '1' then redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[3]) end
if redis.call('HGET', KEYS[1], 'state') == 'queued' then
  redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
end
return {'created', ARGV[1]}
"""

# KEYS: job, stream
# ARGV: group, entry id, node id, now (s), max attempts, job timeout (s), ttl of finished jobs (s)
START = """
local function drop_entry()
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[2], ARGV[2])
end
local function finish(state, code, message)
  redis.call('HSET', KEYS[1], 'state', state, 'finished_at', ARGV[4], 'token', '',
             'error_code', code, 'error', message)
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  drop_entry()
  return {'skip', state}
end
local state = redis.call('HGET', KEYS[1], 'state')
if not state then drop_entry() return {'skip', 'gone'} end
if state == 'completed' or state == 'failed' or state == 'cancelled' then drop_entry() return {'skip', state} end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return finish('cancelled', '', '') end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
if state == 'running' then
  -- Reclaimed: the previous owner stopped heartbeating. Keep that as the error until something better comes.
  local owner = redis.call('HGET', KEYS[1], 'node') or '?'
  redis.call('HSET', KEYS[1], 'error_code', 'worker_lost',
             'error', 'node ' .. owner .. ' stopped heartbeating during attempt ' .. attempt)
end
if attempt >= tonumber(ARGV[5]) then
  local last = redis.call('HGET', KEYS[1], 'error') or ''
  return finish('failed', 'too_many_attempts', 'gave up after ' .. attempt .. ' attempts; last error: ' .. last)
end
local created = tonumber(redis.call('HGET', KEYS[1], 'created_at') or ARGV[4])
if tonumber(ARGV[4]) - created > tonumber(ARGV[6]) then
  return finish('failed', 'job_timeout', 'not finished within ' .. ARGV[6] .. ' s of submission')
end
attempt = attempt + 1
local token = ARGV[3] .. '/' .. attempt .. '/' .. ARGV[2]
redis.call('HSET', KEYS[1], 'state', 'running', 'attempt', attempt, 'token', token, 'node', ARGV[3],
           'entry', ARGV[2], 'started_at', ARGV[4], 'progress', '0')
return {'run', token, tostring(attempt)}
"""

# KEYS: job, stream
# ARGV: group, entry id, node id, token, progress ('' to leave it)
HEARTBEAT = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[4] then return 'stale' end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'progress', ARGV[5]) end
-- Resets the entry's idle time without bumping its delivery counter, so reclaim leaves it alone.
redis.call('XCLAIM', KEYS[2], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 'cancel' end
return 'ok'
"""

# KEYS: job, stream, retry
# ARGV: group, entry id, token, outcome, now (s), ttl (s), due (ms), job id, field, value, ...
# outcome: completed | failed | cancelled | retry (back to the queue at `due`) | release (same, attempt not counted)
FINISH = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[3] then return 0 end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
local fields = {'token', '', 'entry', ''}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
local outcome = ARGV[4]
if outcome == 'retry' or outcome == 'release' then
  redis.call('HSET', KEYS[1], 'state', 'queued', 'progress', '0', unpack(fields))
  if outcome == 'release' then redis.call('HINCRBY', KEYS[1], 'attempt', -1) end
  redis.call('ZADD', KEYS[3], ARGV[7], ARGV[8])
else
  redis.call('HSET', KEYS[1], 'state', outcome, 'finished_at', ARGV[5], unpack(fields))
  redis.call('EXPIRE', KEYS[1], ARGV[6])
end
return 1
"""

# KEYS: retry, stream
# ARGV: now (ms), limit, job key prefix
PROMOTE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  if redis.call('HGET', ARGV[3] .. id, 'state') == 'queued' then
    redis.call('XADD', KEYS[2], '*', 'job', id)
  end
end
return #ids
"""

# KEYS: job, retry
# ARGV: job id, now (s), ttl (s)
CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[2], 'progress', '0')
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 'cancelled'
end
if state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  return 'cancelling'
end
return 'terminal:' .. state
"""
