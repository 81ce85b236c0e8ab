"""The Llama step graph written node by node (onnx.helper): a short graph ORT runs fast.

A TorchScript export of the same step (step graph 1, before this module) left ~7,200 nodes
for SmolLM2, most of them shape arithmetic (Shape, Gather, Unsqueeze, Slice, Concat) that
cost ~20 ms per decode step, more than the model's GEMVs at batch 1. Written by hand, a
layer is 18 nodes: ORT's fused kernels for RMSNorm with the residual add
(SkipSimplifiedLayerNormalization) and rotary embeddings (RotaryEmbedding), the ONNX
Attention op (opset 23, grouped KV heads), and no node that computes a shape at run time.
Dynamic batch, step length and cached length are kept: one graph serves prefill, decode and
ragged continuous batches.

    inputs   tokens [B, T] int64, positions [B, T] int64,
             read_slots [B, S] int64 (pool rows this step reads), attn_bias [B, 1, T, S + T]
             float (0 where a query may look, -1e30 where not), logits_index [B, 1] int64,
             k_cache_<l>, v_cache_<l> [N, Hkv * D] for each layer l (views of the block
             pool, bound once, never copied)
    outputs  logits [B, V], k_new, v_new [L * B, T, Hkv * D] (every layer's new keys/values,
             layer-major: one Concat each, no reshape node; the host views them [L, B, T, .])
The graph only reads the pool; the host writes the new keys/values into it (runtime.py).
Weights are stored transposed ([in, out]) for MatMul; a tied embedding is stored once (the
head is a Gemm over it with transB).

Where a batch-1 step goes (SmolLM2, 2 AVX2 cores, measured 2026-11-29): a graph of only
MatMuls with the same weight bytes per layer plus the head Gemm takes ~16.5 ms (~32 GB/s;
llama.cpp's whole token is ~18.6 ms); the paged attention path (Gather of past K/V, Concat,
Attention) ~1-3.4 ms, growing with the cached length; ORT's overhead ~1.7 us per node.
ORT's GroupQueryAttention with an in-place cache does rotary + append + attention for 30
layers in 0.58 ms at 64 cached tokens and 1.31 ms at 200 (this graph's Gather/Concat/Attention
alone: 0.76 and 3.6 ms), but only over a dense [slots, Hkv, max_len, D] cache: no block
tables, so no prefix sharing and not the paged KV budget the torch workers account by.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

OPSET = 23  # the lowest opset with Attention (grouped KV heads) and RotaryEmbedding
GRAPH_VERSION = 3  # recorded in onnx_model.json; 1 was the TorchScript export
MS = "com.microsoft"
NEG = -1e30  # additive mask value: finite, so a fully masked (padding) row cannot give NaN


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())


def build_llama_graph(model: Any, opset: int = OPSET) -> Any:
    """Return an onnx.ModelProto of `model`'s step (weights embedded; save externalizes)."""
    if opset < OPSET:
        raise ValueError(f"the Llama step graph needs opset >= {OPSET} (Attention with grouped "
                         f"KV heads), got {opset}")
    from onnx import TensorProto, helper, numpy_helper

    cfg = model.config
    attn0 = model.layers[0].attention
    h, hkv, d = attn0.n_heads, attn0.n_kv_heads, attn0.head_dim
    n_layers = len(model.layers)
    nodes: list[Any] = []
    inits: list[Any] = []

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr, name))
        return name

    def node(op: str, ins: list[str], outs: list[str], domain: str = "", **attrs: Any) -> None:
        nodes.append(helper.make_node(op, ins, outs, name=f"{op}_{len(nodes)}", domain=domain,
                                      **attrs))

    i64 = lambda name, vals: init(name, np.array(vals, dtype=np.int64))  # noqa: E731
    emb = init("tok_embeddings", _f32(model.tok_embeddings.weight))  # [V, dim]
    half = d // 2
    cos = init("rope_cos", _f32(model.rope_cos[:, :half]))  # [max_len, D/2]
    sin = init("rope_sin", _f32(model.rope_sin[:, :half]))
    split_qkv = i64("split_qkv", [h * d, hkv * d, hkv * d])
    ffn_dim = model.layers[0].feed_forward.w2.weight.shape[1]
    split_ffn = i64("split_ffn", [ffn_dim, ffn_dim])

    node("Gather", [emb, "tokens"], ["x0"], axis=0)  # [B, T, dim]
    resid = "x0"
    pending = None  # output of the previous block, still to be added to resid
    for i, layer in enumerate(model.layers):
        a, ff = layer.attention, layer.feed_forward
        p = f"l{i}_"
        g1 = init(p + "attn_norm", _f32(layer.attention_norm.weight))
        if pending is None:
            node("SimplifiedLayerNormalization", [resid, g1], [p + "y"], axis=-1,
                 epsilon=float(layer.attention_norm.eps), stash_type=1)
        else:
            node("SkipSimplifiedLayerNormalization", [pending, resid, g1],
                 [p + "y", "", "", p + "r0"], domain=MS, epsilon=float(layer.attention_norm.eps))
            resid = p + "r0"
        wqkv = init(p + "wqkv_t", _f32(a.wqkv.weight).T.copy())  # [dim, (H + 2Hkv) D]
        node("MatMul", [p + "y", wqkv], [p + "qkv"])
        node("Split", [p + "qkv", split_qkv], [p + "q", p + "k", f"v_new_{i}"], axis=-1)
        node("RotaryEmbedding", [p + "q", "positions", cos, sin], [p + "qr"], domain=MS,
             interleaved=0, num_heads=h)  # [B, T, H D]
        node("RotaryEmbedding", [p + "k", "positions", cos, sin], [f"k_new_{i}"], domain=MS,
             interleaved=0, num_heads=hkv)  # [B, T, Hkv D]
        node("Gather", [f"k_cache_{i}", "read_slots"], [p + "kp"], axis=0)  # [B, S, Hkv D]
        node("Gather", [f"v_cache_{i}", "read_slots"], [p + "vp"], axis=0)
        node("Concat", [p + "kp", f"k_new_{i}"], [p + "kall"], axis=1)  # [B, S + T, Hkv D]
        node("Concat", [p + "vp", f"v_new_{i}"], [p + "vall"], axis=1)
        node("Attention", [p + "qr", p + "kall", p + "vall", "attn_bias"], [p + "o"],
             q_num_heads=h, kv_num_heads=hkv)  # [B, T, H D]
        wo = init(p + "wo_t", _f32(a.wo.weight).T.copy())  # [H D, dim]
        node("MatMul", [p + "o", wo], [p + "ao"])
        g2 = init(p + "ffn_norm", _f32(layer.ffn_norm.weight))
        node("SkipSimplifiedLayerNormalization", [p + "ao", resid, g2],
             [p + "y2", "", "", p + "r1"], domain=MS, epsilon=float(layer.ffn_norm.eps))
        resid = p + "r1"
        w13 = init(p + "w13_t", _f32(ff.w13.weight).T.copy())  # [dim, 2 I]
        node("MatMul", [p + "y2", w13], [p + "gu"])
        node("Split", [p + "gu", split_ffn], [p + "gate", p + "up"], axis=-1)
        node("Sigmoid", [p + "gate"], [p + "sg"])
        node("Mul", [p + "gate", p + "sg"], [p + "silu"])
        node("Mul", [p + "silu", p + "up"], [p + "act"])
        w2 = init(p + "w2_t", _f32(ff.w2.weight).T.copy())  # [I, dim]
        node("MatMul", [p + "act", w2], [p + "fo"])
        pending = p + "fo"
    gf = init("final_norm", _f32(model.norm.weight))
    node("GatherND", [pending, "logits_index"], ["last_f"], batch_dims=1)  # [B, dim]
    node("GatherND", [resid, "logits_index"], ["last_r"], batch_dims=1)
    node("SkipSimplifiedLayerNormalization", ["last_f", "last_r", gf], ["last"], domain=MS,
         epsilon=float(model.norm.eps))
    for kind in ("k", "v"):  # [L B, T, Hkv D]
        node("Concat", [f"{kind}_new_{i}" for i in range(n_layers)], [f"{kind}_new"], axis=0)
    if cfg.tie_embeddings:
        node("Gemm", ["last", emb], ["logits"], transB=1)  # [B, V]
    else:
        head = init("output_t", _f32(model.output.weight).T.copy())
        node("MatMul", ["last", head], ["logits"])

    f32, i64t = TensorProto.FLOAT, TensorProto.INT64
    kv = hkv * d
    inputs = [
        helper.make_tensor_value_info("tokens", i64t, ["batch", "step"]),
        helper.make_tensor_value_info("positions", i64t, ["batch", "step"]),
        helper.make_tensor_value_info("read_slots", i64t, ["batch", "past"]),
        helper.make_tensor_value_info("attn_bias", f32, ["batch", 1, "step", "total"]),
        helper.make_tensor_value_info("logits_index", i64t, ["batch", 1]),
    ]
    for i in range(n_layers):  # one input per layer: views of the pool, bound once
        for kind in ("k", "v"):
            inputs.append(helper.make_tensor_value_info(f"{kind}_cache_{i}", f32, ["slots", kv]))
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", cfg.vocab_size])]
    for kind in ("k", "v"):
        outputs.append(helper.make_tensor_value_info(f"{kind}_new", f32,
                                                     ["layers_x_batch", "step", kv]))
    graph = helper.make_graph(nodes, "shardserve_llama_step", inputs, outputs, inits)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
        producer_name="shardserve", ir_version=10)


def attn_bias(cached: np.ndarray, past: int, step: int) -> np.ndarray:
    """Additive mask [B, 1, T, S + T]: row b's query t sees its cached keys (< cached[b]) and
    this step's keys up to itself (causal). Padding queries see at least their own key."""
    bsz = cached.shape[0]
    bias = np.full((bsz, 1, step, past + step), NEG, dtype=np.float32)
    keys = np.arange(past)
    bias[:, 0, :, :past] = np.where(keys[None, None, :] < cached[:, None, None], 0.0, NEG)
    t = np.arange(step)
    bias[:, 0, :, past:] = np.where(t[None, :] <= t[:, None], 0.0, NEG)[None]
    return bias
