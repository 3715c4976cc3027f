-- A running job that this worker process starts to generate: one more attempt (attempts count the times a
-- worker began generating a job, not the times it held it), and the first time this process does, its batch
-- counts it running instead of held. Nothing if the job is not this process's.
-- KEYS: the job's record. ARGV: holder (this worker process's incarnation).
-- Returns the attempts now, or 0 when nothing was counted.
-- include: batch_move

if rec('state') == 'running' and rec('holder') == ARGV[1] then
  if held() then
    batch_move('held', 'running')
  end
  local attempts = tonumber(rec('attempts') or '0') + 1
  rec_set('generating', ARGV[1], 'attempts', attempts)
  return attempts
end
return 0
