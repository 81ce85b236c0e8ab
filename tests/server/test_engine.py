"""The single-process engine: ragged batches equal single prompts, seeds, stopping, streaming."""

from __future__ import annotations

import pytest
import torch

from shardserve_server.engine.local import EngineConfig, LocalEngine
from shardserve_server.engine.sampling import SamplingParams
from shardserve_server.engine.sequence import GenerationRequest
from shardserve_server.engine.stopping import FinishReason, StoppingParams
from shardserve_sharding.checkpoint.io import load_model

GREEDY = SamplingParams(temperature=0.0)


def req(ids, n=12, sampling=GREEDY, rid="r", **stop):
    return GenerationRequest(tuple(ids), sampling, StoppingParams(max_new_tokens=n, **stop), rid)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    m = load_model(tiny_llama_dir)
    return LocalEngine(m.model, m.tokenizer)


@pytest.fixture(scope="module")
def smol(smollm2):
    return LocalEngine(smollm2.model, smollm2.tokenizer)


PROMPTS = ["Hi", "The quick brown fox jumps over the lazy dog and then", "1 2 3",
           "def add(a, b):\n    return", "A much longer prompt about the history of computing, "
           "which began with mechanical calculators and continued with"]


@pytest.mark.parametrize("which", ["tiny", "smol"])
def test_ragged_batch_equals_one_at_a_time(which, request):
    eng = request.getfixturevalue(which)
    prompts = PROMPTS if which == "tiny" else [PROMPTS[0], PROMPTS[1], PROMPTS[4]]
    reqs = [req(eng.encode(p), 6, rid=str(i), ignore_eos=True) for i, p in enumerate(prompts)]
    batched = [r.token_ids for r in eng.generate(reqs)]
    alone = [eng.generate([r])[0].token_ids for r in reqs]
    assert batched == alone


def test_text_is_the_decoded_tokens(smol):
    for p in PROMPTS[:3]:
        r = smol.generate([req(smol.encode(p), 9, ignore_eos=True)])[0]
        assert r.finish_reason is FinishReason.MAX_TOKENS and len(r.token_ids) == 9
        assert r.text == smol.tokenizer.decode(r.token_ids)


def test_seed_reproducible_and_independent_of_batch(smol):
    ids = smol.encode("Once upon a time")
    s = SamplingParams(temperature=0.8, top_p=0.9, seed=1234)
    a = smol.generate([req(ids, 12, s)])[0].token_ids
    other = req(smol.encode("Something else entirely"), 12, SamplingParams(temperature=1.0))
    b = smol.generate([other, req(ids, 12, s, rid="x")])[1].token_ids
    assert a == b
    outs = {tuple(smol.generate([req(ids, 12, SamplingParams(temperature=1.0, seed=k))])[0]
                  .token_ids) for k in range(4)}
    assert len(outs) > 1


def test_stop_string_eos_min_tokens_and_streaming(smol):
    ids = smol.encode("The capital of France is")
    full = smol.generate([req(ids, 8, ignore_eos=True)])[0]
    word = full.text.strip().split()[0].rstrip(".")  # " Paris." -> "Paris"
    r = smol.generate([req(ids, 8, stop=(word,))])[0]
    assert r.finish_reason is FinishReason.STOP_SEQUENCE and word not in r.text
    chat = smol.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}])
    r = smol.generate([req(smol.encode(chat), 64)])[0]
    assert r.finish_reason is FinishReason.EOS
    assert r.token_ids[-1] in smol.eos_token_ids and "<|im_end|>" not in r.text
    n_eos = len(r.token_ids)
    r2 = smol.generate([req(smol.encode(chat), n_eos + 6, min_new_tokens=n_eos + 3)])[0]
    assert len(r2.token_ids) >= n_eos + 3
    pieces: list[str] = []
    r3 = smol.generate([req(ids, 10, ignore_eos=True)], on_token=lambda i, e: pieces.append(
        e.text))[0]
    assert "".join(pieces) == r3.text


def test_logprobs(smol):
    ids = smol.encode("The capital of France is")
    r = smol.generate([GenerationRequest(tuple(ids), GREEDY, StoppingParams(4), "l", 3)])[0]
    assert r.logprobs is not None and len(r.logprobs) == 4
    for lp, top in zip(r.logprobs, r.top_logprobs, strict=True):
        assert abs(lp - top[0][1]) < 1e-5 and lp <= 0


def test_bf16_agrees_with_fp32_at_first(smollm2, smollm2_dir):
    ids = smollm2.tokenizer.encode("The capital of France is")
    ref = LocalEngine(smollm2.model, smollm2.tokenizer).generate([req(ids, 4)])[0].token_ids
    m = load_model(smollm2_dir, dtype=torch.bfloat16)
    out = LocalEngine(m.model, m.tokenizer, EngineConfig(dtype=torch.bfloat16)).generate(
        [req(ids, 4)])[0].token_ids
    assert out == ref


def test_too_long_prompt(tiny):
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny.generate([req([1] * 500, 100)])
