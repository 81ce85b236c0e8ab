"""ModelRunner for the ONNX Runtime backend: the same ForwardPlan, the same paged cache.

The scheduler, block allocator and leader loop are shared with the torch workers; only the
forward differs (shardserve_sharding.onnx_export.runtime runs the exported step graph over a
numpy block pool bound to the session without copies).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .runner import ForwardPlan


class OnnxModelRunner:
    def __init__(self, cfg: Any) -> None:
        from shardserve_sharding.onnx_export.runtime import OnnxStepRuntime
        from shardserve_sharding.tp.comm import ThreadGroup

        self.rt = OnnxStepRuntime(cfg.model_dir, kv_cache_tokens=cfg.kv_cache_tokens,
                                  block_size=cfg.block_size, max_slots=cfg.max_batch_size,
                                  threads=cfg.threads, spin=cfg.spin)
        self.family = self.rt.family
        self.comm = ThreadGroup(1).comm(0)
        self.forward_seconds = 0.0
        self.comm_seconds = 0.0

    def forward(self, plan: ForwardPlan) -> torch.Tensor:
        t0 = time.perf_counter()
        logits = self.rt.forward(plan.tokens.numpy(), plan.positions.numpy(),
                                 plan.num_new.numpy(), plan.logits_index.numpy(),
                                 plan.tables.numpy())
        self.forward_seconds += time.perf_counter() - t0
        return torch.from_numpy(logits)
