"""The single-process engine on a tiny random Llama, a tiny conv LM and SmolLM2-135M.

Ragged batches equal single prompts (rows finishing at different steps), seeded sampling is
reproducible whatever shares the batch, stop strings / EOS / min_new_tokens / max_new_tokens end
requests as documented, logprobs are those of the model, streamed pieces add up to the text,
bf16 runs and agrees with fp32, and over-long prompts are refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from shardserve_server.engine.local import EngineConfig, LocalEngine
from shardserve_server.engine.sampling import SamplingParams
from shardserve_server.engine.sequence import GenerationRequest, GenerationResult
from shardserve_server.engine.stopping import FinishReason, StoppingParams
from shardserve_sharding.checkpoint.io import load_model

GREEDY = SamplingParams(temperature=0.0)

PROMPTS = [
    "Hi",
    "The capital of France is",
    "def add(a, b):\n    return",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The history of computing is longer than the history of computers: counting boards and "
    "the abacus helped merchants add and subtract for thousands of years, and then",
]
MAX_NEW = [7, 3, 10, 5, 8]  # rows of one batch finish at different steps
REF_PROMPT = PROMPTS[1]
REF_LEN = 16


def req(ids, n, sampling=GREEDY, rid="", logprobs=None, **stop) -> GenerationRequest:
    return GenerationRequest(
        tuple(ids), sampling, StoppingParams(max_new_tokens=n, **stop), rid, logprobs
    )


def run(engine: LocalEngine, reqs: list[GenerationRequest]):
    """generate() with a streaming callback: (results, the concatenated pieces per request)."""
    pieces: list[list[str]] = [[] for _ in reqs]
    results = engine.generate(reqs, on_token=lambda i, e: pieces[i].append(e.text))
    return results, ["".join(p) for p in pieces]


@dataclass
class Case:
    name: str
    engine: LocalEngine
    directory: Path
    refs: dict  # (prompt ids, n) -> greedy result of that prompt alone, ignore_eos

    @property
    def tok(self):
        return self.engine.tokenizer

    def greedy(self, ids: list[int], n: int) -> GenerationResult:
        key = (tuple(ids), n)
        if key not in self.refs:
            self.refs[key] = self.engine.generate([req(ids, n, ignore_eos=True)])[0]
        return self.refs[key]


_DIRS = {"tiny-llama": "tiny_llama_untied_dir", "tiny-convlm": "tiny_convlm_dir",
         "tiny-rnnlm": "tiny_rnnlm_dir"}


@pytest.fixture(scope="module")
def cases(request):
    """name -> Case, built on first use and shared by the `case` and `tiny` fixtures."""
    built: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in built:
            if name == "smollm2":
                m, directory = request.getfixturevalue("smollm2"), request.getfixturevalue(
                    "smollm2_dir")
            else:
                directory = request.getfixturevalue(_DIRS[name])
                m = load_model(directory)
            built[name] = Case(name, LocalEngine(m.model, m.tokenizer), directory, {})
        return built[name]

    return get


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-convlm", "tiny-rnnlm", "smollm2"])
def case(request, cases) -> Case:
    return cases(request.param)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-convlm", "tiny-rnnlm"])
def tiny(request, cases) -> Case:
    return cases(request.param)


@pytest.fixture(scope="module")
def smol(cases) -> Case:
    return cases("smollm2")


def test_ragged_batch_equals_each_prompt_alone(case):
    ids = [case.engine.encode(p) for p in PROMPTS]
    lens = sorted(len(i) for i in ids)
    assert lens[0] <= 3 and lens[-1] >= 20 * lens[0], lens  # very different lengths
    reqs = [req(i, n, rid=f"r{k}", ignore_eos=True) for k, (i, n) in
            enumerate(zip(ids, MAX_NEW, strict=True))]
    batched, streamed = run(case.engine, reqs)
    for k, (r, alone) in enumerate(zip(batched, reqs, strict=True)):
        ref = case.greedy(alone.prompt_ids, alone.stopping.max_new_tokens)
        assert r.request_id == f"r{k}" and r.prompt_tokens == len(ids[k])
        assert r.token_ids == ref.token_ids, (case.name, k)
        assert r.finish_reason is FinishReason.MAX_TOKENS and len(r.token_ids) == MAX_NEW[k]
        assert r.text == ref.text == case.tok.decode(r.token_ids)
        assert streamed[k] == r.text


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(case):
    ids = case.engine.encode("My favourite animal is")
    other = case.engine.encode("Something else entirely, and rather longer than the first")

    def sampled(seed: int) -> SamplingParams:
        return SamplingParams(temperature=0.8, top_p=0.9, seed=seed)

    n = 8
    alone = case.engine.generate([req(ids, n, sampled(1234), ignore_eos=True)])[0]
    mixed = case.engine.generate(
        [req(other, 3, GREEDY, ignore_eos=True)]
        + [req(ids, n, sampled(s), ignore_eos=True) for s in (7, 1234, 8, 9)]
        + [req(other, n, SamplingParams(temperature=1.0), ignore_eos=True)]
    )
    assert mixed[2].token_ids == alone.token_ids  # same seed: same tokens, other companions
    assert mixed[2].text == alone.text
    outs = {tuple(r.token_ids) for r in mixed[1:5]}
    assert len(outs) > 1, outs  # different seeds sample different continuations


def _pick_stop(text: str) -> str:
    """An ASCII letters/digits substring from the middle of text (not at its very start)."""
    for length in (3, 2):
        for i in range(max(1, len(text) // 3), len(text) - length + 1):
            s = text[i : i + length]
            if s.isascii() and s.isalnum():
                return s
    pytest.fail(f"no stop string candidate in {text!r}")


def test_stop_strings_end_and_are_cut_from_text_and_stream(case):
    ids = case.engine.encode(REF_PROMPT)
    ref = case.greedy(ids, REF_LEN)
    stop = _pick_stop(ref.text)
    at = ref.text.find(stop)
    results, streamed = run(
        case.engine,
        [req(ids, REF_LEN, stop=(stop, "never-generated"), ignore_eos=True),
         req(ids, REF_LEN, stop=(stop,), include_stop_str_in_output=True, ignore_eos=True)],
    )
    cut, kept = results
    for r, text in ((cut, ref.text[:at]), (kept, ref.text[: at + len(stop)])):
        assert r.finish_reason is FinishReason.STOP_SEQUENCE, (case.name, stop, r)
        assert r.text == text
        assert r.token_ids == ref.token_ids[: len(r.token_ids)]
    assert stop not in cut.text and streamed == [cut.text, kept.text]


def test_max_new_tokens_gives_exactly_that_many(case):
    ids = case.engine.encode(REF_PROMPT)
    for n in (1, 2):
        r = case.engine.generate([req(ids, n, ignore_eos=True)])[0]
        assert r.finish_reason is FinishReason.MAX_TOKENS and len(r.token_ids) == n
        assert r.token_ids == case.greedy(ids, REF_LEN).token_ids[:n]


def test_eos_and_min_new_tokens_with_a_chosen_eos(tiny):
    """Make the k-th greedy token the EOS: generation ends there, its text is dropped; with
    min_new_tokens past k it cannot end there."""
    ids = tiny.engine.encode(REF_PROMPT)
    ref = tiny.greedy(ids, REF_LEN).token_ids
    k = next(i for i in range(2, REF_LEN) if ref[i] not in ref[:i])
    eos = ref[k]
    tok = dataclasses.replace(tiny.tok, eos_token_ids=(eos,))
    engine = LocalEngine(tiny.engine.model, tok)
    (r, long), streamed = run(
        engine, [req(ids, REF_LEN), req(ids, REF_LEN, min_new_tokens=k + 3)]
    )
    assert r.finish_reason is FinishReason.EOS and r.token_ids == ref[: k + 1]
    assert r.text == tok.decode(ref[:k]) == streamed[0]  # the EOS token's text is not there
    assert len(long.token_ids) >= k + 3 and long.token_ids[:k] == ref[:k]
    assert eos not in long.token_ids[: k + 2]
    if long.finish_reason is FinishReason.EOS:
        assert long.token_ids[-1] == eos and len(long.token_ids) < REF_LEN
    else:
        assert long.finish_reason is FinishReason.MAX_TOKENS and len(long.token_ids) == REF_LEN
    assert long.text == streamed[1]


def test_smollm2_stops_at_its_eos_and_min_new_tokens_delays_it(smol):
    eos_ids = smol.engine.eos_token_ids
    question = "What is 2+2? Answer with a number only."  # a short answer, then <|im_end|>
    chat = smol.tok.apply_chat_template([{"role": "user", "content": question}])
    ids = smol.engine.encode(chat)
    (r,), streamed = run(smol.engine, [req(ids, 24)])
    assert r.finish_reason is FinishReason.EOS, r
    assert r.token_ids[-1] in eos_ids and not set(r.token_ids[:-1]) & set(eos_ids)
    assert r.text == smol.tok.decode(r.token_ids[:-1]) == streamed[0]
    assert "<|im_end|>" not in r.text and "4" in r.text
    n = len(r.token_ids)
    later = smol.engine.generate([req(ids, n + 4, min_new_tokens=n + 2)])[0]
    assert later.token_ids[: n - 1] == r.token_ids[:-1]
    assert len(later.token_ids) >= n + 2
    assert not set(later.token_ids[: n + 1]) & set(eos_ids)


@torch.inference_mode()
def test_logprobs_are_the_models(case):
    ids = case.engine.encode(REF_PROMPT)
    ref = case.greedy(ids, REF_LEN)
    top3, chosen = case.engine.generate(
        [req(ids, 4, logprobs=3, ignore_eos=True), req(ids, 4, logprobs=0, ignore_eos=True)]
    )
    assert top3.token_ids == chosen.token_ids == ref.token_ids[:4]
    assert chosen.top_logprobs is None and ref.logprobs is None
    assert len(top3.logprobs) == len(top3.top_logprobs) == 4
    for tok, lp, top in zip(top3.token_ids, top3.logprobs, top3.top_logprobs, strict=True):
        assert len(top) == 3 and [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert lp <= 0 and lp == pytest.approx(top[0][1], abs=1e-6)  # greedy: the max
        assert top[0][0] == tok or top[0][1] == pytest.approx(top[1][1], abs=1e-6)
    assert chosen.logprobs == pytest.approx(top3.logprobs, abs=1e-4)  # other row
    model = case.engine.model
    full = model(torch.tensor([ids]), torch.arange(len(ids))[None])[0, -1]  # [V]
    expect = torch.log_softmax(full.float(), dim=-1)[top3.token_ids[0]]
    assert top3.logprobs[0] == pytest.approx(float(expect), abs=1e-4)


def test_bf16_runs_and_agrees_with_fp32(case):
    ids = case.engine.encode(REF_PROMPT)
    ref = case.greedy(ids, REF_LEN).token_ids
    m = load_model(case.directory, dtype=torch.bfloat16)
    engine = LocalEngine(m.model, m.tokenizer, EngineConfig(dtype=torch.bfloat16))
    (r,), streamed = run(engine, [req(ids, REF_LEN, ignore_eos=True)])
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    if hasattr(engine.model, "rope_cos"):  # fp32 rotary tables kept: the fused bf16 path runs
        assert engine.model.rope_cos.dtype == torch.float32
        from shardserve_sharding.models import fused_ops

        if fused_ops.kernels() is not None:
            x = torch.zeros(1, 1, engine.model.config.dim, dtype=torch.bfloat16)
            with torch.inference_mode():
                assert engine.model._can_fuse(x)
    assert r.finish_reason is FinishReason.MAX_TOKENS and len(r.token_ids) == REF_LEN
    assert r.text == m.tokenizer.decode(r.token_ids) == streamed[0]
    if case.name == "smollm2":  # a random tiny model's logits are too flat to compare
        agree = sum(a == b for a, b in zip(r.token_ids, ref, strict=True))
        assert r.token_ids[:4] == ref[:4], (agree, r.token_ids, ref)
    # the fp32 engine's model was not touched by the bf16 one
    assert next(case.engine.model.parameters()).dtype == torch.float32


def test_overlong_and_empty_prompts_are_refused(case):
    limit = case.engine.max_seq_len
    with pytest.raises(ValueError, match="max_seq_len"):
        case.engine.generate([req([1] * (limit + 1), 1)])
    with pytest.raises(ValueError, match="max_seq_len"):  # prompt fits, prompt + output not
        case.engine.generate([req([1] * (limit - 4), 5)])
    with pytest.raises(ValueError, match="empty"):
        case.engine.generate([req([], 1)])
