"""The lean step's shortcuts give what the general code gives: `argmax_rows` is torch's
argmax (first index of the max, ties across blocks, short last block, -inf, NaN), the numpy
sort gives torch's sorted values, and GroupScheduler.process's batched greedy path picks the
same tokens as the general sampling path and as each row processed alone, in batches that mix
greedy, seeded top-p, logprob, logit-bias and min_new_tokens rows, and bf16 logits give what
their fp32 upcast gives."""

from __future__ import annotations

import pytest
import torch
from serving_models import tokenizer

from shardserve_server.engine import sampling
from shardserve_server.engine.sampling import SamplingParams, argmax_rows, finite_rows
from shardserve_server.engine.scheduler import GroupScheduler, SchedulerConfig
from shardserve_server.engine.sequence import GenerationRequest
from shardserve_server.engine.stopping import StoppingParams


def _tied(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Logits on a coarse grid: each row's max occurs several times, in different blocks."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2).round()  # [B, V]


@pytest.mark.parametrize("vocab", [300, 2048, 2049, 3000, 49152])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_is_torch_argmax(vocab: int, dtype: torch.dtype) -> None:
    x = _tied((9, vocab), vocab).to(dtype)  # [B, V]
    assert torch.equal(argmax_rows(x[:1]), x[:1].argmax(dim=-1))
    x[1] = float("-inf")  # every token masked: index 0
    x[2, : vocab // 2] = float("-inf")
    x[3, -1] = 50.0  # the max in the short last block
    x[4, 7] = float("inf")
    x[4, -3] = float("inf")
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    x[5, 100] = float("nan")  # argmax takes the first NaN: the general path
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    col = x.t().contiguous().t()  # not row-contiguous
    assert torch.equal(argmax_rows(col), x.argmax(dim=-1))


def test_sorted_descending_is_torch_sort() -> None:
    x = _tied((4, 5000), 1)  # [B, V]
    x[0, :2000] = float("-inf")
    x[1, ::3] = -0.0
    want = x.sort(dim=-1, descending=True).values
    assert torch.equal(sampling._sorted_descending(x), want)
    x[2, 9] = float("nan")  # torch puts NaN first: torch's sort
    got, want = sampling._sorted_descending(x), x.sort(dim=-1, descending=True).values
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_top_p_filter_matches_torch_sort(monkeypatch) -> None:
    """The nucleus (and top-k) filter with numpy's sort keeps what torch's sort kept."""
    x = _tied((6, 3000), 2) / 3  # [B, V]
    top_k, top_p = [0, 5, 0, 40, 0, 0], [0.9, 1.0, 0.5, 0.95, 1.0, 0.999]
    got = sampling._apply_top_k_top_p(x.clone(), top_k, top_p)
    monkeypatch.setattr(sampling, "_sorted_descending",
                        lambda t: t.sort(dim=-1, descending=True).values)
    assert torch.equal(got, sampling._apply_top_k_top_p(x.clone(), top_k, top_p))


GREEDY = SamplingParams(temperature=0.0)
ROWS = {
    "greedy": (GREEDY, {}),
    "greedy-lp": (GREEDY, {"logprobs": 2}),
    "greedy-lp0": (GREEDY, {"logprobs": 0}),
    "top-p": (SamplingParams(temperature=0.8, top_p=0.9, seed=11), {}),
    "top-k-lp": (SamplingParams(temperature=1.2, top_k=20, seed=12), {"logprobs": 1}),
    "bias": (SamplingParams(temperature=0.0, logit_bias=((5, 100.0),)), {}),
    "penalty": (SamplingParams(temperature=0.0, repetition_penalty=1.3), {}),
    "min-new": (GREEDY, {"min_new_tokens": 3, "ignore_eos": False}),
}


def _run(names: list[str], logits: list[torch.Tensor], cols: list[int]) -> dict[str, list]:
    """Process `logits` (one [len(cols), V] tensor per step, rows = cols) for requests
    `names`; each request's (token, logprob) per step."""
    tok = tokenizer()
    sched = GroupScheduler(SchedulerConfig(block_size=4, kv_cache_tokens=4096,
                                           prefix_caching=False),
                           family="llama", tokenizer=tok,
                           eos_token_ids=tuple(tok.eos_token_ids), max_seq_len=512)
    for i, name in enumerate(names):
        params, kw = ROWS[name]
        kw = {"ignore_eos": True, **kw}
        logprobs = kw.pop("logprobs", None)
        sched.add(GenerationRequest((3 + i, 4, 5), params,
                                    StoppingParams(max_new_tokens=len(logits), **kw), name,
                                    logprobs=logprobs))
    sched.admit()
    rows = sorted(sched.running, key=lambda s: names.index(s.id))
    for s in rows:
        s.prefilled = len(s.seq.prompt_ids)
    got: dict[str, list] = {n: [] for n in names}
    for step in logits:
        for out in sched.process(step[cols], rows, [True] * len(rows)):
            got[out.request_id].append((out.token_id, out.logprob))
    return got


@pytest.fixture
def small_blocks(monkeypatch):
    """argmax_rows' blocks of 64 columns, so that the tiny vocabulary has several, and the
    blocked path for a single row too."""
    monkeypatch.setattr(sampling, "_ARGMAX_CHUNK", 64)
    monkeypatch.setattr(sampling, "_ARGMAX_BLOCK_MIN_ROWS", 1)


def test_batched_greedy_path_matches_general_path(small_blocks, monkeypatch) -> None:
    vocab = tokenizer().vocab_size
    steps = [_tied((4, vocab), 20 + k) for k in range(5)]  # [B, V] per step, ties included
    names = ["greedy"]
    fast = _run(names, steps, [0])["greedy"]
    assert [t for t, _ in fast] == [int(s[0].argmax()) for s in steps]
    # the same request through the general path (Sampler.sample) gives the same tokens
    monkeypatch.setattr("shardserve_server.engine.scheduler._plain_greedy", lambda s: False)
    assert _run(names, steps, [0])["greedy"] == fast


def test_mixed_batches_give_each_row_its_tokens_alone(small_blocks) -> None:
    vocab = tokenizer().vocab_size
    names = list(ROWS)
    steps = [_tied((len(names), vocab), 40 + k) / 2 for k in range(6)]  # [B, V]
    together = _run(names, steps, list(range(len(names))))
    plain = _run(["greedy", "min-new"], steps, [0, 7])  # the batched path, then general
    for i, name in enumerate(names):
        alone = _run([name], steps, [i])[name]
        assert together[name] == alone, name
    assert plain["greedy"] == together["greedy"]
    assert plain["min-new"] == together["min-new"]
    for i, name in enumerate(("greedy", "greedy-lp", "greedy-lp0")):
        assert [t for t, _ in together[name]] == [int(s[i].argmax()) for s in steps]
    assert all(lp is not None for _, lp in together["greedy-lp0"])


def test_bf16_logits_give_what_their_fp32_upcast_gives(small_blocks) -> None:
    """A bf16 model's forward hands its logits on in bf16 (ModelRunner.forward): greedy rows
    take their argmax from them as they are, sampled and logprob rows from the fp32 upcast;
    every row gets exactly the tokens and logprobs of the fp32 logits it would have had."""
    vocab = tokenizer().vocab_size
    names = list(ROWS)
    steps = [(_tied((len(names), vocab), 60 + k) / 3).to(torch.bfloat16) for k in range(5)]
    cols = list(range(len(names)))
    assert _run(names, steps, cols) == _run(names, [s.float() for s in steps], cols)
    greedy = _run(["greedy"], steps, [0])  # the batched greedy path alone, on bf16
    assert greedy == _run(["greedy"], [s.float() for s in steps], [0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_rows_flags_nan_and_inf_in_every_dtype(dtype) -> None:
    """finite_rows is isfinite(x).all(dim=-1) for logits of a model's size, in each dtype it
    sums in (bf16 in its own, fp16 in fp32), and a row of large finite fp16 logits, whose
    fp16 sum would overflow, stays finite."""
    x = torch.randn(7, 49152, generator=torch.Generator().manual_seed(5)) * 8  # [B, V]
    x[1, 100] = float("nan")
    x[2, 7] = float("inf")
    x[3, -1] = float("-inf")
    x[4, :2] = torch.tensor([float("inf"), float("-inf")])
    x[5] = 30.0  # fp16: sums to 1.47e6, past fp16's 65504
    x = x.to(dtype)
    want = torch.isfinite(x).all(dim=-1)
    assert finite_rows(x).tolist() == want.tolist() == [True, False, False, False, False,
                                                        True, True]
    assert finite_rows(x[:0]).tolist() == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_row_in_a_greedy_batch_fails_alone(small_blocks, dtype, bad) -> None:
    vocab = tokenizer().vocab_size
    step = _tied((2, vocab), 60).to(dtype)  # [B, V]
    step[1, 3] = bad
    tok = tokenizer()
    sched = GroupScheduler(SchedulerConfig(block_size=4, kv_cache_tokens=4096,
                                           prefix_caching=False),
                           family="llama", tokenizer=tok,
                           eos_token_ids=tuple(tok.eos_token_ids), max_seq_len=512)
    for name in ("ok", "nan"):
        sched.add(GenerationRequest((3, 4), GREEDY, StoppingParams(max_new_tokens=4), name))
    sched.admit()
    rows = sorted(sched.running, key=lambda s: s.id != "ok")
    for s in rows:
        s.prefilled = 2
    outs = {o.request_id: o for o in sched.process(step, rows, [True, True])}
    assert outs["ok"].token_id == int(step[0].argmax()) and outs["ok"].result is None
    assert outs["nan"].result is not None and outs["nan"].result.error
