"""Run an exported step graph with ONNX Runtime over a paged cache pool held in numpy.

The pools ([L, blocks x block_size, Hkv, D] for K and V, or [L, slots, dim, K-1] conv states)
are allocated once and bound to the session by I/O binding as OrtValues that share the numpy
memory, so a step never copies the cache through the graph: the graph gathers what it reads,
returns only this step's new keys/values (or states), and the host writes those into the pool.
Sessions use a fixed thread count and no spinning, so replicas and torch do not fight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def make_session(path: str | Path, threads: int = 1) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OnnxStepRuntime:
    """One exported model plus its cache pool; forward() mirrors the torch ModelRunner."""

    def __init__(self, onnx_dir: str | Path, *, kv_cache_tokens: int = 16384,
                 block_size: int = 16, max_slots: int = 256, threads: int = 1,
                 model_file: str | None = None) -> None:
        import onnxruntime as ort

        self.dir = Path(onnx_dir)
        meta = json.loads((self.dir / "onnx_model.json").read_text())
        self.meta = meta
        self.family = meta["family"]
        self.session = make_session(self.dir / (model_file or meta["model_file"]), threads)
        self._ort = ort
        self.block_size = block_size
        if self.family == "llama":
            n = max(1, kv_cache_tokens // block_size) * block_size
            shape = (meta["n_layers"], n, meta["n_kv_heads"], meta["head_dim"])
            self.k = np.zeros(shape, dtype=np.float32)
            self.v = np.zeros(shape, dtype=np.float32)
            self._k_ort = ort.OrtValue.ortvalue_from_numpy(self.k)
            self._v_ort = ort.OrtValue.ortvalue_from_numpy(self.v)
        else:
            self.state = np.zeros((meta["n_layers"], max_slots, meta["dim"],
                                   meta["kernel_size"] - 1), dtype=np.float32)

    def forward(self, tokens: np.ndarray, positions: np.ndarray, num_new: np.ndarray,
                logits_index: np.ndarray, tables: np.ndarray) -> np.ndarray:
        """All int64 numpy arrays as in a ForwardPlan; returns logits [B, V] float32."""
        if self.family == "llama":
            return self._llama(tokens, positions, num_new, logits_index, tables)
        return self._conv(tokens, positions, num_new, logits_index, tables[:, 0])

    def _llama(self, tokens, positions, num_new, logits_index, tables):
        bs = self.block_size
        bsz, seqlen = tokens.shape
        cached = positions[:, 0]  # [B] tokens already in the pool per row
        s = max(1, int(cached.max()))
        keys = np.arange(s)
        tbl = np.maximum(tables, 0)
        blk = np.take_along_axis(tbl, np.minimum(keys // bs, tbl.shape[1] - 1)[None, :]
                                 .repeat(bsz, 0), axis=1)
        read = (blk * bs + keys % bs).astype(np.int64)  # [B, S]
        past_mask = np.broadcast_to((keys[None, :] < cached[:, None])[:, None, :],
                                    (bsz, seqlen, s)).copy()  # [B, T, S]
        t = np.arange(seqlen)
        new_mask = np.broadcast_to((t[None, :] <= t[:, None])[None], (bsz, seqlen, seqlen)).copy()
        io = self.session.io_binding()
        for name, arr in (("tokens", tokens), ("positions", positions), ("read_slots", read),
                          ("past_mask", past_mask), ("new_mask", new_mask),
                          ("logits_index", logits_index)):
            io.bind_cpu_input(name, np.ascontiguousarray(arr))
        io.bind_ortvalue_input("k_cache", self._k_ort)
        io.bind_ortvalue_input("v_cache", self._v_ort)
        for name in ("logits", "k_new", "v_new"):
            io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        logits, k_new, v_new = io.copy_outputs_to_cpu()
        # write this step's keys/values for the real tokens into the pool
        valid = t[None, :] < num_new[:, None]  # [B, T]
        b_idx, t_idx = np.nonzero(valid)
        pos = positions[b_idx, t_idx]
        slots = tbl[b_idx, pos // bs] * bs + pos % bs
        self.k[:, slots] = k_new[:, b_idx, t_idx]
        self.v[:, slots] = v_new[:, b_idx, t_idx]
        return logits

    def _conv(self, tokens, positions, num_new, logits_index, slots):
        st = self.state[:, slots]  # [L, B, dim, K-1] (a copy: fancy indexing)
        st[:, positions[:, 0] == 0] = 0.0
        logits, new_state = self.session.run(None, {
            "tokens": tokens, "state": st, "num_new": num_new, "logits_index": logits_index})
        self.state[:, slots] = new_state
        return logits
