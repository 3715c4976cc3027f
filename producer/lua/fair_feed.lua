-- Fragment: the fair-share lines of a queue (producer/fairness.py). A bulk job that finds its queue busy waits
-- in its line (its batch's, or its tenant's single jobs') instead of on the queue; feed() keeps the queue
-- `depth` long by taking one job at a time from the lines in turn: tenants in turn, and each tenant's lines in
-- turn. A job goes on the queue as the last, numbered there then (as enqueue.lua numbers the others), so the
-- lost-message sweeper (worker/serving/sweeper.py) sees only jobs that are on the queue; a job that ended while
-- it waited in its line (cancelled), or whose record expired there, is dropped. A tenant's list is in the tenants list while it holds a
-- line, and a line is in its tenant's list while it holds a job.
--   wait_in_line(tenants, tenant, line, job_id): the job waits at the end of its line (its id only: its message
--     is made as it goes on the queue, ``message_for``; an entry 'JOB_ID MESSAGE' of an earlier version is
--     still read).
--   feed(queue, tenants, depth, sequence, waiting): returns how many jobs went on the queue.
--   feed_after(depth): after a job's message left its queue (KEYS[1] is its record), if the queue is
--     shared fairly.
-- include: constants
-- include: record

local function wait_in_line(tenants, tenant, line, job_id)
  if redis.call('RPUSH', line, job_id) == 1 and redis.call('RPUSH', tenant, line) == 1 then
    redis.call('RPUSH', tenants, tenant)
  end
end

local function feed(queue, tenants, depth, sequence, waiting)
  local moved, looked = 0, 0
  local room = depth - redis.call('LLEN', queue)
  while room > 0 and looked < depth + 1000 do
    local tenant = redis.call('LPOP', tenants)
    if not tenant then break end
    local line = redis.call('LPOP', tenant)
    local entry = line and redis.call('LPOP', line)
    if line and redis.call('LLEN', line) > 0 then redis.call('RPUSH', tenant, line) end
    if redis.call('LLEN', tenant) > 0 then redis.call('RPUSH', tenants, tenant) end
    if entry then
      looked = looked + 1
      local job_id, message = entry, nil
      local cut = string.find(entry, ' ', 1, true)
      if cut then
        job_id, message = string.sub(entry, 1, cut - 1), string.sub(entry, cut + 1)
      end
      local record = JOB_KEY_PREFIX .. job_id
      local state = redis.call('HGET', record, 'state')
      if state and not FINAL[state] then
        local seq = redis.call('INCR', sequence)
        redis.call('HSET', record, 'seq', seq)
        redis.call('ZADD', waiting, seq, job_id)
        redis.call('LPUSH', queue, message or message_for(job_id, queue))
        moved = moved + 1
        room = room - 1
      end
    end
  end
  return moved
end

local function feed_after(depth)
  local tenants = rec('k_fair')
  if tenants then
    feed(rec('queue'), tenants, depth, rec('k_sequence'), rec('k_waiting'))
  end
end
