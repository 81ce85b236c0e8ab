"""Token sampling: turn one step's next-token logits into tokens, with parameters per row.

A batch mixes requests with different settings (greedy next to top-p at temperature 0.7, some
with penalties, some seeded). `Sampler.sample` handles the whole batch at once: the vocabulary
work is vectorised over [B, V]; Python loops only over rows, to build [B] parameter tensors and
to draw each row's noise from that row's own generator.

Processing order (as in vLLM and Hugging Face): logit bias -> repetition penalty -> frequency
and presence penalties -> temperature -> top-k -> top-p -> min-p -> sample.

Sampling uses the exponential race: `argmax(log p - log E)` with E ~ Exponential(1) drawn per
token, which picks token i with probability p_i. Each row's E comes from that row's generator,
so a seeded request gets the same tokens whatever else shares its batch.

Two CPU shortcuts give torch's exact results faster over a [32, 49152] vocabulary:
`argmax_rows` (torch's CPU argmax is not vectorised) and `_sorted_descending` (numpy's SIMD
sort for the top-p nucleus instead of torch's sort, 20x faster).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

_PENALTY_LIMIT = 2.0
LOGIT_BIAS_LIMIT = 100.0
"""OpenAI's range for a logit_bias value: [-100, 100]."""
MAX_LOGIT_BIAS = 1024
"""Most logit_bias entries per request."""
_SEED_LIMIT = 2**64  # the proto's uint64; torch.Generator takes the whole range
# Temperatures below this are greedy (as in vLLM): dividing logits by ~1e-38 overflows.
_GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next token. Validated when made (`__post_init__`): an
    instance always holds allowed values, so nothing downstream checks them again."""

    temperature: float = 1.0
    """Divides the (penalised) logits; 0 (or anything below 1e-5) means greedy: exactly the
    argmax, no randomness."""

    top_k: int = 0
    """Keep only the k most likely tokens (and any tied with the k-th); 0 turns it off."""

    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of most likely tokens whose mass reaches top_p
    (the most likely token, and any tied with the last kept, is kept); 1 turns it off."""

    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times that of the most likely token;
    0 turns the filter off."""

    repetition_penalty: float = 1.0
    """HF/CTRL penalty on every token seen in the prompt or the output: a positive logit is
    divided by it, a negative one multiplied; 1 turns it off. Must be > 0."""

    frequency_penalty: float = 0.0
    """OpenAI penalty: subtract frequency_penalty * (times the token occurs in the output so
    far) from its logit. Generated tokens only; in [-2, 2]."""

    presence_penalty: float = 0.0
    """OpenAI penalty: subtract presence_penalty from the logit of every token that occurs in
    the output so far. Generated tokens only; in [-2, 2]."""

    seed: int | None = None
    """Makes sampling reproducible: the engine keeps `make_generator(seed)` for the request and
    passes it to every `Sampler.sample` call. None draws from the sampler's shared generator."""

    logit_bias: tuple[tuple[int, float], ...] = ()
    """OpenAI logit_bias as (token id, bias) pairs: the bias is added to the token's logit
    before anything else; each in [-100, 100] (-100 bans a token in practice, 100 all but
    forces it). Ids past the logits' width are ignored (the edge checks them against the
    vocabulary)."""

    @property
    def is_greedy(self) -> bool:
        """True when the row takes the argmax (temperature 0, or below 1e-5)."""
        return self.temperature < _GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        """True when any penalty changes the logits."""
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field outside its allowed range."""
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0.0):
            raise ValueError(
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}"
            )
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not (-_PENALTY_LIMIT <= value <= _PENALTY_LIMIT):
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not (0 <= self.seed < _SEED_LIMIT)
        ):
            raise ValueError(f"seed must be None or an integer in [0, 2**64), got {self.seed!r}")
        if not isinstance(self.logit_bias, tuple) or len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias must be a tuple of at most {MAX_LOGIT_BIAS} "
                             "(token id, bias) pairs")
        for pair in self.logit_bias:
            tid, bias = pair if isinstance(pair, tuple) and len(pair) == 2 else (None, None)
            if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
                raise ValueError(f"logit_bias token ids must be integers >= 0, got {pair!r}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not (
                    -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT):
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias!r} for "
                                 f"token {tid}")


def make_generator(seed: int | None = None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one request: seeded with `seed`, or from the OS entropy pool if None."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    return generator


def top_logprobs(logprobs_full: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n best alternatives per row, most likely first: (values [B, n], token ids [B, n]).

    `logprobs_full` is the [B, V] output of `Sampler.sample_with_full_logprobs`; n is capped
    at V. Tokens removed by top-k/top-p/min-p have -inf.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    n = min(n, logprobs_full.shape[-1])
    values, ids = torch.topk(logprobs_full, n, dim=-1)  # [B, n], [B, n]
    return values, ids


class Sampler:
    """Samples one token per row of a batch of logits, each row with its own parameters.

    `seed` seeds the shared generator used by rows that pass no generator (unseeded requests);
    None seeds it from the OS entropy pool. Stateless apart from that shared generator.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        *,
        logprobs: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pick a token per row: (tokens [B] long, logprobs [B] float32, or None when
        `logprobs` is False and every row is plain greedy: then the argmax is the whole answer
        and no [B, V] log-softmax is built).

        logits: [B, V], one row per request. generators[i] must be the request's own generator
        when params[i].seed is set (kept across steps); None uses the shared generator.
        prompt_token_ids / output_token_ids: the request's prompt and tokens generated so far,
        for the penalties. logprobs are the log-softmax of the processed distribution at the
        chosen token (greedy rows: of the penalised logits at temperature 1).
        """
        _check_inputs(logits, params, generators, prompt_token_ids, output_token_ids)
        logits = apply_logit_bias(logits, params)  # [B, V]
        if not logprobs and all(p.is_greedy and not p.has_penalties for p in params):
            return argmax_rows(logits), None  # [B]
        tokens, lps, _ = self._sample_full(
            logits, params, generators, prompt_token_ids, output_token_ids
        )
        return tokens, lps

    def sample_with_full_logprobs(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As `sample`, plus the whole processed log-distribution [B, V] (for `top_logprobs`)."""
        _check_inputs(logits, params, generators, prompt_token_ids, output_token_ids)
        return self._sample_full(apply_logit_bias(logits, params), params, generators,
                                 prompt_token_ids, output_token_ids)

    def _sample_full(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """sample_with_full_logprobs once the logit bias is applied."""
        if all(p.is_greedy and not p.has_penalties for p in params):
            logprobs_full = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
            tokens = argmax_rows(logits)  # [B]
            return tokens, _at(logprobs_full, tokens), logprobs_full

        x = logits.to(torch.float32, copy=True)  # [B, V]
        x = _apply_penalties(x, params, prompt_token_ids, output_token_ids)  # [B, V]
        greedy_tokens = argmax_rows(x)  # [B]
        if all(p.is_greedy for p in params):
            logprobs_full = torch.log_softmax(x, dim=-1)  # [B, V]
            return greedy_tokens, _at(logprobs_full, greedy_tokens), logprobs_full

        # Greedy rows keep temperature 1 and no filters: their logprobs are of the penalised
        # logits, and their token is the argmax taken above.
        device = x.device
        temperature = torch.tensor(
            [1.0 if p.is_greedy else p.temperature for p in params], device=device
        )  # [B]
        x.div_(temperature[:, None])  # [B, V]
        x = _apply_top_k_top_p(
            x,
            [0 if p.is_greedy else p.top_k for p in params],
            [1.0 if p.is_greedy else p.top_p for p in params],
        )  # [B, V]
        x = _apply_min_p(x, [0.0 if p.is_greedy else p.min_p for p in params])  # [B, V]
        logprobs_full = torch.log_softmax(x, dim=-1)  # [B, V]

        rows = [i for i, p in enumerate(params) if not p.is_greedy]
        noise = self._exponential_noise(rows, generators, x.shape[1], device)  # [S, V]
        race = logprobs_full[rows] - noise.log()  # [S, V]
        tokens = greedy_tokens.clone()  # [B]
        tokens[rows] = argmax_rows(race)  # [S]
        return tokens, _at(logprobs_full, tokens), logprobs_full

    def _exponential_noise(
        self,
        rows: list[int],
        generators: Sequence[torch.Generator | None],
        vocab: int,
        device: torch.device,
    ) -> torch.Tensor:
        """Exponential(1) noise [len(rows), V]; row j drawn from generators[rows[j]] alone."""
        noise = torch.empty((len(rows), vocab), dtype=torch.float32, device=device)  # [S, V]
        for j, i in enumerate(rows):
            generator = generators[i]
            if generator is None:
                generator = self._shared_generator(device)
            if generator.device == noise.device:
                noise[j].exponential_(generator=generator)  # [V]
            else:
                drawn = torch.empty(vocab, device=generator.device)  # [V]
                noise[j].copy_(drawn.exponential_(generator=generator))  # [V]
        # An exact 0 would make -log(E) infinite; clamping keeps the race finite.
        return noise.clamp_min_(torch.finfo(torch.float32).tiny)  # [S, V]

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        generator = self._shared.get(device)
        if generator is None:
            generator = make_generator(self._seed, device)
            self._shared[device] = generator
        return generator


def _check_inputs(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float [B, V] tensor, got {logits.dtype} {logits.shape}")
    batch = logits.shape[0]
    for name, seq in (
        ("params", params),
        ("generators", generators),
        ("prompt_token_ids", prompt_token_ids),
        ("output_token_ids", output_token_ids),
    ):
        if len(seq) != batch:
            raise ValueError(f"{name} has {len(seq)} entries for a batch of {batch} rows")
    for i, (p, g) in enumerate(zip(params, generators, strict=True)):
        if p.seed is not None and g is None:
            raise ValueError(
                f"row {i} has seed={p.seed} but no generator; pass make_generator(seed), kept "
                "across steps, so that the seed makes the request reproducible"
            )


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logits [B, V] plus each row's logit_bias (out of place: the forward's logits are never
    written; returned as is when no row has a bias)."""
    rows, cols, vals = [], [], []
    vocab = logits.shape[-1]
    for i, p in enumerate(params):
        for tid, bias in p.logit_bias:
            if tid < vocab:
                rows.append(i)
                cols.append(tid)
                vals.append(float(bias))
    if not rows:
        return logits
    return logits.float().index_put(
        (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)),
        torch.tensor(vals, device=logits.device), accumulate=True)  # [B, V]


_ARGMAX_CHUNK = 1024
"""Columns per block in `argmax_rows`' first pass."""
_ARGMAX_BLOCK_MIN_ROWS = 3
"""Fewer rows take torch's argmax: right after a forward (cold caches) the blocked path's
five small ops cost more than they save at 1 row (process step 0.20 -> 0.24 ms in
loadtest/profile_step.py, SmolLM2, one Zen 4 core), though alone it is faster at every B
(1 row 36 vs 67 us, 2 rows 42 vs 127 us, 4 rows 56 vs 253 us)."""


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """[B] bool: which rows of a [B, V] float tensor hold only finite values (no NaN, no
    +-inf), and whose sum does not overflow, found from one sum per row: NaN and inf carry
    through it. bf16 and fp32 rows sum in their own dtype (torch accumulates bf16 in fp32,
    and bf16 has fp32's range): 0.12 ms for [32, 49152] bf16 on one core against 0.71 with
    dtype=float32, which converts first. fp16 and other narrow dtypes sum in fp32: a row of
    finite fp16 logits can sum past fp16's 65504."""
    own = x.dtype in (torch.bfloat16, torch.float32, torch.float64)
    return torch.isfinite(x.sum(dim=-1, dtype=None if own else torch.float32))  # [B]


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) of a [B, V] float tensor: the first index of each row's largest value,
    the same ints, found in two passes: the vectorised max of each block of _ARGMAX_CHUNK
    columns, then argmax over the first block that holds the row's max only. torch's CPU
    argmax over the vocabulary is not vectorised: 2.1 ms for [32, 49152] fp32 on one Zen 4
    core, 0.3 ms this way. Rows holding NaN (argmax picks the first NaN), non-CPU tensors and
    batches of fewer than _ARGMAX_BLOCK_MIN_ROWS rows take x.argmax."""
    b, v = x.shape
    c = _ARGMAX_CHUNK
    n = v // c
    if n < 2 or b < _ARGMAX_BLOCK_MIN_ROWS or x.device.type != "cpu" or x.stride(-1) != 1:
        return x.argmax(dim=-1)  # [B]
    block_max = x[:, : n * c].unflatten(1, (n, c)).amax(dim=-1)  # [B, n]
    if n * c < v:
        block_max = torch.cat([block_max, x[:, n * c :].amax(dim=-1, keepdim=True)], 1)
    row_max = block_max.amax(dim=-1, keepdim=True)  # [B, 1]
    if bool(torch.isnan(row_max).any()):
        return x.argmax(dim=-1)  # [B]
    block = (block_max == row_max).to(torch.uint8).argmax(dim=-1)  # [B] first block with it
    # the last block may be short: its columns past V repeat column V - 1 (after the real one)
    cols = (block[:, None] * c + torch.arange(c)).clamp_max_(v - 1)  # [B, C]
    return block * c + x.gather(1, cols).argmax(dim=-1)  # [B]


def _sorted_descending(x: torch.Tensor) -> torch.Tensor:
    """x.sort(dim=-1, descending=True).values of a [B, V] tensor. On the CPU, fp32 without
    NaN, numpy's sort (SIMD sorting networks) gives the same values: 4.5 ms for [32, 49152]
    against torch's 91 ms on one Zen 4 core (zeros may come out as -0.0: equal to 0.0 in
    every later use). NaN (torch orders it first) and other devices take torch's sort."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad and not bool(
            torch.isnan(x).any()):
        return torch.from_numpy(-np.sort(-x.numpy(), axis=-1))  # [B, V]
    return x.sort(dim=-1, descending=True).values  # [B, V]


def _at(logprobs_full: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logprobs_full [B, V] at tokens [B] -> [B]."""
    return logprobs_full.gather(1, tokens[:, None]).squeeze(1)  # [B]


def _token_mask_indices(
    rows: list[int], seqs: Sequence[Sequence[int]], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index [N], token id [N]) for every token of seqs[i], i in rows; ids outside the
    vocabulary are dropped."""
    lengths = torch.tensor([len(seqs[i]) for i in rows], dtype=torch.long)  # [R]
    row_ids = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long), lengths)  # [N]
    token_ids = torch.cat(
        [torch.as_tensor(seqs[i], dtype=torch.long).reshape(-1) for i in rows]
    )  # [N]
    keep = (token_ids >= 0) & (token_ids < vocab)  # [N]
    return row_ids[keep].to(device), token_ids[keep].to(device)


def _apply_penalties(
    x: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Repetition (prompt + output), then frequency and presence (output) penalties."""
    batch, vocab = x.shape
    device = x.device

    rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep_rows:
        seen = torch.zeros((batch, vocab), dtype=torch.bool, device=device)  # [B, V]
        for seqs in (prompt_token_ids, output_token_ids):
            row_ids, token_ids = _token_mask_indices(rep_rows, seqs, vocab, device)  # [N], [N]
            seen[row_ids, token_ids] = True
        penalty = torch.tensor(
            [p.repetition_penalty for p in params], dtype=torch.float32, device=device
        )[:, None]  # [B, 1]
        penalised = torch.where(x > 0, x / penalty, x * penalty)  # [B, V]
        x = torch.where(seen, penalised, x)  # [B, V]

    count_rows = [
        i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
    ]
    if count_rows:
        row_ids, token_ids = _token_mask_indices(
            count_rows, output_token_ids, vocab, device
        )  # [N], [N]
        counts = torch.zeros((batch, vocab), dtype=torch.float32, device=device)  # [B, V]
        counts.index_put_(
            (row_ids, token_ids),
            torch.ones_like(token_ids, dtype=torch.float32),
            accumulate=True,
        )
        frequency = torch.tensor(
            [p.frequency_penalty for p in params], dtype=torch.float32, device=device
        )[:, None]  # [B, 1]
        presence = torch.tensor(
            [p.presence_penalty for p in params], dtype=torch.float32, device=device
        )[:, None]  # [B, 1]
        x = x - frequency * counts - presence * (counts > 0).float()  # [B, V]
    return x


def _apply_top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Set to -inf every logit outside the row's top-k, then outside its top-p nucleus.

    Both filters become a per-row threshold on the logit value, and tokens tied with the last
    kept one are kept too: what a row keeps depends on its values only, never on how a sort
    orders ties, so a seeded row samples the same whatever else is in the batch.
    """
    batch, vocab = x.shape
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    active = [k < vocab or p < 1.0 for k, p in zip(ks, top_p, strict=True)]
    if not any(active):
        return x
    device = x.device
    # Rows with top_k only need their k best values: topk is far cheaper than a full sort.
    width = max(k for k, a in zip(ks, active, strict=True) if a)
    if width < vocab:
        ranked = x.topk(width, dim=-1, sorted=True).values  # [B, W]
    else:
        ranked = _sorted_descending(x)  # [B, V]
    k = torch.tensor([min(k_, width) for k_ in ks], device=device)  # [B]
    if any(k_ < width for k_ in ks):
        rank = torch.arange(width, device=device)  # [W]
        ranked = ranked.masked_fill(rank[None, :] >= k[:, None], -math.inf)  # [B, W]
    keep = k  # [B]
    if any(p < 1.0 for p in top_p):
        p = torch.tensor(top_p, dtype=torch.float32, device=device)  # [B]
        probs = ranked.softmax(dim=-1)  # [B, W]
        mass_before = probs.cumsum(dim=-1) - probs  # [B, W]
        in_nucleus = (mass_before < p[:, None]).sum(dim=-1).clamp_min(1)  # [B]
        keep = torch.where(p < 1.0, torch.minimum(k, in_nucleus), k)  # [B]
    threshold = ranked.gather(1, (keep - 1)[:, None])  # [B, 1]
    inactive = ~torch.tensor(active, device=device)  # [B]
    threshold = threshold.masked_fill(inactive[:, None], -math.inf)  # [B, 1]
    return x.masked_fill(x < threshold, -math.inf)  # [B, V]


def _apply_min_p(x: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Set to -inf every logit whose probability is below min_p times the row's largest."""
    if not any(m > 0.0 for m in min_p):
        return x
    m = torch.tensor(min_p, dtype=torch.float32, device=x.device)  # [B]
    probs = x.softmax(dim=-1)  # [B, V]
    top = probs.max(dim=-1, keepdim=True).values  # [B, 1]
    return x.masked_fill(probs < m[:, None] * top, -math.inf)  # [B, V]
