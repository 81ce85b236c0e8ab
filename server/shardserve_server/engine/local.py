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
    compile: bool = False
    """torch.compile the decode step (dynamic shapes; prefill stays eager). Fuses the small
    per-layer ops; costs compile time at the first step of each kind (batch 1, batch > 1),
    counted in StepStats.compile_s."""
    verify_hashes: bool = True
    """Check the checkpoint's sha256s before loading (remembered in a stamp file)."""


@dataclass
class StepStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    compile_s: float = 0.0
    """Time of decode steps that compiled a graph (also included in decode_s)."""


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
        self._decode_model = self.model
        if self.config.compile:
            from shardserve_sharding.models.cpu_gemm import prepare_fp32_shadows

            prepare_fp32_shadows(self.model)  # the compiled graph only reads them
            self._decode_model = torch.compile(self.model, dynamic=True)
        self._compiled_kinds: set[bool] = set()  # decode graphs built so far (batch > 1 or not)

    @classmethod
    def from_checkpoint(cls, path: str, config: EngineConfig | None = None) -> LocalEngine:
        from shardserve_sharding.checkpoint.io import load_model

        config = config or EngineConfig()
        loaded = load_model(path, dtype=config.dtype, verify_hashes=config.verify_hashes)
        return cls(loaded.model, loaded.tokenizer, config)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def generate(
        self, requests: Seq[GenerationRequest], on_token: TokenCallback | None = None
    ) -> list[GenerationResult]:
        """Run all requests to completion; on_token(i, event) streams each new token."""
        for r in requests:
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

    def _sample(
        self, logits: torch.Tensor, seqs: list[Sequence]
    ) -> tuple[list[TokenEvent], torch.Tensor]:
        """Pick and record one token per row: (events, tokens [B] long)."""
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
            logprobs=any(s.req.logprobs is not None for s in seqs),
        )
        want_top = [s.req.logprobs or 0 for s in seqs]
        full = torch.log_softmax(logits.float(), dim=-1) if any(want_top) else None  # [B, V]
        events = []
        tok_list = tokens.tolist()
        lp_list = logprobs.tolist() if logprobs is not None else [None] * len(seqs)
        for i, s in enumerate(seqs):
            top = None
            if want_top[i] and full is not None:
                vals, ids = full[i].topk(want_top[i])
                top = list(zip(ids.tolist(), vals.tolist(), strict=True))
            lp = lp_list[i] if s.req.logprobs is not None else None
            events.append(s.append(tok_list[i], lp, top))
        return events, tokens

    def _run_wave(self, seqs: list[Sequence], ids: list[int], on_token: TokenCallback | None):
        model, decode, dev = self.model, self._decode_model, self.device
        n = len(seqs)
        lens = torch.tensor([len(s.prompt_ids) for s in seqs], device=dev)  # [B]
        max_len = max(len(s.prompt_ids) + s.req.stopping.max_new_tokens for s in seqs)
        cache = model.new_cache(n, max_len, dtype=self.config.dtype, device=dev)
        if self.config.compile and hasattr(cache, "defer_writes"):
            cache.defer_writes = True  # the compiled decode step then only reads the cache
        t0 = time.perf_counter()
        width = int(lens.max())
        tokens = torch.zeros(n, width, dtype=torch.long, device=dev)  # [B, T]
        for i, s in enumerate(seqs):
            tokens[i, : len(s.prompt_ids)] = torch.tensor(s.prompt_ids)
        positions = torch.arange(width, device=dev).expand(n, width)  # [B, T]
        cache.begin_step(positions, lens)
        logits = model(tokens, positions, cache, logits_index=lens - 1)  # [B, V]
        events, sampled = self._sample(logits, seqs)
        self.stats.prefill_s += time.perf_counter() - t0
        self._emit(events, ids, on_token)
        rows = list(range(n))  # cache row -> index in seqs
        # The step inputs stay tensors: next tokens are the sampled ones, positions advance by 1.
        tokens = sampled.to(dev)[:, None]  # [B, 1]
        positions = lens[:, None].clone()  # [B, 1]: where each row's newest token goes
        ones = torch.ones(n, dtype=torch.long, device=dev)  # [B]
        zeros = torch.zeros(n, dtype=torch.long, device=dev)  # [B]
        t0 = time.perf_counter()
        while True:
            keep = [k for k, r in enumerate(rows) if not seqs[r].finished]
            if not keep:
                break
            if len(keep) != len(rows):
                sel = torch.tensor(keep, device=dev)
                cache.select(sel)
                tokens, positions = tokens[sel], positions[sel]
                rows = [rows[k] for k in keep]
            b = len(rows)
            live = [seqs[r] for r in rows]
            cache.begin_step(positions, ones[:b])
            t_step = time.perf_counter()
            logits = decode(tokens, positions, cache, logits_index=zeros[:b])  # [B, V]
            if self.config.compile and (b > 1) not in self._compiled_kinds:
                self._compiled_kinds.add(b > 1)
                self.stats.compile_s += time.perf_counter() - t_step
            events, sampled = self._sample(logits, live)
            tokens = sampled.to(dev)[:, None]
            positions = positions + 1
            self.stats.decode_steps += 1
            self.stats.decode_tokens += b
            self._emit(events, [ids[r] for r in rows], on_token)
        self.stats.decode_s += time.perf_counter() - t0

    @staticmethod
    def _emit(events: list[TokenEvent], ids: list[int], on_token: TokenCallback | None) -> None:
        if on_token is not None:
            for i, e in zip(ids, events, strict=True):
                on_token(i, e)


if __name__ == "__main__":
    from .sampling import SamplingParams
    from .stopping import StoppingParams

    eng = LocalEngine.from_checkpoint(sys.argv[1])
    req = GenerationRequest(
        tuple(eng.encode(sys.argv[2])), SamplingParams(temperature=0.0), StoppingParams(32)
    )
    print(eng.generate([req])[0].text)
