"""Single-process batched generation: ragged prefill, batched decode with a cache, per-row sampling.

This is the engine core that later runs inside shard workers and behind the gRPC front end.
A batch of requests is prefilled in one forward (prompts right-padded, one logits row per
prompt), then decoded one token per step for all unfinished rows; a finished row leaves the
cache at once (cache.select), so the batch shrinks instead of carrying dead rows.

    python -m shardserve_server.engine.local MODEL_DIR "Once upon a time"
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from .sampling import Sampler
from .sequence import GenerationRequest, GenerationResult, Sequence, TokenEvent
from .stopping import FinishReason

TokenCallback = Callable[[int, TokenEvent], None]


@dataclass(frozen=True)
class EngineConfig:
    """Single-process engine settings."""

    dtype: torch.dtype = torch.float32
    """Activation and weight dtype (float32 or bfloat16)."""
    max_batch_size: int = 64
    """Most sequences decoded together; larger request lists run in waves."""
    threads: int | None = None
    """torch intra-op threads (None: leave torch's default)."""


@dataclass
class StepStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0


class LocalEngine:
    """Generate with one model in this process. See module docstring."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.model = model.to(self.config.dtype).eval()
        self.tokenizer = tokenizer
        self.eos_token_ids: tuple[int, ...] = tuple(getattr(tokenizer, "eos_token_ids", ()) or ())
        self.sampler = Sampler()
        self.device = next(model.parameters()).device
        self.max_seq_len = int(getattr(model.config, "max_seq_len", 1 << 30))
        self.stats = StepStats()

    @classmethod
    def from_checkpoint(cls, path: str, config: EngineConfig | None = None) -> LocalEngine:
        from shardserve_sharding.checkpoint.io import load_model

        config = config or EngineConfig()
        loaded = load_model(path, dtype=config.dtype)
        return cls(loaded.model, loaded.tokenizer, config)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def generate(
        self, requests: Seq[GenerationRequest], on_token: TokenCallback | None = None
    ) -> list[GenerationResult]:
        """Run all requests to completion; on_token(i, event) streams each new token."""
        for r in requests:
            r.sampling.validate()
            r.stopping.validate()
            total = len(r.prompt_ids) + r.stopping.max_new_tokens
            if total > self.max_seq_len:
                raise ValueError(
                    f"prompt ({len(r.prompt_ids)} tokens) + max_new_tokens "
                    f"({r.stopping.max_new_tokens}) exceeds the model's max_seq_len "
                    f"{self.max_seq_len}"
                )
        seqs = [Sequence(r, self.tokenizer, self.eos_token_ids) for r in requests]
        step = self.config.max_batch_size
        with torch.inference_mode():
            for start in range(0, len(seqs), step):
                idx = list(range(start, min(start + step, len(seqs))))
                self._run_wave([seqs[i] for i in idx], idx, on_token)
        return [s.result() for s in seqs]

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[TokenEvent]:
        for i, s in enumerate(seqs):  # min_new_tokens: EOS / stop ids cannot be chosen yet
            banned = s.stop.suppressed_token_ids(len(s.output_ids))
            if banned:
                logits[i, list(banned)] = float("-inf")
        tokens, logprobs = self.sampler.sample(
            logits,
            [s.req.sampling for s in seqs],
            [s.generator for s in seqs],
            [s.prompt_ids for s in seqs],
            [s.output_ids for s in seqs],
        )
        want_top = [s.req.logprobs or 0 for s in seqs]
        full = torch.log_softmax(logits.float(), dim=-1) if any(want_top) else None  # [B, V]
        events = []
        tok_list, lp_list = tokens.tolist(), logprobs.tolist()
        for i, s in enumerate(seqs):
            top = None
            if want_top[i] and full is not None:
                vals, ids = full[i].topk(want_top[i])
                top = list(zip(ids.tolist(), vals.tolist(), strict=True))
            lp = lp_list[i] if s.req.logprobs is not None else None
            events.append(s.append(tok_list[i], lp, top))
        return events

    def _run_wave(self, seqs: list[Sequence], ids: list[int], on_token: TokenCallback | None):
        model, dev = self.model, self.device
        lens = torch.tensor([len(s.prompt_ids) for s in seqs], device=dev)  # [B]
        max_len = max(len(s.prompt_ids) + s.req.stopping.max_new_tokens for s in seqs)
        cache = model.new_cache(len(seqs), max_len, dtype=self.config.dtype, device=dev)
        t0 = time.perf_counter()
        width = int(lens.max())
        tokens = torch.zeros(len(seqs), width, dtype=torch.long, device=dev)  # [B, T]
        for i, s in enumerate(seqs):
            tokens[i, : len(s.prompt_ids)] = torch.tensor(s.prompt_ids)
        positions = torch.arange(width, device=dev).expand(len(seqs), width)  # [B, T]
        cache.begin_step(positions, lens)
        logits = model(tokens, positions, cache, logits_index=lens - 1)  # [B, V]
        events = self._sample(logits, seqs)
        self.stats.prefill_s += time.perf_counter() - t0
        self._emit(events, ids, on_token)
        rows = list(range(len(seqs)))  # cache row -> index in seqs
        t0 = time.perf_counter()
        while True:
            keep = [k for k, r in enumerate(rows) if not seqs[r].finished]
            if not keep:
                break
            if len(keep) != len(rows):
                cache.select(torch.tensor(keep, device=dev))
                rows = [rows[k] for k in keep]
            live = [seqs[r] for r in rows]
            tokens = torch.tensor([[s.output_ids[-1]] for s in live], device=dev)  # [B, 1]
            positions = torch.tensor([[s.num_tokens - 1] for s in live], device=dev)  # [B, 1]
            cache.begin_step(positions, torch.ones(len(live), dtype=torch.long, device=dev))
            logits = model(
                tokens, positions, cache, logits_index=torch.zeros_like(lens[: len(live)])
            )
            events = self._sample(logits, live)
            self.stats.decode_steps += 1
            self.stats.decode_tokens += len(live)
            self._emit(events, [ids[r] for r in rows], on_token)
        self.stats.decode_s += time.perf_counter() - t0

    @staticmethod
    def _emit(events: list[TokenEvent], ids: list[int], on_token: TokenCallback | None) -> None:
        if on_token is not None:
            for i, e in zip(ids, events, strict=True):
                on_token(i, e)


def finish_reason_name(reason: FinishReason) -> str:
    return reason.value


if __name__ == "__main__":
    from .sampling import SamplingParams
    from .stopping import StoppingParams

    eng = LocalEngine.from_checkpoint(sys.argv[1])
    req = GenerationRequest(
        tuple(eng.encode(sys.argv[2])), SamplingParams(temperature=0.0), StoppingParams(32)
    )
    print(eng.generate([req])[0].text)
