-- A streaming job's 'output' webhook event (new text), for a webhook that asked for output events (the chunk
-- publisher, worker/serving/publisher.py, calls it at most every OUTPUT_EVENT_EVERY_S per job); nothing once
-- the job has ended.
-- KEYS: the job's record. ARGV: job id.
-- Returns 0 when the job's webhook does not want output events (the publisher then stops asking), else 1.
-- include: events

local events = ',' .. (rec('webhook_events') or '') .. ','
if not rec('webhook') or not string.find(events, ',output,', 1, true) then
  return 0
end
if rec('state') == 'running' then
  webhook_event(KEYS[1], 'job', ARGV[1], 'output')
end
return 1
