-- Fragment: the cluster-wide count of the jobs that ended, by final state and error code (the fleet metrics,
-- producer/fleet_metrics.py, read it at scrape time).
--   count_ended(state, field, payload): one more job ended in 'state': the field 'STATE:CODE' of the hash
--     JOBS_ENDED (keys.JOBS_ENDED) goes up by one (one HINCRBY); CODE is the error's code when 'field' is
--     'error' and its JSON 'payload' names one, else ''. Called once per job, by the script that writes its
--     final state.
-- KEYS and ARGV: none of its own.
-- include: constants

local function count_ended(state, field, payload)
  local code = ''
  if field == 'error' then
    local ok, error = pcall(cjson.decode, payload)
    if ok and type(error) == 'table' and type(error['code']) == 'string' then
      code = error['code']
    end
  end
  redis.call('HINCRBY', JOBS_ENDED, state .. ':' .. code, 1)
end
