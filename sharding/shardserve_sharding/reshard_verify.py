"""Stage 3 of `shardserve reshard --verify`: the written checkpoint computes what its source did.

A float destination's logits (served at its own TP, ranks simulated with threads) are compared
with the source's (merged, one process) on the same random tokens; a quantized destination is
compared with itself served at TP=1. "Within t" means max|a-b| <= t * max|reference|.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .checkpoint.manifest import CheckpointError, read_manifest

# the model-building modules are imported when verification runs (a plain reshard never does)


def verify_reshard(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    source_format: str = "auto",
    tolerance: float = 1e-5,
    seed: int = 0,
    tokenizer: Any = None,
    config: str | os.PathLike[str] | None = None,
) -> float:
    """Logits of src (merged, one process) and dst (its own TP, simulated with threads) on the
    same random tokens; raises CheckpointError unless max|a-b| <= tolerance * max|ref|. A
    quantized dst is compared with itself served at TP=1 (its integers and scales are the
    source's by construction; tests/sharding/test_quant.py checks that)."""
    from .materialize import materialize
    from .reshard import open_any_source
    from .tp.comm import run_ranks

    manifest = read_manifest(dst)
    if manifest.quantization is not None:
        return _verify_quantized(dst, tolerance, seed)
    source = open_any_source(src, source_format, tokenizer=tokenizer, config=config)
    torch.manual_seed(seed)
    state = {n: source.tensor(n).float() for n, _ in source.names_and_shapes()}
    source.close()
    ref_model = materialize(source.family, source.config, state)
    del state
    tokens, positions = _probe(source.config.vocab_size, seed)
    with torch.no_grad():
        ref = ref_model(tokens, positions)
    del ref_model
    out = run_ranks(manifest.layout.tp, _runner(dst, tokens, positions))[0]
    return _check(out, ref, tolerance, f"{dst}: verification failed, logits differ from {src}")


def _verify_quantized(dst: str | os.PathLike[str], tolerance: float, seed: int) -> float:
    """Logits of a quantized dst at its own TP (threads) against dst at TP=1 (fp32)."""
    from .tp.comm import ThreadGroup, run_ranks

    m = read_manifest(dst)
    tokens, positions = _probe(int(m.config["vocab_size"]), seed)
    run = _runner(dst, tokens, positions)
    ref = run(ThreadGroup(1).comm(0), 0)
    out = run_ranks(m.layout.tp, run)[0]
    return _check(out, ref, tolerance,
                  f"{dst}: verification failed, TP={m.layout.tp} logits differ from TP=1")


def _probe(vocab_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The random tokens [2, 16] and their positions [2, 16] both sides are run on."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (2, 16), generator=gen)
    return tokens, torch.arange(16).expand(2, 16)


def _runner(dst: Any, tokens: torch.Tensor, positions: torch.Tensor) -> Any:
    """run(comm, rank): dst's logits [2, 16, V] served at comm's TP (fp32)."""

    def run(comm, rank):
        from .sharded_load import load_sharded_model

        model = load_sharded_model(dst, comm, dtype=torch.float32)
        with torch.no_grad():
            return model(tokens, positions)

    return run


def _check(out: torch.Tensor, ref: torch.Tensor, tolerance: float, failure: str) -> float:
    """max|out - ref| / max|ref|; raises CheckpointError (failure + the figures) above tolerance."""
    err = float((out - ref).abs().max() / ref.abs().max())
    if not err <= tolerance:
        raise CheckpointError(f"{failure} by {err:.3g} (relative), tolerance {tolerance:g}")
    return err
