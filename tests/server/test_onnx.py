"""ONNX export and the ONNX Runtime backend: same tokens as torch, replicas, failover, hybrid."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from shardserve_server.engine.async_engine import AsyncEngine, EngineError, EngineLimits
from shardserve_server.engine.local import LocalEngine
from shardserve_server.engine.sampling import SamplingParams
from shardserve_server.engine.sequence import GenerationRequest
from shardserve_server.engine.stopping import StoppingParams
from shardserve_server.workers.worker import WorkerConfig
from shardserve_sharding.checkpoint.io import load_model
from shardserve_sharding.onnx_export.export import export_onnx
from shardserve_sharding.onnx_export.runtime import OnnxStepRuntime

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Three colours of the sea:"]


def greedy(ids, n=12, rid="r"):
    return GenerationRequest(tuple(ids), SamplingParams(temperature=0.0),
                             StoppingParams(n, ignore_eos=True), rid)


@pytest.fixture(scope="session")
def smollm2_onnx(tmp_path_factory, smollm2_dir):
    out = tmp_path_factory.mktemp("onnx") / "smollm2"
    rep = export_onnx(smollm2_dir, out)
    assert rep.max_rel_err <= 1e-4
    return out


def run_engine(cfg: WorkerConfig, reqs, replicas=1, limits=None):
    async def go():
        eng = AsyncEngine(cfg, limits or EngineLimits(), replicas=replicas)
        await eng.start()
        try:
            return await asyncio.gather(*(eng.submit(r).result() for r in reqs)), eng.stats()
        finally:
            await eng.shutdown()
    return asyncio.run(go())


@pytest.mark.slow
def test_smollm2_onnx_matches_torch_greedy(smollm2_onnx, smollm2):
    tok = smollm2.tokenizer
    local = LocalEngine(smollm2.model, tok)
    reqs = [greedy(tok.encode(p), 12, f"p{i}") for i, p in enumerate(PROMPTS)]
    ref = [r.token_ids for r in local.generate(reqs)]
    res, _ = run_engine(WorkerConfig(str(smollm2_onnx), backend="onnx", threads=2,
                                     kv_cache_tokens=2048), reqs)  # a ragged batch
    assert [r.token_ids for r in res] == ref


def test_onnx_export_roundtrip_every_family(tmp_path, tiny_llama_dir, tiny_convlm_dir,
                                            tiny_rnnlm_dir, tiny_rnnlm_gru_dir):
    for name, d in (("llama", tiny_llama_dir), ("convlm", tiny_convlm_dir),
                    ("rnnlm", tiny_rnnlm_dir), ("rnnlm-gru", tiny_rnnlm_gru_dir)):
        out = tmp_path / name
        rep = export_onnx(d, out)
        assert rep.max_rel_err <= 1e-4 and rep.int8 is None
        q = export_onnx(d, tmp_path / f"{name}-int8", dtype="int8").int8
        assert q and q["perplexity_int8"] > 0 and q["perplexity_fp32"] > 0
        loaded = load_model(d)
        tok = loaded.tokenizer
        reqs = [greedy(tok.encode(p)[:12] or [1], 8, f"{name}{i}") for i, p in
                enumerate(["hello world", "a b c", "the quick brown fox jumps"])]
        ref = [r.token_ids for r in LocalEngine(loaded.model, tok).generate(reqs)]
        res, _ = run_engine(WorkerConfig(str(out), backend="onnx", kv_cache_tokens=1024,
                                         block_size=4), reqs)
        assert [r.token_ids for r in res] == ref, name
        if name.startswith("rnnlm"):  # the state is an explicit input and output
            import onnx

            g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
            assert [i.name for i in g.input] == ["tokens", "state", "num_new", "logits_index"]
            assert [o.name for o in g.output] == ["logits", "new_state"]
            cell = "GRU" if name.endswith("gru") else "LSTM"
            assert [n.op_type for n in g.node].count(cell) == loaded.model.config.n_layers


def test_export_refuses_existing_and_leaves_nothing_on_failure(tmp_path, tiny_llama_dir):
    out = tmp_path / "x"
    out.mkdir()
    with pytest.raises(FileExistsError):
        export_onnx(tiny_llama_dir, out)
    with pytest.raises(ValueError, match="fp32 or int8"):
        export_onnx(tiny_llama_dir, tmp_path / "y", dtype="fp16")
    assert not (tmp_path / "y").exists()


def test_llama_graph_is_short_and_versioned(tmp_path, tiny_llama_dir):
    import json

    import onnx

    out = tmp_path / "o"
    export_onnx(tiny_llama_dir, out)
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    n_layers = json.loads((out / "onnx_model.json").read_text())["n_layers"]
    assert len(ops) <= 18 * n_layers + 7, len(ops)  # no shape arithmetic left
    assert not {"Shape", "Unsqueeze", "Where", "Slice"} & set(ops)
    assert ops.count("Attention") == n_layers
    with pytest.raises(ValueError, match="opset >= 23"):
        export_onnx(tiny_llama_dir, tmp_path / "old", opset=17)
    assert not (tmp_path / "old").exists()
    meta = json.loads((out / "onnx_model.json").read_text())
    meta["graph"] = 1  # an export from before the hand-written graph
    (out / "onnx_model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="export it again"):
        OnnxStepRuntime(out)


def test_runtime_pool_is_bound_not_copied(tmp_path, tiny_llama_dir):
    out = tmp_path / "o"
    export_onnx(tiny_llama_dir, out)
    rt = OnnxStepRuntime(out, kv_cache_tokens=64, block_size=4)
    before = rt.k.__array_interface__["data"][0]
    tables = np.arange(4)[None, :].astype(np.int64)
    rt.forward(np.array([[5, 6, 7]]), np.array([[0, 1, 2]]), np.array([3]), np.array([2]), tables)
    assert rt.k.__array_interface__["data"][0] == before  # written in place
    assert np.abs(rt.k[:, :3]).sum() > 0 and np.abs(rt.k[:, 3:]).sum() == 0


@pytest.mark.slow
def test_two_onnx_replicas_spread_and_fail_over(tmp_path, tiny_llama_dir):
    out = tmp_path / "o"
    export_onnx(tiny_llama_dir, out)
    tok = load_model(tiny_llama_dir).tokenizer
    ids = tok.encode("the quick brown fox")
    cfg = WorkerConfig(str(out), backend="onnx", max_batch_size=1, kv_cache_tokens=1024,
                       block_size=4)

    async def go():
        eng = AsyncEngine(cfg, EngineLimits(lookahead=3), replicas=2)
        await eng.start()
        try:
            # long requests (a tiny model decodes ~1000 tokens/s): still running at the kill
            ref = await eng.submit(greedy(ids, 480, "ref")).result()
            streams = [eng.submit(greedy(ids, 480, f"s{i}")) for i in range(8)]
            deadline = time.monotonic() + 10
            while True:
                per = [r["inflight"] for r in eng.stats()["replicas"]]
                if min(per) >= 1 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.01)
            assert min(per) >= 1, per  # both replicas got work
            victim = eng.stats()["replicas"][1]["pids"][0]
            os.kill(victim, signal.SIGKILL)
            res = await asyncio.gather(*(s.result() for s in streams), return_exceptions=True)
            failed = [r for r in res if isinstance(r, BaseException)]
            ok = [r for r in res if not isinstance(r, BaseException)]
            assert all(isinstance(e, EngineError) for e in failed)
            assert len(failed) <= 1  # only the one that was streaming on the dead replica
            assert all(r.token_ids == ref.token_ids for r in ok)
            deadline = time.monotonic() + 60
            while not eng.group_up and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert eng.group_up and eng.stats()["restarts"] == 1
            again = await eng.submit(greedy(ids, 480, "after")).result()
            assert again.token_ids == ref.token_ids
            toks = [r["tokens_out"] for r in eng.stats()["replicas"]]
            return toks
        finally:
            await eng.shutdown()
    asyncio.run(go())


@pytest.mark.slow
def test_hybrid_two_replicas_of_tp2(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir)
    tok = loaded.tokenizer
    reqs = [greedy(tok.encode(p), 10, f"h{i}") for i, p in
            enumerate(["hello there", "one two three four", "x", "the quick brown"])]
    ref = [r.token_ids for r in LocalEngine(loaded.model, tok).generate(reqs)]
    res, stats = run_engine(WorkerConfig(str(tiny_llama_dir), tp=2, threads=1,
                                         kv_cache_tokens=1024, block_size=4), reqs, replicas=2)
    assert [r.token_ids for r in res] == ref
    assert len(stats["replicas"]) == 2 and len(stats["pids"]) == 4
