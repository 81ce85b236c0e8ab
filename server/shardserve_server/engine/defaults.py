"""Batching and KV-cache defaults, defined once: SchedulerConfig, WorkerConfig, LocalEngine and
the `shardserve serve` flags all take theirs from here (no imports, so any module may)."""

KV_CACHE_TOKENS = 16384
"""KV-cache budget of one worker group, in tokens (all running sequences together)."""
BLOCK_SIZE = 16
"""Tokens per paged KV-cache block."""
MAX_BATCH_SIZE = 32
"""Most sequences in a worker group's running batch."""
MAX_PREFILL_TOKENS = 512
"""Prompt tokens computed per step (chunked prefill)."""
