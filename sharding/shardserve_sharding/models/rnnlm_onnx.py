"""The recurrent LM's step graph written node by node (onnx.helper), with the state explicit.

Each layer is ONNX's own LSTM / GRU operator (linear_before_reset=1 for torch's GRU) over the
normed inputs, with `sequence_lens` = the real tokens of each row: rows of a ragged step stop
at their last real token, and Y_h / Y_c are each row's state there. Dynamic batch and step
length; one graph serves prefill, decode and ragged continuous batches.

    inputs   tokens [B, T] int64, state [L, B, W] float (W = 2H: h then c for the LSTM; H for
             the GRU), num_new [B] int64, logits_index [B] int64
    outputs  logits [B, V], new_state [L, B, W]
Weights are stored as ONNX wants them: gate-major in ONNX's gate order (LSTM i, o, f, c; GRU
z, r, h), converted from the model's unit-major rows (rnnlm.torch_gate_layout).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .rnnlm import torch_gate_layout

# torch gate order -> ONNX gate order (indices into torch's gates)
_ONNX_ORDER = {"lstm": [0, 3, 1, 2], "gru": [1, 0, 2]}


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())


def _onnx_gates(w: torch.Tensor, cell: str) -> torch.Tensor:
    """Model rows (unit-major) -> ONNX's gate-major rows in ONNX's gate order."""
    g = len(_ONNX_ORDER[cell])
    tw = torch_gate_layout(w, g)  # [G*H, ...] torch order
    return torch.cat([tw.chunk(g, dim=0)[i] for i in _ONNX_ORDER[cell]], dim=0)


def build_rnnlm_graph(model: Any, opset: int = 17) -> Any:
    """Return an onnx.ModelProto of `model`'s step (a plain, uncut model; weights embedded)."""
    from onnx import TensorProto, helper, numpy_helper

    cfg = model.config
    hidden, cell = cfg.hidden, cfg.cell
    lstm = cell == "lstm"
    nodes: list[Any] = []
    inits: list[Any] = []

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr, name))
        return name

    def node(op: str, ins: list[str], outs: list[str] | str, **attrs) -> str:
        outs = [outs] if isinstance(outs, str) else outs
        nodes.append(helper.make_node(op, ins, outs, **attrs))
        return outs[0]

    def rms_norm(x: str, weight: torch.Tensor, eps: float, name: str) -> str:
        sq = node("Mul", [x, x], f"{name}_sq")
        ms = node("ReduceMean", [sq], f"{name}_ms", axes=[-1], keepdims=1)
        rs = node("Sqrt", [node("Add", [ms, init(f"{name}_eps", np.array(eps, np.float32))],
                               f"{name}_mse")], f"{name}_rs")
        return node("Mul", [node("Div", [x, rs], f"{name}_n"),
                            init(f"{name}_w", _f32(weight))], f"{name}_out")

    emb = init("tok_embeddings", _f32(model.tok_embeddings.weight))
    x = node("Gather", [emb, "tokens"], "x0", axis=0)  # [B, T, dim]
    seq_lens = node("Cast", ["num_new"], "seq_lens", to=TensorProto.INT32)  # [B]
    half = init("state_split", np.array([hidden, hidden], np.int64))
    new_states = []
    for i, blk in enumerate(model.layers):
        p = f"l{i}"
        u = rms_norm(x, blk.norm.weight, blk.norm.eps, f"{p}_norm")  # [B, T, dim]
        xs = node("Transpose", [u], f"{p}_xs", perm=[1, 0, 2])  # [T, B, dim]
        w = init(f"{p}_W", _f32(_onnx_gates(blk.w_ih.weight, cell))[None])  # [1, G*H, dim]
        r = init(f"{p}_R", _f32(_onnx_gates(blk.w_hh.weight, cell))[None])  # [1, G*H, H]
        b = init(f"{p}_B", _f32(torch.cat([_onnx_gates(blk.w_ih.bias, cell),
                                           _onnx_gates(blk.w_hh.bias, cell)]))[None])
        st = node("Gather", ["state", init(f"{p}_idx", np.array([i], np.int64))],
                  f"{p}_st", axis=0)  # [1, B, W]
        if lstm:
            h0, c0 = f"{p}_h0", f"{p}_c0"
            node("Split", [st, half], [h0, c0], axis=2)  # [1, B, H] x2
            outs = [f"{p}_y", f"{p}_yh", f"{p}_yc"]
            node("LSTM", [xs, w, r, b, seq_lens, h0, c0], outs, hidden_size=hidden)
            new_states.append(node("Concat", [f"{p}_yh", f"{p}_yc"], f"{p}_new", axis=2))
        else:
            outs = [f"{p}_y", f"{p}_yh"]
            node("GRU", [xs, w, r, b, seq_lens, st], outs, hidden_size=hidden,
                 linear_before_reset=1)
            new_states.append(f"{p}_yh")  # [1, B, H]
        y = node("Squeeze", [f"{p}_y", init(f"{p}_ax", np.array([1], np.int64))],
                 f"{p}_ys")  # [T, B, H]
        y = node("Transpose", [y], f"{p}_yb", perm=[1, 0, 2])  # [B, T, H]
        proj = init(f"{p}_proj", _f32(blk.proj.weight.t()))  # [H, dim]
        x = node("Add", [x, node("MatMul", [y, proj], f"{p}_o")], f"{p}_x")  # [B, T, dim]
    idx = node("Unsqueeze", ["logits_index", init("ax1", np.array([1], np.int64))],
               "li")  # [B, 1]
    last = node("GatherND", [x, idx], "last", batch_dims=1)  # [B, dim]
    last = rms_norm(last, model.norm.weight, model.norm.eps, "final_norm")
    head = emb if cfg.tie_embeddings else init("output", _f32(model.output.weight))
    node("Gemm", [last, head], "logits", transB=1)  # [B, V]
    node("Concat", new_states, "new_state", axis=0)  # [L, B, W]

    width = 2 * hidden if lstm else hidden
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    graph = helper.make_graph(
        nodes, "rnnlm_step",
        [helper.make_tensor_value_info("tokens", i64, ["batch", "step"]),
         helper.make_tensor_value_info("state", f32, [len(model.layers), "batch", width]),
         helper.make_tensor_value_info("num_new", i64, ["batch"]),
         helper.make_tensor_value_info("logits_index", i64, ["batch"])],
        [helper.make_tensor_value_info("logits", f32, ["batch", cfg.vocab_size]),
         helper.make_tensor_value_info("new_state", f32, [len(model.layers), "batch", width])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             producer_name="shardserve")


def export_rnnlm(model: Any, path: Path, opset: int) -> int:
    """Write path (+ path.data, the weights); a tied embedding is one initializer."""
    import onnx

    onnx.save_model(build_rnnlm_graph(model, opset), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=path.name + ".data",
                    size_threshold=1024)
    return 0
