"""Structured output, logit_bias, the matched stop and prefix sharing of parallel samples in
the GroupScheduler, driven by an in-process ModelRunner over a tiny random Llama (TP=1).

The random model knows nothing of JSON: every sample that parses and validates does so
because the grammar mask of its row made it, at temperature 1, in batches it shares with free
rows."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from serving_models import random_model, tiny_config, tokenizer, write_model
from torch_threads import torch_threads

from shardserve_server.engine.grammar import Constraint, GrammarBackend
from shardserve_server.engine.runner import CacheGeometry, ModelRunner
from shardserve_server.engine.sampling import Sampler, SamplingParams, make_generator
from shardserve_server.engine.scheduler import GroupScheduler, SchedulerConfig
from shardserve_server.engine.sequence import GenerationRequest
from shardserve_server.engine.stopping import FinishReason, StoppingParams
from shardserve_sharding.sharded_load import load_sharded_model
from shardserve_sharding.tp.comm import ThreadGroup

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z][a-z ]{0,7}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z0-9]{1,4}$"},
                 "maxItems": 3, "uniqueItems": False},
        "home": {"type": "object", "properties": {
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "ok": {"type": "boolean"}},
            "required": ["zip", "ok"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "tags", "home"],
    "additionalProperties": False,
}
"""Every path through it is bounded (string patterns, integer range, array size), so a random
walk inside the grammar ends within max_new_tokens. Strings are patterns over ASCII: a random
model emits lone UTF-8 continuation bytes, which xgrammar counts against maxLength differently
from the U+FFFD characters they decode to."""
MAX_NEW = 120


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with torch_threads(1):
        tok = tokenizer()
        model = random_model("llama", tiny_config("llama", tok.vocab_size, max_seq_len=192), 3)
        path = write_model(tmp_path_factory.mktemp("grammar") / "llama", model, tok)
        shard = load_sharded_model(path, ThreadGroup(1).comm(0))
        yield tok, shard


def run(env, reqs: list[GenerationRequest], **cfg) -> dict:
    tok, shard = env
    c = SchedulerConfig(**{"block_size": 4, "kv_cache_tokens": 16384, "max_batch_size": 32,
                           "flat_batches": True, **cfg})
    sched = GroupScheduler(c, family="llama", tokenizer=tok,
                           eos_token_ids=tuple(tok.eos_token_ids), max_seq_len=192)
    runner = ModelRunner(shard, CacheGeometry(c.kv_cache_tokens, c.block_size,
                                              c.max_batch_size), torch.float32)
    for r in reqs:
        sched.add(r)
    out = {}
    while sched.has_work():
        for o in sched.step(runner.forward):
            if o.result is not None:
                out[o.request_id] = o.result
    sched.reap()
    return out


def req(rid: str, constraint: Constraint | None = None, seed: int = 0, prompt=(5, 6, 7, 8),
        temperature: float = 1.0, **stop) -> GenerationRequest:
    return GenerationRequest(tuple(prompt), SamplingParams(temperature=temperature, seed=seed),
                             StoppingParams(max_new_tokens=stop.pop("max_new_tokens", MAX_NEW),
                                            **stop), rid, constraint=constraint)


def test_100_samples_at_temperature_1_parse_and_validate_next_to_free_rows(env):
    c = Constraint("json_schema", json.dumps(SCHEMA))
    reqs = []
    for i in range(100):
        reqs.append(req(f"c{i}", c, seed=i))
        if i % 4 == 0:  # free rows in the same batches
            reqs.append(req(f"f{i}", None, seed=i))
    out = run(env, reqs)
    for i in range(100):
        r = out[f"c{i}"]
        assert r.finish_reason is FinishReason.EOS, (r.finish_reason, r.text)
        jsonschema.validate(json.loads(r.text), SCHEMA)
    texts = {out[f"c{i}"].text for i in range(100)}
    assert len(texts) > 50  # sampled, not one forced answer


def test_free_rows_get_the_same_tokens_beside_a_constrained_row(env):
    free = [req(f"f{i}", None, seed=10 + i, max_new_tokens=12, ignore_eos=True)
            for i in range(3)]
    alone = run(env, free)
    mixed = run(env, free + [req("c", Constraint("regex", "[a-z]{3,9}"), seed=1)])
    for i in range(3):
        assert mixed[f"f{i}"].token_ids == alone[f"f{i}"].token_ids


def test_regex_and_choice(env):
    choices = ("yes", "no", "maybe not")
    reqs = [req(f"r{i}", Constraint("regex", r"[a-c]{2,5}-[0-9]{1,3}"), seed=i)
            for i in range(8)]
    reqs += [req(f"k{i}", Constraint("choice", choices), seed=i) for i in range(8)]
    reqs += [req(f"o{i}", Constraint("json_object"), seed=i, max_new_tokens=40)
             for i in range(4)]
    out = run(env, reqs)
    for i in range(8):
        assert re.fullmatch(r"[a-c]{2,5}-[0-9]{1,3}", out[f"r{i}"].text), out[f"r{i}"].text
        assert out[f"k{i}"].text in choices
    for i in range(4):  # any object; may hit max_new_tokens, then it is a prefix of one
        r = out[f"o{i}"]
        assert r.text.startswith("{")
        if r.finish_reason is FinishReason.EOS:
            assert isinstance(json.loads(r.text), dict)


def test_grammar_wins_over_min_new_tokens(env):
    """min_new_tokens bans EOS, the choice grammar allows only EOS after 'no': the grammar
    wins (EOS), the text stays inside the language."""
    out = run(env, [req(f"m{i}", Constraint("choice", ("no",)), seed=i, min_new_tokens=8)
                    for i in range(3)])
    assert all(r.text == "no" and r.finish_reason is FinishReason.EOS for r in out.values())


@pytest.mark.parametrize("c", [
    Constraint("json_schema", "{"), Constraint("json_schema", "[1]"),
    Constraint("json_schema", '{"type": "nope"}'), Constraint("regex", "("),
    Constraint("regex", "a{2,1}"), Constraint("choice", ()), Constraint("choice", ("",)),
    Constraint("xml", "x"), Constraint("regex", ""),
])
def test_bad_constraints_raise_value_error(env, c):
    tok, _ = env
    backend = GrammarBackend(tok.tokenizer.to_str(), tok.vocab_size, tok.eos_token_ids)
    with pytest.raises(ValueError):
        backend.check(c)


def test_masks_apply_to_their_rows_only(env):
    tok, _ = env
    backend = GrammarBackend(tok.tokenizer.to_str(), tok.vocab_size, tok.eos_token_ids)
    m = backend.matcher(Constraint("choice", ("the",)))
    bitmask = backend.fill([m], [1], 3)  # [3, W]
    x = torch.zeros(3, tok.vocab_size + 5)  # 5 padded columns
    backend.apply(x, [1], bitmask)
    assert not torch.isinf(x[[0, 2]]).any()
    allowed = torch.isfinite(x[1]).nonzero().flatten().tolist()
    assert allowed and all(tok.decode([t]) and "the".startswith(tok.decode([t]))
                           for t in allowed)
    assert torch.isneginf(x[1, tok.vocab_size:]).all()


def test_logit_bias_in_the_sampler():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0]] * 3)  # [3, 4]
    params = [SamplingParams(temperature=0.0, logit_bias=((3, 100.0),)),
              SamplingParams(temperature=0.0, logit_bias=((0, -100.0), (9, 5.0))),
              SamplingParams(temperature=0.0)]
    tokens, _ = Sampler().sample(logits, params, [None] * 3, [[1]] * 3, [[]] * 3,
                                 logprobs=False)
    assert tokens.tolist() == [3, 1, 0]  # id 9 is past the logits' width: ignored
    hot = SamplingParams(temperature=1.0, seed=1, logit_bias=((2, 100.0),))
    tokens, _ = Sampler().sample(logits[:1], [hot], [make_generator(1)], [[1]], [[]])
    assert tokens.tolist() == [2]
    assert logits[0, 3] == -1.0  # the forward's logits are never written
    for bad in (((1, 101.0),), ((1, float("nan")),), ((-1, 1.0),), ((True, 1.0),)):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)


def test_the_matched_stop_is_reported(env):
    tok, _ = env
    free = run(env, [req("g", None, temperature=0.0, max_new_tokens=12, ignore_eos=True)])
    ids, text = free["g"].token_ids, free["g"].text
    stop_str = text[3:6]
    out = run(env, [req("s", None, temperature=0.0, max_new_tokens=12, ignore_eos=True,
                        stop=(stop_str, "\x00never")),
                    req("t", None, temperature=0.0, max_new_tokens=12, ignore_eos=True,
                        stop_token_ids=(ids[4],)),
                    req("m", None, temperature=0.0, max_new_tokens=3, ignore_eos=True)])
    assert out["s"].finish_reason is FinishReason.STOP_SEQUENCE
    assert out["s"].stop_reason == stop_str
    assert out["t"].stop_reason == ids[4] and out["t"].token_ids[-1] == ids[4]
    assert out["m"].stop_reason is None


def test_samples_of_one_prompt_prefill_it_once(env):
    """Four requests with one 41-token prompt arrive together (what n = 4 sends): the first
    prefills it, the others wait and take its 10 full blocks from the cache."""
    prompt = tuple(range(3, 44))
    reqs = [req(f"s{i}", None, seed=i, prompt=prompt, max_new_tokens=4) for i in range(4)]
    out = run(env, reqs, max_prefill_tokens=16)
    cached = sorted(out[f"s{i}"].cached_tokens for i in range(4))
    assert cached == [0, 40, 40, 40]
    off = run(env, reqs, max_prefill_tokens=16, prefix_caching=False)
    assert all(out[k].token_ids == off[k].token_ids for k in out)
