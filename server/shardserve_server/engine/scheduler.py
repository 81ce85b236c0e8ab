"""Continuous (iteration-level) batching for one worker group, run by the group's leader.

Each step: drop finished and cancelled sequences (their KV blocks are freed at once), admit
pending requests (priority, then arrival) while the batch has room and the KV budget covers
their prompt plus max_new_tokens, then build at most two forwards: one decode row per running
sequence (T = 1), and prefill chunks for sequences still reading their prompt, capped at
max_prefill_tokens per step so a long prompt never stalls the running decodes. Blocks are
allocated as tokens arrive (waste < one block per sequence); admission reserves the worst case,
so a running sequence never runs out of cache and nothing needs preempting.

With prefix caching, a pending request whose next uncached prompt block is being prefilled by
a running sequence waits (later requests may pass it) until that prefill is done and its
blocks are cached: the n samples of one request, or streams that share a system prompt and
arrive together, then prefill the shared prefix once instead of once each.

Structured output: a constrained request gets a grammar matcher at `add` (GrammarBackend,
compiled lazily on the first one); `process` masks those rows of the batch before sampling.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from shardserve_sharding.models import CacheKind, model_spec

from ..workers.protocol import GroupStats, TokenOutput
from . import defaults
from .block_pool import ROOT_KEY, BlockAllocator, block_key, prefix_keys
from .grammar import GrammarBackend
from .runner import FLAT, ForwardPlan
from .sampling import Sampler, argmax_rows, finite_rows
from .sequence import GenerationRequest, Sequence
from .stopping import FinishReason

log = logging.getLogger("shardserve.leader")


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits of one worker group."""

    max_batch_size: int = defaults.MAX_BATCH_SIZE
    """Most sequences in the running batch."""
    kv_cache_tokens: int = defaults.KV_CACHE_TOKENS
    """KV-cache budget in tokens (all running sequences together)."""
    block_size: int = defaults.BLOCK_SIZE
    """Tokens per KV block."""
    max_prefill_tokens: int = defaults.MAX_PREFILL_TOKENS
    """Prompt tokens processed per step (chunked prefill); in a flat step (one forward) its
    decode rows count against it too, prompts keeping at least half."""
    prefix_caching: bool = True
    """Share the KV blocks of equal prompt prefixes between requests (paged-KV families)."""
    flat_batches: bool = False
    """One FLAT forward per step (prompt chunks and decodes together, no padding), for runners
    that take them (ModelRunner over a paged-KV model); else a padded prefill forward and a
    decode forward."""

    def validate(self) -> None:
        for name in ("max_batch_size", "kv_cache_tokens", "block_size", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class SlotAllocator:
    """Free list of state slots (a StateSlotSpec family's per-sequence state)."""

    def __init__(self, n: int) -> None:
        self.num_blocks = n
        self.block_size = 1 << 30
        self._free = list(range(n - 1, -1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return 1

    def grow(self, table: list[int], tokens: int) -> None:
        if not table:
            table.append(self._free.pop())

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


class Scheduled:
    """A sequence plus its place in the group: cache blocks, prefill progress, priority."""

    _arrival = itertools.count()

    def __init__(self, seq: Sequence, priority: int) -> None:
        self.seq = seq
        self.id = seq.req.request_id
        self.priority = priority
        self.arrival = next(self._arrival)
        self.table: list[int] = []
        self.prefilled = 0
        """Prompt tokens whose K/V are in the cache (or scheduled this step)."""
        self.need_blocks = 0
        """Blocks the table may grow to (prompt + max_new_tokens), fixed at admission."""
        self.cached_tokens = 0
        """Prompt tokens taken from the prefix cache at admission."""
        self.registered = 0
        self.last_key = ROOT_KEY
        self.prefill_keys: frozenset[int] = frozenset()
        """Keys of the prompt's full blocks this sequence computes itself (not cache hits);
        pending requests that need one of them wait for this prefill."""
        self.cancelled = False
        self.enqueued = time.monotonic()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None

    @property
    def in_prefill(self) -> bool:
        return self.prefilled < len(self.seq.prompt_ids)


class GroupScheduler:
    def __init__(self, cfg: SchedulerConfig, *, family: str, tokenizer: Any,
                 eos_token_ids: tuple[int, ...], max_seq_len: int,
                 vocab_size: int | None = None) -> None:
        cfg.validate()
        self.vocab_size = vocab_size or tokenizer.vocab_size
        """The logits' width (the model's vocabulary), for grammar masks."""
        self._grammar: GrammarBackend | None = None
        self.cfg = cfg
        self.family = family
        self.tokenizer, self.eos = tokenizer, eos_token_ids
        self.max_seq_len = max_seq_len
        self.paged = model_spec(family).cache_kind is CacheKind.PAGED_KV
        """KV blocks reserved per token (else one fixed-size state slot per sequence)."""
        if self.paged:
            self.alloc: Any = BlockAllocator(max(1, cfg.kv_cache_tokens // cfg.block_size),
                                             cfg.block_size, prefix_caching=cfg.prefix_caching)
            self.budget = self.alloc.num_blocks * cfg.block_size
        else:  # a state is a fixed-size summary of the whole prefix: nothing to share
            self.alloc = SlotAllocator(cfg.max_batch_size)
            self.budget = 1 << 62
        self.pending: deque[Scheduled] = deque()
        self.running: list[Scheduled] = []
        self.by_id: dict[str, Scheduled] = {}
        self.prefix_queries = 0
        """Prompt tokens looked up in the prefix cache at admission (cumulative)."""
        self.prefix_hits = 0
        """Of those, tokens found cached (cumulative)."""
        self.sampler = Sampler()
        self.step_count = 0
        self.tokens_out = 0
        """Tokens sampled (cumulative)."""
        self._partial: list[TokenOutput] = []

    def reset_counters(self) -> None:
        """Zero the cumulative counters (steps, tokens, prefix-cache queries and hits)."""
        self.step_count = self.tokens_out = self.prefix_queries = self.prefix_hits = 0

    # ---- requests in and out
    def add(self, req: GenerationRequest, priority: int = 0) -> None:
        need = len(req.prompt_ids) + req.stopping.max_new_tokens
        if need > self.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {need} exceeds max_seq_len "
                             f"{self.max_seq_len}")
        if self.paged and self._reserve_for(need) > self.budget:
            raise ValueError(f"request needs {need} tokens of KV cache; the budget is "
                             f"{self.budget}")
        if req.request_id in self.by_id:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        seq = Sequence(req, self.tokenizer, self.eos)
        if req.constraint is not None:
            seq.matcher = self.grammar().matcher(req.constraint)  # ValueError: refused
        s = Scheduled(seq, priority)
        self.by_id[s.id] = s
        self.pending.append(s)

    def grammar(self) -> GrammarBackend:
        """The group's grammar compiler, built on the first constrained request."""
        if self._grammar is None:
            inner = getattr(self.tokenizer, "tokenizer", self.tokenizer)  # a TokenizerBundle
            self._grammar = GrammarBackend(inner.to_str(), self.vocab_size, self.eos)
        return self._grammar

    def cancel(self, req_id: str) -> bool:
        s = self.by_id.get(req_id)
        if s is None:
            return False
        s.cancelled = True
        return True

    def has_work(self) -> bool:
        return bool(self.pending or self.running)

    def _reserve_for(self, tokens: int) -> int:
        return self.alloc.blocks_for(tokens) * self.cfg.block_size

    @property
    def reserved(self) -> int:
        """KV tokens committed to running sequences: blocks in use (shared blocks once) plus
        the blocks their tables may still grow by. Never above the budget, so a running
        sequence never finds the pool empty."""
        if not self.paged:
            return 0
        grow = sum(s.need_blocks - len(s.table) for s in self.running)
        return (self.alloc.used_blocks + grow) * self.cfg.block_size

    def _computed(self, s: Scheduled) -> list[int]:
        """The sequence's tokens whose K/V the cache holds once the last forward has run."""
        seq = s.seq
        if s.in_prefill:
            return seq.prompt_ids[: s.prefilled]
        return seq.prompt_ids + seq.output_ids[:-1]

    # ---- one step
    def reap(self) -> list[TokenOutput]:
        """Remove finished/cancelled sequences, free their cache; events for cancellations."""
        events = []
        keep = []
        now = time.monotonic()
        caching = self.paged and self.alloc.prefix_caching
        for s in self.running:
            if caching:
                s.registered, s.last_key = self.alloc.register(
                    s.table, self._computed(s), s.registered, s.last_key)
            if s.cancelled and not s.seq.finished:
                s.seq.finish(FinishReason.CANCELLED)
                events.append(self._final(s))
            limit = s.seq.req.stopping.time_limit_s
            if limit and not s.seq.finished and now - (s.admitted_at or now) > limit:
                s.seq.finish(FinishReason.TIME_LIMIT)
                events.append(self._final(s))
            if s.seq.finished:
                self._release(s)
            else:
                keep.append(s)
        self.running = keep
        still = deque()
        for s in self.pending:
            if s.cancelled:
                s.seq.finish(FinishReason.CANCELLED)
                events.append(self._final(s))
                self.by_id.pop(s.id, None)
            else:
                still.append(s)
        self.pending = still
        return events

    def _release(self, s: Scheduled) -> None:
        self.alloc.free(s.table)
        s.table = []
        s.need_blocks = 0
        self.by_id.pop(s.id, None)

    def admit(self) -> None:
        if not self.pending:
            return
        order = sorted(self.pending, key=lambda s: (-s.priority, s.arrival))
        admitted = set()
        committed = self.reserved // self.cfg.block_size if self.paged else 0  # blocks
        bs = self.cfg.block_size
        sharing = self.paged and self.alloc.prefix_caching
        busy: set[int] = set()  # block keys a running sequence is prefilling now
        if sharing:
            for r in self.running:
                if r.in_prefill:
                    busy |= r.prefill_keys
        for s in order:
            if len(self.running) >= self.cfg.max_batch_size:
                break
            if not self.paged:
                if self.alloc.free_blocks == 0:
                    break
            else:
                prompt = s.seq.prompt_ids
                need = self.alloc.blocks_for(len(prompt) + s.seq.req.stopping.max_new_tokens)
                # at least the prompt's last token is computed: its logits give a token
                full = (len(prompt) - 1) // bs
                hits, key = self.alloc.lookup(prompt, full)
                h = len(hits)
                if sharing and h < full and busy and block_key(
                        key, tuple(prompt[h * bs : (h + 1) * bs])) in busy:
                    continue  # its next block is being prefilled: take it from the cache soon
                extra = self.alloc.revived(hits) + need - len(hits)
                if committed + extra > self.alloc.num_blocks:
                    break  # FCFS within priority: do not let later small requests starve this
                committed += extra
                self.alloc.acquire(hits)
                s.need_blocks, s.table = need, list(hits)
                s.prefilled = s.cached_tokens = len(hits) * self.cfg.block_size
                s.registered, s.last_key = len(hits), key
                s.seq.cached_tokens = s.cached_tokens
                if sharing:
                    own = prefix_keys(prompt[h * bs :], bs, full - h, parent=key)
                    s.prefill_keys = frozenset(own)
                    busy.update(own)
                if self.alloc.prefix_caching:
                    self.prefix_queries += len(prompt)
                    self.prefix_hits += s.cached_tokens
            s.admitted_at = time.monotonic()
            self.running.append(s)
            admitted.add(id(s))
        if admitted:
            self.pending = deque(s for s in self.pending if id(s) not in admitted)

    def schedule(self) -> list[tuple[ForwardPlan, list[Scheduled], list[bool]]]:
        """The forwards of this step: (plan, rows, whether each row samples a token).

        Prefill chunks come first, so that a new request's first token is ready (and can be
        sent, see Leader._step) before this step's decode forward runs: its time to first
        token is then the wait for the step in flight plus its own prefill."""
        self.admit()
        plans = []
        decode = [s for s in self.running if not s.in_prefill]
        budget = self.cfg.max_prefill_tokens
        if self.cfg.flat_batches and self.paged:
            # one forward: its decode rows count against the step's tokens, prompts keep at
            # least half (as vLLM's max_num_batched_tokens). The 32-stream benchmark's prompt
            # steps then carry ~430 prompt tokens, not ~480: with oneDNN's GEMMs (fastest at
            # 512 rows: SmolLM2's down projection 0.32 ms at 512 rows, 0.73 at 527) 883 / 911
            # tok/s against 839 / 848; with the AMX GEMM 1148 / 1146 against 1126 / 1128, TTFT
            # p50 177 ms against 205, p99 290 against 227 (loadtest/results/engine.md 9)
            budget = max(budget - len(decode), (budget + 1) // 2)
        chunk_rows, chunk_seqs, samples = [], [], []
        for s in sorted((s for s in self.running if s.in_prefill),
                        key=lambda s: (-s.priority, s.arrival)):
            if budget <= 0:
                break
            n = min(budget, len(s.seq.prompt_ids) - s.prefilled)
            budget -= n
            self.alloc.grow(s.table, s.prefilled + n)
            chunk_rows.append((s.seq.prompt_ids[s.prefilled : s.prefilled + n], s.prefilled))
            chunk_seqs.append(s)
            samples.append(s.prefilled + n == len(s.seq.prompt_ids))
            s.prefilled += n
        if self.cfg.flat_batches and self.paged:
            if chunk_rows or decode:
                plans.append((self._flat_plan(chunk_rows, chunk_seqs, decode),
                              chunk_seqs + decode, samples + [True] * len(decode)))
            self.step_count += 1
            return plans
        if chunk_rows:
            plans.append((self._plan(chunk_rows, chunk_seqs), chunk_seqs, samples))
        if decode:
            plans.append((self._decode_plan(decode), decode, [True] * len(decode)))
        self.step_count += 1
        return plans

    def _flat_plan(self, chunks: list[tuple[list[int], int]], chunk_seqs: list[Scheduled],
                   decode: list[Scheduled]) -> ForwardPlan:
        """One FLAT plan: the prompt chunks (tokens, start position), then each decoding
        sequence's last token at position num_tokens - 1; tokens [1, N], segments [R]."""
        toks: list[int] = []
        pos: list[int] = []
        lens: list[int] = []
        tables = [s.table for s in chunk_seqs]
        for ids, start in chunks:
            toks += ids
            pos += range(start, start + len(ids))
            lens.append(len(ids))
        d_toks, d_pos, d_tables = self._decode_rows(decode)
        toks += d_toks
        pos += d_pos
        lens += [1] * len(decode)
        seg = torch.tensor(lens)  # [R]
        return ForwardPlan(torch.tensor(toks).view(1, -1), torch.tensor(pos).view(1, -1), seg,
                           seg.cumsum(0) - 1, _table_tensor(tables + d_tables), kind=FLAT,
                           decode_only=not chunks)

    def _decode_rows(self, seqs: list[Scheduled]) -> tuple[list[int], list[int], list]:
        """Each decoding sequence's last token, its position (num_tokens - 1) and its block
        table, grown to hold that position."""
        toks, pos, tables = [], [], []
        for s in seqs:
            n = s.seq.num_tokens
            self.alloc.grow(s.table, n)
            toks.append(s.seq.output_ids[-1])
            pos.append(n - 1)
            tables.append(s.table)
        return toks, pos, tables

    def _decode_plan(self, seqs: list[Scheduled]) -> ForwardPlan:
        """One T = 1 row per decoding sequence: its last token at position num_tokens - 1."""
        toks, pos, tables = self._decode_rows(seqs)
        b = len(seqs)
        return ForwardPlan(torch.tensor(toks).view(b, 1), torch.tensor(pos).view(b, 1),
                           torch.ones(b, dtype=torch.long), torch.zeros(b, dtype=torch.long),
                           _table_tensor(tables), decode_only=True)

    def _plan(self, rows: list[tuple[list[int], int]], seqs: list[Scheduled]) -> ForwardPlan:
        """Prefill chunks (tokens, start position) right-padded to the longest."""
        b = len(rows)
        t = max(len(toks) for toks, _ in rows)
        nb = max(1, max(len(s.table) for s in seqs))
        tokens, positions, tables = [0] * (b * t), [0] * (b * t), [-1] * (b * nb)
        lens = []
        for i, ((toks, start), s) in enumerate(zip(rows, seqs, strict=True)):
            n = len(toks)
            tokens[i * t : i * t + n] = toks
            # padding columns repeat the last real position: never past max_seq_len (rope)
            positions[i * t : (i + 1) * t] = [start + min(j, n - 1) for j in range(t)]
            tables[i * nb : i * nb + len(s.table)] = s.table
            lens.append(n)
        num_new = torch.tensor(lens)
        return ForwardPlan(torch.tensor(tokens).view(b, t), torch.tensor(positions).view(b, t),
                           num_new, num_new - 1, torch.tensor(tables).view(b, nb))

    def process(self, logits: torch.Tensor, rows: list[Scheduled], samples: list[bool]
                ) -> list[TokenOutput]:
        """Sample the rows that finished their prompt or are decoding; token events out.

        `logits` [B, V] is the forward's output, usually an inference-mode tensor: it is
        never written to (masks are applied out of place). A row whose logits are not all
        finite (NaN or inf weights, an overflow) ends with FinishReason.ERROR and a message;
        the other rows sample as usual.

        When every row is plain greedy (`_plain_greedy`) the tokens come from one batched
        pass (finite check and argmax, one .tolist()); otherwise Sampler.sample, whose
        tokens are the same for such rows (tests/server/test_step_fast_path.py). Per row
        remains only `_emit`: detokenizing, stop checks, finishing."""
        idx = [i for i, flag in enumerate(samples) if flag]
        if not idx:
            return []
        lg = logits[idx] if len(idx) != len(rows) else logits  # [B', V]
        seqs = [rows[i] for i in idx]
        events: list[TokenOutput] = []
        self._partial = events  # what process_safely salvages if sampling raises midway
        ok_rows = finite_rows(lg)  # [B'] bool
        if all(map(_plain_greedy, seqs)):
            # the common case in one batched pass and one .tolist(): the argmax is the whole
            # answer (what Sampler.sample returns for such rows), no [B', V] copies
            finite, tok_list = torch.stack((ok_rows.long(), argmax_rows(lg))).tolist()
            if all(finite):
                self._emit(seqs, tok_list, None, None, events)
                return events
        else:
            finite = ok_rows.tolist()  # [B']
        if lg.dtype != torch.float32:  # a bf16 model's logits: sampling works in fp32
            lg = lg.float()  # [B', V]
        if not all(finite):
            keep = [j for j, ok in enumerate(finite) if ok]
            for j, ok in enumerate(finite):
                if not ok:
                    events.append(self.fail(seqs[j], "the model produced non-finite logits "
                                            "(NaN or inf): the checkpoint may be damaged"))
            if not keep:
                return events
            lg, seqs = lg[keep], [seqs[j] for j in keep]
        unsuppressed = lg
        lg = self._suppress(lg, seqs)
        constrained = [j for j, s in enumerate(seqs) if s.seq.matcher is not None]
        if constrained:
            grammar = self.grammar()
            bitmask = grammar.fill([seqs[j].seq.matcher for j in constrained], constrained,
                                   len(seqs))  # [B', W]
            before = unsuppressed if lg is not unsuppressed else None
            # a copy: lg may be the forward's (inference-mode) logits
            lg = lg.to(torch.float32, copy=lg is unsuppressed)  # [B', V]
            grammar.apply(lg, constrained, bitmask, before=before)
        want_top = any(s.seq.req.logprobs for s in seqs)
        want_lp = any(s.seq.req.logprobs is not None for s in seqs)
        params = [s.seq.req.sampling for s in seqs]
        gens = [s.seq.generator for s in seqs]
        prompts = [s.seq.prompt_ids for s in seqs]
        outs = [s.seq.output_ids for s in seqs]
        full = None
        if want_top:
            tokens, lps, full = self.sampler.sample_with_full_logprobs(lg, params, gens, prompts,
                                                                        outs)
        else:
            tokens, lps = self.sampler.sample(lg, params, gens, prompts, outs, logprobs=want_lp)
        if want_lp and lps is not None:
            tok_list, lp_list = torch.stack((tokens.double(), lps.double())).tolist()
            tok_list = [int(t) for t in tok_list]  # exact: token ids < 2**53
        else:
            tok_list, lp_list = tokens.tolist(), None
        self._emit(seqs, tok_list, lp_list, full, events)
        return events

    def _emit(self, seqs: list[Scheduled], tok_list: list[int], lp_list: list[float] | None,
              full: torch.Tensor | None, events: list[TokenOutput]) -> None:
        """Append each row's sampled token to its sequence (detokenize, stop checks, finish)
        and its TokenOutput to `events`: the per-row part of a step. lp_list: the chosen
        tokens' logprobs (None: no row asked); full [B', V]: the rows' whole log-distributions
        (for top logprobs), or None."""
        self.tokens_out += len(tok_list)
        now = time.monotonic()
        for j, (s, tok) in enumerate(zip(seqs, tok_list, strict=True)):
            req = s.seq.req
            n_top = req.logprobs or 0
            top = None
            if n_top and full is not None:
                vals, ids = full[j].topk(min(n_top, full.shape[-1]))
                top = list(zip(ids.tolist(), vals.tolist(), strict=True))
            if s.first_token_at is None:
                s.first_token_at = now
            lp = lp_list[j] if lp_list is not None and req.logprobs is not None else None
            ev = s.seq.append(tok, lp, top)
            out = TokenOutput(s.id, tok, ev.text, ev.logprob, top)
            if s.seq.finished:
                out = self._final(s, out)
            events.append(out)

    @staticmethod
    def _suppress(lg: torch.Tensor, seqs: list[Scheduled]) -> torch.Tensor:
        """lg [B, V] with the tokens each row may not end on yet (min_new_tokens) at -inf.

        Out of place: lg may be the forward's inference tensor (an in-place write there
        raises outside inference mode). Ids outside the logits' width are ignored."""
        vocab = lg.shape[-1]
        rows, cols = [], []
        for j, s in enumerate(seqs):
            for t in s.seq.stop.suppressed_token_ids(len(s.seq.output_ids)):
                if 0 <= t < vocab:
                    rows.append(j)
                    cols.append(t)
        if not rows:
            return lg
        return lg.index_put((torch.tensor(rows), torch.tensor(cols)),
                            torch.tensor(float("-inf"), dtype=lg.dtype))  # [B, V]

    def fail(self, s: Scheduled, message: str) -> TokenOutput:
        """End one sequence with FinishReason.ERROR (its blocks are freed at the next reap)."""
        s.seq.fail(message)
        return self._final(s)

    def _final(self, s: Scheduled, out: TokenOutput | None = None) -> TokenOutput:
        """The request's last output: `out` (its last token) or an empty one, with the result."""
        return dataclasses.replace(out or TokenOutput(s.id), result=s.seq.result(),
                                   admitted_at=s.admitted_at)

    def stats(self) -> GroupStats:
        """The scheduler's part of the group's stats (the leader adds its timings)."""
        return GroupStats(
            steps=self.step_count, pending=len(self.pending), running=len(self.running),
            kv_used_blocks=self.alloc.used_blocks, kv_total_blocks=self.alloc.num_blocks,
            reserved_tokens=self.reserved, prefix_cache_queries=self.prefix_queries,
            prefix_cache_hits=self.prefix_hits, tokens_out=self.tokens_out)

    # ---- the step loop (the leader, its warm-up, the tests and the profiler all use it)
    def step(self, forward: Callable[[ForwardPlan], torch.Tensor],
             flush: Callable[[list[TokenOutput]], None] | None = None,
             on_forward: Callable[[ForwardPlan, list[bool], float], None] | None = None,
             ) -> list[TokenOutput]:
        """One engine step: reap -> schedule -> forward -> process, for each of the step's
        forwards. `flush(outputs)` (when given) receives the outputs so far before a second
        forward runs (a new request's first token goes out before the decode forward);
        `on_forward(plan, samples, seconds)` times each forward with its sampling. Returns
        the outputs not flushed."""
        outputs = self.reap()
        return self.run(self.schedule(), forward, outputs, flush, on_forward)

    def run(self, plans: list[tuple[ForwardPlan, list[Scheduled], list[bool]]],
            forward: Callable[[ForwardPlan], torch.Tensor],
            outputs: list[TokenOutput] | None = None,
            flush: Callable[[list[TokenOutput]], None] | None = None,
            on_forward: Callable[[ForwardPlan, list[bool], float], None] | None = None,
            ) -> list[TokenOutput]:
        """The forward -> process half of step() over `plans` (from schedule()), appended to
        `outputs`; tests call it between their own schedule() and their checks."""
        outputs = [] if outputs is None else outputs
        for k, (plan, rows, samples) in enumerate(plans):
            if k > 0 and outputs and flush is not None:
                flush(outputs)
                outputs = []
            t0 = time.perf_counter()
            outputs += self.process_safely(forward(plan), rows, samples)
            if on_forward is not None:
                on_forward(plan, samples, time.perf_counter() - t0)
        return outputs

    def process_safely(self, logits: torch.Tensor, rows: list[Scheduled], samples: list[bool]
                       ) -> list[TokenOutput]:
        """process(), where a failure ends those rows and never the group (the forward itself
        completed, so the cache and every other sequence are intact)."""
        self._partial = []
        try:
            return self.process(logits, rows, samples)
        except Exception as e:
            log.error("internal error in sampling: %s: %s", type(e).__name__, e)
            log.debug("traceback", exc_info=e)
            # keep what was already made (tokens, non-finite failures); every row of this
            # forward then ends once: failed if still running, else with its final output
            out = list(self._partial)
            ended = {o.request_id for o in out if o.result is not None}
            msg = f"internal error while sampling: {type(e).__name__}: {e}"
            for s in rows:
                if s.id in ended:
                    continue
                out.append(self._final(s) if s.seq.finished else self.fail(s, msg))
            return out


def _plain_greedy(s: Scheduled) -> bool:
    """Whether the row's next token is just the argmax of its logits: greedy, no penalties,
    logit bias, logprobs, grammar or tokens masked this step (min_new_tokens)."""
    seq = s.seq
    p = seq.req.sampling
    return (p.is_greedy and not p.has_penalties and not p.logit_bias
            and seq.req.logprobs is None and seq.matcher is None
            and not seq.stop.suppressed_token_ids(len(seq.output_ids)))


def _table_tensor(tables: list[list[int]]) -> torch.Tensor:
    """Block tables as one [R, nb] long tensor, each row padded with -1."""
    nb = max(1, max(map(len, tables)))
    flat = [-1] * (len(tables) * nb)  # [R, nb] row-major
    for i, t in enumerate(tables):
        flat[i * nb : i * nb + len(t)] = t
    return torch.tensor(flat).view(len(tables), nb)


def warmup_request() -> GenerationRequest:
    """The short request a group (and LocalEngine) runs before serving: long enough for the
    fp32 GEMM path of bf16 models, so that cached weight copies are built then, not on the
    first real request."""
    from shardserve_sharding.models.cpu_gemm import BF16_GEMM_AS_FP32_MIN_ROWS

    from .sampling import SamplingParams
    from .stopping import StoppingParams

    return GenerationRequest(tuple(range(1, BF16_GEMM_AS_FP32_MIN_ROWS + 3)),
                             SamplingParams(temperature=0.0),
                             StoppingParams(max_new_tokens=2, ignore_eos=True), "__warmup__")
