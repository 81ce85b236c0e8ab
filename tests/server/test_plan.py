"""The layout planner: per-rank sizes from the split table, validity, the step arithmetic on a
stored costs file, the CLI's table and --json, damaged costs files. The only real measurement
here is one short run of the TP layer loop on the tiny config (2 ranks); the rest are
`shardserve plan --measure` and loadtest/validate_plan.py."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from shardserve_server.cli import main
from shardserve_server.plan import closed_loop
from shardserve_server.plan import costs as plan_costs
from shardserve_server.plan.footprint import footprint
from shardserve_server.plan.predict import (
    LayoutChoice,
    Workload,
    predict,
    recommend,
    resolve_model,
)
from shardserve_sharding.models import LLAMA_CONFIGS, expected_tensors
from shardserve_sharding.partition import TPGeometry, local_shape, shard_spec
from shardserve_sharding.split_table import split_kind

RATE = 1e9  # FLOP/s at every row count and thread count
COSTS = {
    "schema": plan_costs.SCHEMA, "device": "test machine", "host_threads": 0,
    "memory_per_device_gib": 1.0,
    "gemm_flops": {"fp32": {"1": {"1": RATE, "128": RATE}},
                   "bf16": {"1": {"1": RATE, "128": RATE}}},
    "mem_bw": {"1": 1e15}, "allreduce_latency_s": 1e-4, "allreduce_bw": 1e15,
    "overhead": {"torch": {"fixed_s": 1e-3, "per_row_s": 0.0},
                 "onnx": {"fixed_s": 5e-4, "per_row_s": 0.0}},
    "source": "hand-made for tests",
}


@pytest.fixture
def costs_file(tmp_path):
    p = tmp_path / "costs.json"
    p.write_text(json.dumps(COSTS))
    return p


def test_footprint_matches_the_real_shards():
    """Per-rank elements equal the sum of the slices partition.shard_spec gives each rank."""
    cfg = LLAMA_CONFIGS["smollm2-135m"]
    fp = footprint("llama", cfg, 3, 1)
    geo = TPGeometry.of("llama", cfg)
    per_rank = [0, 0, 0]
    for name, shape in expected_tensors("llama", cfg):
        for r in range(3):
            per_rank[r] += math.prod(local_shape(shape, shard_spec(
                split_kind("llama", name), shape, geo, 3, r)))
    assert fp.stages[0].weight_elems == max(per_rank)
    full = footprint("llama", cfg, 1, 1)
    assert full.params == full.stages[0].weight_elems == 134_515_008  # SmolLM2-135M, tied
    # 2 rowwise tensors per layer + the vocab-split embedding; logits gathered
    assert fp.stages[0].allreduces == 2 * 30 + 1 and full.stages[0].allreduces == 0
    assert fp.kv_elems_per_token == 2 * 30 * 1 * 64  # 3 KV heads over 3 ranks
    # a tied output is a matmul: the embedding's elements count once more per token
    emb = 49152 * 576
    assert full.stages[0].matmul_elems == full.params - emb - 576 * 61 + emb


def test_pipeline_stages_split_the_layers_and_keep_a_tied_output():
    cfg = LLAMA_CONFIGS["smollm2-135m"]
    fp = footprint("llama", cfg, 1, 2)
    assert [s.n_layers for s in fp.stages] == [15, 15]
    emb = 49152 * 576
    assert fp.stages[0].weight_elems + fp.stages[1].weight_elems == fp.params + emb


def test_invalid_layouts_say_why(costs_file):
    costs = plan_costs.load(costs_file)
    model = resolve_model("smollm2-135m")
    preds = {p.layout.name: p for p in predict(model, costs, 6, Workload(streams=4))}
    assert not preds["torch fp32 tp2 pp1 x1"].valid
    assert "query heads 9 is not divisible by tp 2" in preds["torch fp32 tp2 pp1 x1"].why
    assert preds["torch fp32 tp1 pp1 x1"].valid  # 0.5 GiB of weights fit 90% of 1 GiB
    assert preds["torch bf16 tp1 pp1 x1"].valid
    assert preds["torch fp32 tp3 pp1 x1"].valid
    assert "ONNX backend" in preds["onnx fp32 tp3 pp1 x1"].why
    assert "pp=1" in preds["torch bf16 tp1 pp2 x1"].why  # valid, planned for reference only
    big = predict(model, costs, 2, Workload(streams=4, memory_per_device_gib=0.2))
    fp32 = next(p for p in big if p.layout.name == "torch fp32 tp1 pp1 x1")
    assert not fp32.valid and "weights 0.5 GiB per rank exceed 90% of 0 GiB" in fp32.why
    kv = predict(model, costs, 1, Workload(streams=4, kv_tokens=100))
    assert all("KV room for 100 tokens" in p.why for p in kv if p.layout.devices == 1
               and p.layout.pp == 1 and p.layout.backend == "torch")


def test_step_arithmetic_on_a_stored_costs_file(costs_file):
    """With a flat GEMM rate and free memory and bus, a decode step is exactly
    2 * matmul elements * rows / rate + attention FLOPs / rate + collectives + overhead."""
    costs = plan_costs.load(costs_file)
    model = resolve_model("tiny")
    cfg = LLAMA_CONFIGS["tiny"]
    work = Workload(streams=2, prompt_tokens=10, new_tokens=4, in_phase=True)
    lay1, lay2 = LayoutChoice("torch", "fp32", 1, 1, 1), LayoutChoice("torch", "fp32", 2, 1, 1)
    p1, p2 = predict(model, costs, 2, work, [lay1, lay2])
    fp1 = footprint("llama", cfg, 1, 1)
    ctx = 10 + 4 / 2
    attn = 4 * cfg.n_heads * cfg.head_dim * 2 * ctx * cfg.n_layers
    dec1 = (2 * fp1.stages[0].matmul_elems * 2 + attn) / RATE + 1e-3
    assert p1.itl_ms == pytest.approx(dec1 * 1e3, rel=1e-6)
    # TP 2: half the GEMMs and heads, plus 2 * layers + 1 all-reduces, a logits gather and
    # the plan's 2 broadcasts
    fp2 = footprint("llama", cfg, 2, 1)
    comm = (2 * cfg.n_layers + 1 + 1 + 2) * 1e-4
    dec2 = (2 * fp2.stages[0].matmul_elems * 2 + attn / 2) / RATE + comm + 1e-3
    assert p2.itl_ms == pytest.approx(dec2 * 1e3, rel=1e-6)
    assert p2.comm_share == pytest.approx(comm / dec2, rel=1e-6)
    # 2 streams in phase: replayed step by step on this step arithmetic (closed_loop.py);
    # the second request waits for the first one's prompt step (the old model prefilled both
    # prompts in one step: TTFT = that step)
    head = fp1.stages[0].head_elems
    assert head == cfg.vocab_size * cfg.dim
    pre1 = (2 * (fp1.stages[0].matmul_elems - head) * 20 + 2 * head * 2
            + 4 * cfg.n_heads * cfg.head_dim * 20 * 5 * cfg.n_layers) / RATE + 1e-3
    loop = _loop(fp1, cfg, work, 0.0)
    assert p1.ttft_ms == pytest.approx(loop.ttft_p50_s * 1e3, rel=1e-6)
    assert p1.tok_s == pytest.approx(loop.tok_s, rel=1e-6)
    assert p1.ttft_ms != pytest.approx(pre1 * 1e3, rel=0.05)  # the old all-together value


def _loop(fp, cfg, work, front_s, flat=True, overhead=1e-3):
    """closed_loop.simulate on this file's own step arithmetic (_step)."""
    return closed_loop.simulate(
        lambda tokens, rows, ctx, sampled: _step(fp, cfg, tokens, round(ctx), sampled,
                                                 overhead),
        streams=work.streams, prompt=work.prompt_tokens, new=work.new_tokens,
        max_prefill_tokens=work.max_prefill_tokens, front_s=front_s, flat=flat)


def _step(fp, cfg, tokens, ctx, sampled, overhead=1e-3):
    """A step on the flat-rate COSTS: GEMMs (the output projection on the sampled rows),
    attention FLOPs, the backend's overhead (torch 1 ms)."""
    st = fp.stages[0]
    return (2 * (st.matmul_elems - st.head_elems) * tokens + 2 * st.head_elems * sampled
            + 4 * cfg.n_heads * cfg.head_dim * tokens * ctx * cfg.n_layers) / RATE + overhead


def test_in_phase_onnx_steps_are_a_prefill_then_a_decode_forward(costs_file):
    """The ONNX runner has no flat batches: the replay runs a prefill forward (its first
    tokens out at once) and a decode forward per step, not one flat forward."""
    c = plan_costs.load(costs_file)
    cfg = LLAMA_CONFIGS["tiny"]
    fp = footprint("llama", cfg, 1, 1)
    work = Workload(streams=4, prompt_tokens=10, new_tokens=4, in_phase=True)
    (pred,) = predict(resolve_model("tiny"), c, 1, work, [LayoutChoice("onnx", "fp32", 1, 1,
                                                                       1)])
    loop = _loop(fp, cfg, work, 0.0, flat=False, overhead=5e-4)
    assert pred.ttft_ms == pytest.approx(loop.ttft_p50_s * 1e3, rel=1e-6)
    assert pred.tok_s == pytest.approx(loop.tok_s, rel=1e-6)
    flat = _loop(fp, cfg, work, 0.0, flat=True, overhead=5e-4)
    assert pred.tok_s != pytest.approx(flat.tok_s, rel=1e-3)


def test_in_phase_streams_on_one_replica_are_replayed_with_the_front_end_share(tmp_path):
    """4 streams of 10-token prompts with 15 prompt tokens per step, in phase: the plan's TTFT
    and tok/s are closed_loop's replay (the first request alone, the rest chunked a step
    later: tests/server/test_plan_closed_loop.py) on the step arithmetic, each request
    reaching the leader the front end's first_token_s after it is sent."""
    d = {**COSTS, "overhead": {"torch": {"fixed_s": 1e-3, "per_row_s": 0.0,
                                         "first_token_s": 0.02}}}
    p = tmp_path / "costs.json"
    p.write_text(json.dumps(d))
    c = plan_costs.load(p)
    cfg = LLAMA_CONFIGS["tiny"]
    fp = footprint("llama", cfg, 1, 1)
    work = Workload(streams=4, prompt_tokens=10, new_tokens=4, max_prefill_tokens=15,
                    in_phase=True)
    (pred,) = predict(resolve_model("tiny"), c, 1, work, [LayoutChoice("torch", "fp32", 1, 1,
                                                                       1)])
    loop = _loop(fp, cfg, work, 0.02)
    assert pred.ttft_ms == pytest.approx(loop.ttft_p50_s * 1e3, rel=1e-6)
    assert pred.tok_s == pytest.approx(loop.tok_s, rel=1e-6)
    assert pred.ttft_ms > _loop(fp, cfg, work, 0.0).ttft_p50_s * 1e3 + 19
    dec = _step(fp, cfg, 4, 10 + 4 / 2, 4)  # the ITL: the 4-row decode step
    assert pred.itl_ms == pytest.approx(dec * 1e3, rel=1e-6)


def test_requests_over_replicas_arrive_alone(tmp_path):
    """Over 2 replicas the balancer splits requests that finished together: each is prefilled
    in a flat step with the other row's decode. In phase (closed-loop streams, sent at a step
    boundary) it waits for the whole step its replica has just begun, less the front end's
    share (the old model: half a step); arriving at random (the default), half a step."""
    d = {**COSTS, "overhead": {"torch": {"fixed_s": 1e-3, "per_row_s": 0.0,
                                         "first_token_s": 2e-4}}}
    p = tmp_path / "costs.json"
    p.write_text(json.dumps(d))
    c = plan_costs.load(p)
    cfg = LLAMA_CONFIGS["tiny"]
    fp = footprint("llama", cfg, 1, 1)
    work = Workload(streams=4, prompt_tokens=10, new_tokens=4, in_phase=True)
    (pred,) = predict(resolve_model("tiny"), c, 2, work, [LayoutChoice("torch", "fp32", 1, 1,
                                                                       2)])

    dec = _step(fp, cfg, 2, 10 + 4 / 2, 2)
    pre = _step(fp, cfg, 11, (10 * 5 + 12) / 11, 2)  # the prompt, the other row's decode
    assert pred.itl_ms == pytest.approx(dec * 1e3, rel=1e-6)
    assert pred.ttft_ms == pytest.approx((2e-4 + pre + dec - 2e-4) * 1e3, rel=1e-6)
    assert pred.tok_s == pytest.approx(2 * 2 * 4 / (2 * pre + 2 * dec), rel=1e-6)
    # the same requests arriving at random (the default): half the step in flight
    (rand,) = predict(resolve_model("tiny"), c, 2, Workload(streams=4, prompt_tokens=10,
                                                             new_tokens=4),
                      [LayoutChoice("torch", "fp32", 1, 1, 2)])
    assert rand.ttft_ms == pytest.approx((2e-4 + pre + dec / 2) * 1e3, rel=1e-6)
    # one replica by default: the same per replica
    (one,) = predict(resolve_model("tiny"), c, 1, Workload(streams=2, prompt_tokens=10,
                                                            new_tokens=4),
                     [LayoutChoice("torch", "fp32", 1, 1, 1)])
    assert one.ttft_ms == pytest.approx(rand.ttft_ms) and one.tok_s == pytest.approx(
        rand.tok_s / 2)


def test_oversubscribed_tp_uses_the_measured_collective_cost(tmp_path):
    """With more ranks than cores a TP step pays the layer loop's per-collective cost at that
    rank count (and the largest measured count's beyond it), not the 2-process latency."""
    d = {**COSTS, "host_threads": 2, "tp_collective_s": {"2": 2e-4, "3": 4e-3}}
    p = tmp_path / "costs.json"
    p.write_text(json.dumps(d))
    c = plan_costs.load(p)
    base = plan_costs.from_dict({**COSTS, "host_threads": 2})
    assert c.collective_latency_s(1) == 0.0
    assert c.collective_latency_s(2) == 2e-4 and c.collective_latency_s(3) == 4e-3
    assert c.collective_latency_s(9) == 4e-3  # past the largest measured count
    assert base.collective_latency_s(3) == 1e-4  # nothing measured: the latency
    lay = LayoutChoice("torch", "fp32", 3, 1, 1)
    model = resolve_model("smollm2-135m")
    (slow,) = predict(model, c, 3, Workload(streams=1), [lay])
    (fast,) = predict(model, base, 3, Workload(streams=1), [lay])
    collectives = 2 * 30 + 1 + 1 + 2  # layers' all-reduces, embedding, logits, plan
    assert slow.itl_ms - fast.itl_ms == pytest.approx(collectives * (4e-3 - 1e-4) * 1e3,
                                                      rel=1e-6)
    assert "oversubscribed TP: 4.0 ms per collective (measured)" in slow.why


def test_overhead_per_dtype_falls_back_to_the_backend_default(tmp_path):
    d = {**COSTS, "dtype_overhead": {"torch": {"bf16": {"fixed_s": 5e-3, "per_row_s": 0.0,
                                                        "first_token_s": 0.01}}}}
    p = tmp_path / "costs.json"
    p.write_text(json.dumps(d))
    c = plan_costs.load(p)
    assert c.step_overhead("torch", "bf16").fixed_s == 5e-3
    assert c.step_overhead("torch", "fp32") == c.overhead["torch"]
    assert c.step_overhead("onnx", "fp32") == c.overhead["onnx"]
    lays = [LayoutChoice("torch", "bf16", 1, 1, 1), LayoutChoice("torch", "fp32", 1, 1, 1)]
    bf16, fp32 = predict(resolve_model("tiny"), c, 1, Workload(streams=1), lays)
    assert bf16.itl_ms - fp32.itl_ms == pytest.approx(4.0, rel=1e-6)  # equal GEMM rates


def test_recommendation_follows_the_targets(costs_file):
    costs = plan_costs.load(costs_file)
    model = resolve_model("tiny")
    preds = predict(model, costs, 4, Workload(streams=8))
    best, why = recommend(preds, Workload(streams=8))
    assert best is not None and best.valid and best.layout.pp == 1
    assert best.tok_s == max(p.tok_s for p in preds if p.valid and p.layout.pp == 1)
    assert "highest predicted aggregate tok/s" in why
    tight = Workload(streams=8, target_itl_ms=1e-6)
    best, why = recommend(predict(model, costs, 4, tight), tight)
    assert "no layout meets ITL <= 1e-06 ms" in why


def test_cli_json_shape(costs_file, capsys):
    assert main(["plan", "--model", "smollm2-135m", "--devices", "3", "--costs",
                 str(costs_file), "--streams", "4", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d) == {"model", "devices", "workload", "costs", "layouts", "recommended"}
    assert d["devices"] == 3 and d["model"] == {"name": "smollm2-135m", "family": "llama"}
    keys = {"layout", "backend", "dtype", "tp", "pp", "replicas", "valid", "why",
            "weight_gib_per_rank", "kv_capacity_tokens", "ttft_ms", "itl_ms", "tok_s",
            "comm_share", "meets_targets"}
    assert all(set(row) == keys for row in d["layouts"])
    assert {row["layout"] for row in d["layouts"] if not row["valid"]} >= {
        "torch fp32 tp2 pp1 x1"}
    assert d["recommended"]["valid"] and d["recommended"]["reason"]


def test_cli_table(costs_file, capsys):
    assert main(["plan", "--model", "tiny", "--devices", "2", "--costs", str(costs_file),
                 "--target-ttft-ms", "1000"]) == 0
    out = capsys.readouterr().out
    assert "invalid layouts:" in out and "recommended: " in out and "\n*" in out


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON (line 1): damaged costs file"),
    (json.dumps({**COSTS, "allreduce_bw": -1}), "allreduce_bw must be a positive number"),
    (json.dumps({**COSTS, "schema": "x"}), "schema is 'x'"),
    (json.dumps({**COSTS, "gemm_flops": {"fp32": {"1": {"one": 1e9}}}}), "key 'one' is not"),
    (json.dumps({**COSTS, "tp_collective_s": {"1": 1e-3}}), "tp_collective_s key '1' must be"),
    (json.dumps({**COSTS, "tp_collective_s": {"3": -1}}),
     "tp_collective_s[3] must be a non-negative"),
    (json.dumps({**COSTS, "overhead": {"torch": {"fixed_s": 0, "per_row_s": 0,
                                                 "first_token_s": "x"}}}),
     "first_token_s must be a non-negative number"),
    (json.dumps({**COSTS, "dtype_overhead": {"torch": 1}}), "dtype_overhead must be a table"),
    (json.dumps({**COSTS, "nongemm_s": {"bf16": {"1": {"1": -1}}}}),
     "nongemm_s[bf16][1][1] must be a positive number"),
    (json.dumps({**COSTS, "attn_token_s": {"onnx": {"fp32": {"1": 0}}}}),
     "attn_token_s[onnx][fp32][1] must be a positive number"),
    (json.dumps({**COSTS, "attn_token_s": {"onnx": 3}}), "attn_token_s must be a table"),
    (json.dumps({**COSTS, "gemm_includes_memory": 1}),
     "gemm_includes_memory must be true or false"),
])
def test_damaged_costs_file_is_one_line_exit_2(tmp_path, capsys, content, message):
    p = tmp_path / "costs.json"
    p.write_text(content)
    assert main(["plan", "--model", "tiny", "--costs", str(p)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_costs_file_and_bad_flags(tmp_path, costs_file, capsys):
    assert main(["plan", "--model", "tiny", "--costs", str(tmp_path / "none.json")]) == 2
    assert "run `shardserve plan --measure` first" in capsys.readouterr().err
    assert main(["plan", "--model", "tiny", "--costs", str(costs_file), "--devices", "0"]) == 2
    assert "--devices must be >= 1" in capsys.readouterr().err
    assert main(["plan", "--model", "nonesuch", "--costs", str(costs_file)]) == 2
    assert "neither a checkpoint directory" in capsys.readouterr().err


def test_costs_round_trip(tmp_path, costs_file):
    c = plan_costs.load(costs_file)
    c.save(tmp_path / "again.json")
    assert plan_costs.load(tmp_path / "again.json") == c
    assert c.allreduce_s(0, 1) == 0.0 and c.allreduce_s(0, 2) == pytest.approx(1e-4)


def test_a_backend_with_its_own_gemm_table_uses_it(tmp_path):
    """ONNX Runtime's measured GEMM rates (its own kernels and thread pool) drive the ONNX
    layouts; torch layouts keep torch's; rates interpolate log-linearly in rows."""
    d = {**COSTS, "backend_gemm_flops": {"onnx": {"fp32": {"1": {"1": 4e9, "100": 4e11}}}}}
    p = tmp_path / "costs.json"
    p.write_text(json.dumps(d))
    c = plan_costs.load(p)
    assert c.gemm_rate("fp32", 10, 1, "onnx") == pytest.approx(4e10)
    assert c.gemm_rate("fp32", 10, 0.5, "onnx") == pytest.approx(2e10)  # half a core
    assert c.gemm_rate("fp32", 10, 1, "torch") == pytest.approx(RATE)
    model = resolve_model("tiny")
    lays = [LayoutChoice("onnx", "fp32", 1, 1, 1), LayoutChoice("torch", "fp32", 1, 1, 1)]
    onnx, torch_ = predict(model, c, 1, Workload(streams=1), lays)
    assert onnx.itl_ms < torch_.itl_ms


def test_layer_loop_shapes_are_the_split_tables_per_rank_gemms():
    """The TP layer loop multiplies exactly one rank's share of every matmul weight."""
    from shardserve_server.plan.measure import _rank_shapes

    cfg = LLAMA_CONFIGS["smollm2-135m"]
    fp = footprint("llama", cfg, 3, 1)
    layer = _rank_shapes(cfg, 3)
    head = -(-cfg.vocab_size // 3) * cfg.dim
    assert cfg.n_layers * sum(o * i for o, i, _ in layer) + head == fp.stages[0].matmul_elems
    assert sum(reduce for _, _, reduce in layer) * cfg.n_layers + 1 == fp.stages[0].allreduces


def test_layer_loop_runs_in_a_real_gloo_group():
    """Two worker-like rank processes (real gloo group) report a per-collective cost."""
    from shardserve_server.plan.measure import measure_tp_collectives

    got = measure_tp_collectives(LLAMA_CONFIGS["tiny"], (2,), cores=2, steps=2)
    assert set(got) == {2} and 0.0 <= got[2] < 1.0


def test_the_forward_outside_the_gemms_counts_for_torch_layouts(tmp_path):
    """nongemm_s: linear in tokens through the measured points (and past them), the largest
    measured thread count not above the rank's, a time share below one thread; torch only."""
    d = {**COSTS, "nongemm_s": {"bf16": {"1": {"1": 0.010, "101": 0.030}}}}
    p = tmp_path / "costs.json"
    p.write_text(json.dumps(d))
    c = plan_costs.load(p)
    assert c.nongemm("bf16", 1, 1) == pytest.approx(0.010)
    assert c.nongemm("bf16", 51, 1) == pytest.approx(0.020)
    assert c.nongemm("bf16", 201, 1) == pytest.approx(0.050)
    assert c.nongemm("bf16", 1, 0.5) == pytest.approx(0.020)  # half a core
    assert c.nongemm("bf16", 1, 2) == pytest.approx(0.010)
    assert c.nongemm("fp32", 1, 1) == 0.0
    lays = [LayoutChoice("torch", "bf16", 1, 1, 1), LayoutChoice("torch", "fp32", 1, 1, 1)]
    bf16, fp32 = predict(resolve_model("tiny"), c, 1, Workload(streams=1), lays)
    assert bf16.itl_ms - fp32.itl_ms == pytest.approx(10.0, rel=1e-6)


def test_nongemm_measurement_restores_the_gemms():
    """measure_nongemm times the model's real forward less the time inside its GEMMs (timed
    in place), then puts Linear.forward back (a costs file would otherwise be made with a
    model that keeps timing itself)."""
    from shardserve_server.plan.measure import NONGEMM_TOKENS, measure_nongemm
    from shardserve_sharding.models.llama import Linear

    forward = Linear.forward
    got = measure_nongemm(LLAMA_CONFIGS["tiny"], ("fp32",), (1,), rounds=1)
    assert Linear.forward is forward
    assert set(got["fp32"][1]) == set(NONGEMM_TOKENS) and all(
        v > 0 for v in got["fp32"][1].values())


def test_gemm_timing_reads_a_whole_steps_weights(monkeypatch):
    """measure_gemm cycles through as many weight bytes per pass as a real decode step reads
    (every layer's GEMMs and the output projection: the footprint's GEMM elements), so the
    caches keep no more than in a real step; the 96 MiB set used before stayed in a 300 MiB
    L3 and gave 2-thread rates ~2x a real step's. Small decode batches (2, 4 rows) are timed,
    not interpolated between 1 and 8 rows."""
    from shardserve_server.plan import measure
    from shardserve_sharding.models.llama import Linear

    cfg = LLAMA_CONFIGS["tiny"]
    step_elems = footprint("llama", cfg, 1, 1).stages[0].matmul_elems
    assert measure.model_weight_elems(cfg) == step_elems
    monkeypatch.setattr(measure, "WEIGHT_BYTES_COLD", 0)  # the model's own bytes decide
    seen: list[int] = []
    forward = Linear.forward

    def counting(self, x):
        seen.append(self.weight.numel())
        return forward(self, x)

    monkeypatch.setattr(Linear, "forward", counting)
    got = measure.measure_gemm(cfg, ("fp32",), (1,), rounds=1)
    passes = 2 * len(measure.ROWS)  # the warm-up round and one timed round, each row count
    assert sum(seen) / passes >= step_elems
    assert {1, 2, 4, 8} <= set(got["fp32"][1]) == set(measure.ROWS)
    # SmolLM2: the whole model per pass in either dtype (was 113 MB of its 538 MB in fp32)
    smol = LLAMA_CONFIGS["smollm2-135m"]
    layer = sum(o * i for o, i in measure._layer_shapes(smol))
    for elem_bytes in (4, 2):
        assert measure.cold_copies(smol, elem_bytes) * layer >= measure.model_weight_elems(smol)
    # a model far past the caches: twice the last-level cache of it, not all of it
    big = dataclasses.replace(smol, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                              intermediate_size=14336, vocab_size=128256)  # Llama-3-8B
    monkeypatch.setattr(measure, "llc_bytes", lambda: 300 * 2**20)
    big_layer = sum(o * i for o, i in measure._layer_shapes(big)) * 4
    assert measure.cold_copies(big, 4) == max(2, -(-600 * 2**20 // big_layer))


def test_bandwidth_buffer_is_past_the_last_level_cache(tmp_path, monkeypatch):
    """The bandwidth buffer is twice the largest cache sysfs reports (at least 512 MiB): the
    256 MiB buffer used before fit this machine's 300 MiB L3 (60 GB/s: a cache rate)."""
    from shardserve_server.plan import measure

    for i, size in enumerate(("48K", "2048K", "300M", "junk")):
        (tmp_path / f"index{i}").mkdir()
        (tmp_path / f"index{i}" / "size").write_text(size + "\n")
    assert measure.llc_bytes(tmp_path) == 300 * 2**20
    assert measure.llc_bytes(tmp_path / "absent") == 0
    monkeypatch.setattr(measure, "llc_bytes", lambda: 300 * 2**20)
    assert measure.bandwidth_bytes() == 600 * 2**20
    monkeypatch.setattr(measure, "llc_bytes", lambda: 0)
    assert measure.bandwidth_bytes() == measure.BANDWIDTH_MIN_BYTES == 512 * 2**20


def test_measured_attention_per_row_and_cached_token_replaces_the_bytes(tmp_path):
    """attn_token_s (ONNX: its graph gathers each row's keys and values out of the pool, then
    attends; ~4x what their bytes over the bandwidth say): a decode step's attention is
    rows x context x layers x that, instead of the bytes term; other backends keep theirs;
    threads: the largest measured count not above the rank's, a time share below."""
    slow_bw = {**COSTS, "mem_bw": {"1": 1e9}}
    d = {**slow_bw, "attn_token_s": {"onnx": {"fp32": {"1": 1e-6, "2": 5e-7}}}}
    paths = []
    for i, costs in enumerate((slow_bw, d)):
        paths.append(tmp_path / f"costs{i}.json")
        paths[-1].write_text(json.dumps(costs))
    old, new = (plan_costs.load(p) for p in paths)
    assert new.attention_token_s("onnx", "fp32", 1) == pytest.approx(1e-6)
    assert new.attention_token_s("onnx", "fp32", 3) == pytest.approx(5e-7)
    assert new.attention_token_s("onnx", "fp32", 0.5) == pytest.approx(2e-6)  # half a core
    assert new.attention_token_s("torch", "fp32", 1) is None
    assert new == plan_costs.from_dict(new.to_dict())  # stored and read back
    cfg = LLAMA_CONFIGS["tiny"]
    fp = footprint("llama", cfg, 1, 1)
    work = Workload(streams=3, prompt_tokens=100, new_tokens=64)
    lays = [LayoutChoice("onnx", "fp32", 1, 1, 1), LayoutChoice("torch", "fp32", 1, 1, 1)]
    (o_old, t_old), (o_new, t_new) = (predict(resolve_model("tiny"), c, 1, work, lays)
                                      for c in (old, new))
    rows, ctx = 3, 100 + 64 / 2
    kv_bytes = rows * ctx * fp.kv_elems_per_token * 4 / 1e9
    measured = rows * ctx * cfg.n_layers * 1e-6
    assert o_new.itl_ms - o_old.itl_ms == pytest.approx((measured - kv_bytes) * 1e3, rel=1e-6)
    assert t_new.itl_ms == pytest.approx(t_old.itl_ms, rel=1e-9)


def test_onnx_attention_is_measured_on_the_exported_step_graph(tmp_path):
    """measure_onnx_attention runs the real export through OnnxStepRuntime (the server's ONNX
    path) at two contexts: a positive cost per row, cached token and layer per thread count."""
    from shardserve_server.plan.measure import measure_onnx_attention

    got = measure_onnx_attention(LLAMA_CONFIGS["tiny"], (1,), tmp_path, rounds=1)
    assert set(got) == {1} and 0 < got[1] < 1e-3


def test_gemm_rates_timed_over_a_steps_bytes_get_no_bandwidth_floor(tmp_path):
    """Rates measured over a real step's weight bytes (gemm_includes_memory: what `plan
    --measure` writes now) already hold the weights' streaming: the step is FLOPs / rate even
    where bytes / bandwidth is larger (a one-thread buffer sum streams slower than a GEMV).
    Without the flag (older files, published figures) the bandwidth floor stays."""
    slow = {**COSTS, "mem_bw": {"1": 1e6}}  # bytes / bandwidth dominates everything
    paths = []
    for i, flag in enumerate((False, True)):
        paths.append(tmp_path / f"costs{i}.json")
        paths[-1].write_text(json.dumps({**slow, "gemm_includes_memory": flag}))
    floored, measured = (plan_costs.load(p) for p in paths)
    assert measured.gemm_includes_memory and not floored.gemm_includes_memory
    assert measured == plan_costs.from_dict(measured.to_dict())
    cfg = LLAMA_CONFIGS["tiny"]
    fp = footprint("llama", cfg, 1, 1)
    work = Workload(streams=1, prompt_tokens=10, new_tokens=4)
    lay = [LayoutChoice("torch", "fp32", 1, 1, 1)]
    (old,), (new,) = (predict(resolve_model("tiny"), c, 1, work, lay) for c in (floored, measured))
    st = fp.stages[0]
    ctx = 10 + 4 / 2
    kv = ctx * fp.kv_elems_per_token * 4 / 1e6
    flops = (2 * st.matmul_elems + 4 * cfg.n_heads * cfg.head_dim * ctx * cfg.n_layers) / RATE
    assert new.itl_ms == pytest.approx((flops + kv + 1e-3) * 1e3, rel=1e-6)
    assert old.itl_ms >= st.matmul_elems * 4 / 1e6 * 1e3  # the weights' bytes at 1 MB/s


def test_gemm_passes_are_timed_in_the_steady_state(monkeypatch):
    """measure_gemm times the last of consecutive passes of one shape (a server's run of
    decode steps: a model that fits the last-level cache keeps more of it there pass after
    pass): at least 2 passes, at most STEADY_PASSES, none started after STEADY_SECONDS."""
    from shardserve_server.plan import measure

    calls: list[int] = []

    class Lin:
        in_features = 3

        def __call__(self, x):
            calls.append(x.shape[0])
            return x

    x = {3: torch.zeros(2, 3)}
    monkeypatch.setattr(measure, "STEADY_SECONDS", 0.0)
    assert measure._steady_pass([Lin(), Lin()], x, measure.STEADY_PASSES) >= 0
    assert len(calls) == 2 * 2  # two passes of two layers: the budget was spent
    calls.clear()
    monkeypatch.setattr(measure, "STEADY_SECONDS", 60.0)
    measure._steady_pass([Lin(), Lin()], x, measure.STEADY_PASSES)
    assert len(calls) == 2 * measure.STEADY_PASSES
    calls.clear()
    measure._steady_pass([Lin()], x, 1)  # steady_state=False and the warm-up round
    assert len(calls) == 1


def test_replicas_stepping_at_once_share_the_hosts_memory(tmp_path):
    """Replicas on one host (host_threads > 0) that step at once each stream their own weights
    through one memory system: each one's decode step takes at least all their weight bytes
    over the host's bandwidth. One stream keeps one replica busy: no floor."""
    bw = 1e6  # bytes / s: the floor dominates FLOPs / rate
    d = {**COSTS, "host_threads": 2, "mem_bw": {"1": bw, "2": bw},
         "gemm_includes_memory": True,
         "gemm_flops": {"fp32": {"1": {"1": RATE, "128": RATE}, "2": {"1": RATE, "128": RATE}}}}
    p = tmp_path / "costs.json"
    p.write_text(json.dumps(d))
    c = plan_costs.load(p)
    cfg = LLAMA_CONFIGS["tiny"]
    st = footprint("llama", cfg, 1, 1).stages[0]
    lay = [LayoutChoice("torch", "fp32", 1, 1, 2)]
    (two,) = predict(resolve_model("tiny"), c, 2, Workload(streams=4, prompt_tokens=10,
                                                            new_tokens=4), lay)
    (one,) = predict(resolve_model("tiny"), c, 2, Workload(streams=1, prompt_tokens=10,
                                                            new_tokens=4), lay)
    floor_ms = 2 * st.matmul_elems * 4 / bw * 1e3
    assert two.itl_ms >= floor_ms
    assert one.itl_ms < floor_ms / 2
