"""Run an exported step graph with ONNX Runtime over a paged cache pool held in numpy.

The pools ([L, blocks x block_size, Hkv, D] for K and V, or [L, slots, *state_shape] states)
are allocated once and bound to the session by I/O binding as OrtValues that share the numpy
memory, so a step never copies the cache through the graph: the graph gathers what it reads,
returns only this step's new keys/values (or states), and the host writes those into the pool.
Sessions use a fixed thread count and spin only when asked (a replica whose threads have
their cores to themselves), so replicas and torch do not fight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .llama_graph import GRAPH_VERSION, attn_bias


def make_session(path: str | Path, threads: int = 1, spin: bool = False) -> Any:
    """spin lets the intra-op threads busy-wait between kernels: measured 22.5 -> 19.3 ms of
    MatMul per SmolLM2 decode step at batch 1 on 2 threads (a sleeping thread takes ~30 us to
    wake, per GEMV); only for a session whose threads have their cores to themselves."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OnnxStepRuntime:
    """One exported model plus its cache pool; forward() mirrors the torch ModelRunner."""

    def __init__(self, onnx_dir: str | Path, *, kv_cache_tokens: int = 16384,
                 block_size: int = 16, max_slots: int = 256, threads: int = 1,
                 spin: bool = False, model_file: str | None = None) -> None:
        import onnxruntime as ort

        self.dir = Path(onnx_dir)
        meta = json.loads((self.dir / "onnx_model.json").read_text())
        self.meta = meta
        self.family = meta["family"]
        self.session = make_session(self.dir / (model_file or meta["model_file"]), threads,
                                    spin)
        self._ort = ort
        self.block_size = block_size
        from ..models import CacheKind, model_spec

        self.paged = model_spec(self.family).cache_kind is CacheKind.PAGED_KV
        if self.paged:  # the paged step graph of llama_graph.py
            if meta.get("graph") != GRAPH_VERSION:
                raise ValueError(f"{self.dir}: exported by an older shardserve (step graph "
                                 f"{meta.get('graph', 1)}, this one runs {GRAPH_VERSION}); "
                                 "export it again with `shardserve export-onnx`")
            n = max(1, kv_cache_tokens // block_size) * block_size
            n_layers = meta["n_layers"]
            shape = (n_layers, n, meta["n_kv_heads"] * meta["head_dim"])  # [L, N, Hkv D]
            self.k = np.zeros(shape, dtype=np.float32)
            self.v = np.zeros(shape, dtype=np.float32)
            # one IOBinding for the runtime's life: the per-layer pool views are bound once
            self._io = self.session.io_binding()
            self._pool_ort = []
            for i in range(n_layers):
                for kind, pool in (("k", self.k), ("v", self.v)):
                    val = ort.OrtValue.ortvalue_from_numpy(pool[i])
                    self._pool_ort.append(val)
                    self._io.bind_ortvalue_input(f"{kind}_cache_{i}", val)
        else:  # a state-slot step graph: state [L, B, *state_shape] in and out
            # (exports before state_shape was recorded are conv LMs: [dim, kernel_size - 1])
            shape = meta.get("state_shape") or [meta["dim"], meta["kernel_size"] - 1]
            self.state = np.zeros((meta["n_layers"], max_slots, *shape), dtype=np.float32)

    def forward(self, tokens: np.ndarray, positions: np.ndarray, num_new: np.ndarray,
                logits_index: np.ndarray, tables: np.ndarray) -> np.ndarray:
        """All int64 numpy arrays as in a ForwardPlan; returns logits [B, V] float32."""
        if self.paged:
            return self._llama(tokens, positions, num_new, logits_index, tables)
        return self._state_step(tokens, positions, num_new, logits_index, tables[:, 0])

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
        io = self._io
        for name, arr in (("tokens", tokens), ("positions", positions), ("read_slots", read),
                          ("attn_bias", attn_bias(cached, s, seqlen)),
                          ("logits_index", logits_index.reshape(bsz, 1))):
            io.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name in ("logits", "k_new", "v_new"):  # shapes change: ORT allocates each run
            io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        logits, k_new, v_new = io.copy_outputs_to_cpu()
        # write this step's keys/values for the real tokens into the pool
        t = np.arange(seqlen)
        b_idx, t_idx = np.nonzero(t[None, :] < num_new[:, None])  # real tokens [n]
        pos = positions[b_idx, t_idx]
        slots = tbl[b_idx, pos // bs] * bs + pos % bs  # [n]
        n_layers, kv = self.k.shape[0], self.k.shape[2]
        k_new = k_new.reshape(n_layers, bsz * seqlen, kv)  # [L, B T, Hkv D]
        v_new = v_new.reshape(n_layers, bsz * seqlen, kv)
        if len(b_idx) == bsz * seqlen:  # no padding: every (b, t) is real, in order
            self.k[:, slots] = k_new
            self.v[:, slots] = v_new
        else:
            flat = b_idx * seqlen + t_idx  # [n]
            self.k[:, slots] = k_new[:, flat]
            self.v[:, slots] = v_new[:, flat]
        return logits

    def _state_step(self, tokens, positions, num_new, logits_index, slots):
        st = self.state[:, slots]  # [L, B, *state_shape] (a copy: fancy indexing)
        st[:, positions[:, 0] == 0] = 0.0
        logits, new_state = self.session.run(None, {
            "tokens": tokens, "state": st, "num_new": num_new, "logits_index": logits_index})
        self.state[:, slots] = new_state
        return logits
