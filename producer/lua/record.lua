-- Fragment: the job's record (KEYS[1]), read once: its fields below come with one HMGET at the first rec()
-- call, and writes through rec_set/rec_del keep what rec() returns current (a script that wrote the record
-- with a plain HSET would read its old fields back). Every script that moves a job on reads its record so
-- (issue 20: a transition costs one read, not one HGET per field).
--   rec(name): the field's value, or nil when it is absent (or there is no record); a field not in
--     RECORD_FIELDS is an error.
--   rec_set(name, value, ...): one HSET of the pairs.
--   rec_del(name, ...): one HDEL.
--   job_id_of_record(): the job's id (its record's key, less the prefix).
-- A record holds its queue's name and its batch's id; the keys they name (its queue's waiting set, taken mark
-- and sequence, 'k_waiting', 'k_taken', 'k_sequence'; a fairly shared queue's tenants list, 'k_fair'; its
-- batch's hash, 'batch') are made from them, unless the record names them itself (a record of an earlier
-- version).
-- KEYS[1]: the job's record. ARGV: none of its own.
-- include: constants

local RECORD_FIELDS = {'state', 'holder', 'generating', 'attempts', 'deliveries', 'cancel_requested_at', 'seq', 'queue', 'k_waiting',
                       'k_taken', 'k_sequence', 'k_fair', 'batch', 'batch_id', 'webhook', 'webhook_events', 'tenant', 'created_at',
                       'resent_at', 'request'}
local record_fields = nil

local function rec(name)
  if not record_fields then
    record_fields = {}
    local values = redis.call('HMGET', KEYS[1], unpack(RECORD_FIELDS))
    for i, field in ipairs(RECORD_FIELDS) do
      record_fields[field] = values[i]  -- (false when absent)
    end
    local queue = record_fields['queue']
    if queue then
      for field, suffix in pairs({k_waiting = QUEUE_KEY.waiting, k_taken = QUEUE_KEY.taken, k_sequence = QUEUE_KEY.sequence}) do
        record_fields[field] = record_fields[field] or (QUEUE_KEY.prefix .. queue .. suffix)
      end
    end
    if queue and not record_fields['k_fair'] then
      record_fields['k_fair'] = FAIR_TENANTS[queue] or false
    end
    if record_fields['batch_id'] and not record_fields['batch'] then
      record_fields['batch'] = BATCH_KEY_PREFIX .. record_fields['batch_id']
    end
  end
  local value = record_fields[name]
  if value == nil then
    error('record.lua: the field ' .. name .. ' is not read')
  end
  return value or nil
end

local function rec_set(...)
  local written = {...}
  redis.call('HSET', KEYS[1], unpack(written))
  if record_fields then
    for i = 1, #written, 2 do
      if record_fields[written[i]] ~= nil then
        record_fields[written[i]] = tostring(written[i + 1])
      end
    end
  end
end

local function rec_del(...)
  redis.call('HDEL', KEYS[1], ...)
  if record_fields then
    for _, name in ipairs({...}) do
      if record_fields[name] ~= nil then
        record_fields[name] = false
      end
    end
  end
end

local function job_id_of_record()
  return string.sub(KEYS[1], #JOB_KEY_PREFIX + 1)
end
