"""Render a plan: a fixed-width table (valid layouts by tok/s, then invalid ones with why)
or one JSON object."""

from __future__ import annotations

import json
from typing import Any

from .costs import MachineCosts
from .predict import ModelRef, Prediction, Workload


def plan_dict(model: ModelRef, devices: int, work: Workload, costs: MachineCosts,
              preds: list[Prediction], best: Prediction | None, why: str) -> dict[str, Any]:
    """The --json object: inputs, every layout, the recommendation."""
    return {
        "model": {"name": model.name, "family": model.family},
        "devices": devices,
        "workload": {"streams": work.streams, "prompt_tokens": work.prompt_tokens,
                     "new_tokens": work.new_tokens, "target_ttft_ms": work.target_ttft_ms,
                     "max_prefill_tokens": work.max_prefill_tokens,
                     "in_phase": work.in_phase,
                     "target_itl_ms": work.target_itl_ms,
                     "memory_per_device_gib": work.memory_per_device_gib
                     or costs.memory_per_device_gib},
        "costs": {"device": costs.device, "source": costs.source,
                  "measured_at": costs.measured_at},
        "layouts": [p.to_dict() for p in preds],
        "recommended": None if best is None else {**best.to_dict(), "reason": why},
    }


def plan_table(model: ModelRef, devices: int, work: Workload, costs: MachineCosts,
               preds: list[Prediction], best: Prediction | None, why: str) -> str:
    valid = sorted((p for p in preds if p.valid), key=lambda p: -p.tok_s)
    invalid = [p for p in preds if not p.valid]
    lines = [f"plan for {model.name} ({model.family}) on {devices} devices, {work.streams} "
             f"streams, {work.prompt_tokens}-token prompts, {work.new_tokens} new tokens",
             f"costs: {costs.device} ({costs.source} {costs.measured_at})", ""]
    head = (f"{'layout':28s} {'weights/rank':>12s} {'KV tokens':>10s} {'TTFT ms':>8s} "
            f"{'ITL ms':>7s} {'tok/s':>8s} {'comm':>5s}  notes")
    lines += [head, "-" * len(head)]
    for p in valid:
        mark = "*" if best is not None and p.layout == best.layout else " "
        flag = "" if p.meets_targets else "misses target; "
        lines.append(f"{mark}{p.layout.name:27s} {p.weight_gib_per_rank:9.2f} GiB "
                     f"{p.kv_capacity_tokens:10d} {p.ttft_ms:8.1f} {p.itl_ms:7.2f} "
                     f"{p.tok_s:8.1f} {p.comm_share:5.0%}  {flag}{p.why}")
    if invalid:
        lines += ["", "invalid layouts:"]
        lines += [f"  {p.layout.name:27s} {p.why}" for p in invalid]
    lines += ["", f"recommended: {best.layout.name if best else 'none'}: {why}"]
    return "\n".join(lines)


def plan_json(*args: Any) -> str:
    return json.dumps(plan_dict(*args), indent=1)
