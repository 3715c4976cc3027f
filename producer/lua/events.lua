-- Fragment: webhook events, appended in the script of the transition itself (durable: the gateway's
-- deliverers consume the webhooks stream, producer/gateway/webhooks.py).
--   webhook_event(hash, kind, id, event): the event ('start', 'output', 'completed') of a job's record or a
--     batch's hash ('kind': 'job' or 'batch'; 'id': its id), if it has a webhook that asked for this event.
--   batch_completed(batch): a batch that has ended (none of its jobs queued, held or running, its submission done)
--     is marked completed (its 'completed_at'), once, with its 'completed' event, and leaves the open batches.
-- KEYS and ARGV: none of its own (the functions take what they touch).
-- include: constants
-- include: record

local function webhook_event(hash, kind, id, event)
  local field = function(name) return redis.call('HGET', hash, name) or nil end
  if hash == KEYS[1] and kind == 'job' then
    field = rec  -- (read with the record's other fields)
  end
  local hook = field('webhook')
  if hook and string.find(',' .. (field('webhook_events') or '') .. ',', ',' .. event .. ',', 1, true) then
    redis.call('XADD', WEBHOOKS, 'MAXLEN', '~', WEBHOOK_STREAM_MAX, '*', 'kind', kind, 'event', event, 'id', id, 'url', hook,
               'tenant', field('tenant') or '')
  end
end

local function batch_completed(batch)
  local counts = redis.call('HMGET', batch, 'state', 'queued', 'held', 'running')
  if counts[1] ~= 'submitting' and tonumber(counts[2] or '0') <= 0 and tonumber(counts[3] or '0') <= 0 and tonumber(counts[4] or '0') <= 0
     and redis.call('HSETNX', batch, 'completed_at', redis.call('TIME')[1]) == 1 then
    redis.call('ZREM', OPEN_BATCHES, batch)
    webhook_event(batch, 'batch', redis.call('HGET', batch, 'batch_id') or '', 'completed')
  end
end
