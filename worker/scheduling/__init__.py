"""Which jobs run when: the pure admission policy (``policy``), out-of-memory recovery (``oom``), and the batcher
thread that executes the policy's plans on the model and settles every job's outcome."""
