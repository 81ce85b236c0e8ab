"""Single-process generation through the workers' own step loop: GroupScheduler + ModelRunner.

`shardserve generate`, the tests' references and the decode benchmark use this. It runs the
same code a TP=1 worker group runs (continuous batching, flat prefill+decode forwards over the
paged KV cache or the state-slot pool, one sampler in GroupScheduler.process), in this
process and without a pipe: a list of requests goes in, their results come out, and each new
token can be streamed through a callback. There is no second loop or sampler to keep in step
with the workers'.

    python -m shardserve_server.engine.local MODEL_DIR "Once upon a time"
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from .defaults import BLOCK_SIZE
from .runner import CacheGeometry, ModelRunner
from .scheduler import GroupScheduler, SchedulerConfig, warmup_request
from .sequence import GenerationRequest, GenerationResult, TokenEvent

TokenCallback = Callable[[int, TokenEvent], None]

@dataclass(frozen=True)
class EngineConfig:
    """Single-process engine settings."""

    dtype: torch.dtype = torch.float32
    """Activation and weight dtype (float32 or bfloat16)."""
    max_batch_size: int = 64
    """Most sequences decoded together; further requests wait for a free row."""
    threads: int | None = None
    """torch intra-op threads (None: leave torch's default)."""
    max_prefill_tokens: int = 4096
    """Prompt tokens per step (chunked prefill, as in SchedulerConfig)."""
    verify_hashes: bool = True
    """Check the checkpoint's sha256s before loading (remembered in a stamp file)."""


class LocalEngine:
    """Generate with one model in this process. See module docstring."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.model = model.to(self.config.dtype).eval()
        if hasattr(self.model, "reset_buffers"):  # fp32 rotary tables again, as the loaders
            self.model.reset_buffers()  # leave them: with bf16 ones no fused bf16 path runs
        self.tokenizer = tokenizer
        self.eos_token_ids: tuple[int, ...] = tuple(getattr(tokenizer, "eos_token_ids", ()) or ())
        self.max_seq_len = int(getattr(model.config, "max_seq_len", 1 << 30))
        self._runner: ModelRunner | None = None
        """Built by the first generate(); rebuilt only when a call needs a larger cache."""

    @classmethod
    def from_checkpoint(cls, path: str, config: EngineConfig | None = None) -> LocalEngine:
        from shardserve_sharding.checkpoint.io import load_model

        config = config or EngineConfig()
        loaded = load_model(path, dtype=config.dtype, verify_hashes=config.verify_hashes)
        return cls(loaded.model, loaded.tokenizer, config)

    def warmup(self) -> None:
        """Run one short request (2 tokens), so that what the first forwards prepare (packed or
        fp32 weight copies, the decode attention kernel) is done now, as a worker group does it
        before readiness, and not inside the first generate()'s time."""
        self.generate([warmup_request()])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def _runner_for(self, requests: Seq[GenerationRequest]) -> ModelRunner:
        """A runner whose cache holds the max_batch_size largest requests at once (so the
        scheduler never waits for cache, only for rows)."""
        need = sorted((-(-(len(r.prompt_ids) + r.stopping.max_new_tokens) // BLOCK_SIZE)
                       for r in requests), reverse=True)
        tokens = max(1, sum(need[: self.config.max_batch_size])) * BLOCK_SIZE
        geo = CacheGeometry(tokens, BLOCK_SIZE, self.config.max_batch_size)
        old = self._runner
        if old is None or old.geometry.num_blocks < geo.num_blocks:
            self._runner = None  # free the old pool before allocating the new one
            self._runner = ModelRunner(self.model, geo, self.config.dtype)
        return self._runner

    def generate(
        self, requests: Seq[GenerationRequest], on_token: TokenCallback | None = None
    ) -> list[GenerationResult]:
        """Run all requests to completion; on_token(i, event) streams each new token of
        requests[i]. A request the scheduler refuses (prompt + max_new_tokens over the
        model's max_seq_len, an empty prompt, a bad constraint) raises ValueError before
        anything runs."""
        if not requests:
            return []
        runner = self._runner_for(requests)
        cfg = SchedulerConfig(
            max_batch_size=self.config.max_batch_size,
            kv_cache_tokens=runner.geometry.num_blocks * BLOCK_SIZE, block_size=BLOCK_SIZE,
            max_prefill_tokens=self.config.max_prefill_tokens, flat_batches=runner.flat_batches)
        sched = GroupScheduler(
            cfg, family=runner.family, tokenizer=self.tokenizer,
            eos_token_ids=self.eos_token_ids, max_seq_len=self.max_seq_len,
            vocab_size=getattr(self.model.config, "vocab_size", None))
        for i, r in enumerate(requests):  # the index is the scheduler's id: callers' may repeat
            sched.add(dataclasses.replace(r, request_id=str(i)))
        results: list[GenerationResult | None] = [None] * len(requests)
        while sched.has_work():
            for out in sched.step(runner.forward):
                i = int(out.request_id)
                if on_token is not None and out.token_id is not None:
                    on_token(i, TokenEvent(out.token_id, out.text, out.logprob, out.top_logprobs))
                if out.result is not None:
                    results[i] = dataclasses.replace(out.result,
                                                     request_id=requests[i].request_id)
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:  # the scheduler ends every request with a result: a bug if not
            raise RuntimeError(f"requests {missing} ended without a result")
        return results  # type: ignore[return-value]


if __name__ == "__main__":
    from .sampling import SamplingParams
    from .stopping import StoppingParams

    eng = LocalEngine.from_checkpoint(sys.argv[1])
    req = GenerationRequest(
        tuple(eng.encode(sys.argv[2])), SamplingParams(temperature=0.0), StoppingParams(32)
    )
    print(eng.generate([req])[0].text)
