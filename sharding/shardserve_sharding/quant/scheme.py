"""Weight-only quantization schemes: how a float weight becomes stored integers and scales.

Two schemes, both over [out, in] linear weights (rows are output channels):

- int8: symmetric, one scale per output row. Stored as `NAME` int8 [N, K] (values in
  [-127, 127]) and `NAME_scale` float32 [N]; w = q * scale.
- int4: asymmetric, one (scale, offset) pair per group of `group_size` consecutive input
  columns. Stored as `NAME` uint8 [N, K/2] (two signed 4-bit values per byte, column 2j in the
  low nibble, 2j+1 in the high one, two's complement, v in [-8, 7]) and `NAME_qparams` float32
  [N, K/group_size, 2] holding (scale, offset); w = v * scale + offset. That is torch's
  `_weight_int4pack_mm_for_cpu` convention (q = v + 8 in [0, 15], offset = the value at q = 8,
  gpt-fast's "zeros") and llama.cpp's Q4_0/Q4_1 blocks map onto it exactly (gguf_blocks.py).

Every row, and every group of a row, is quantized on its own, so cutting rows (colwise,
vocabulary) or whole int4 groups (rowwise) before or after quantizing gives the same bytes.
The one choice that spans ranks is an int8 row's scale under a rowwise cut (the row's input
columns are spread over the ranks): shard-then-quantize takes the row maximum as the MAX of
the ranks' maxima and each candidate scale's error as the SUM of the ranks' errors (two
all-reduces of a few floats per row in a TP group: int8_clip_errors, int8_row_scale), and then
gives the same bytes too (up to float64 rounding of those sums deciding an exact tie). A
row or group of zeros quantizes to all-zero bytes, so vocabulary padding rows are zeros in
every stored tensor. Everything is computed in float32 whatever
the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..split_table import QPARAMS_SUFFIX, SCALE_SUFFIX

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes torch's int4 CPU kernel accepts."""


@dataclass(frozen=True)
class QuantConfig:
    """How a checkpoint's linear weights are quantized (recorded in its manifest)."""

    scheme: str
    """"int8" (per-row scales) or "int4" (grouped scales and offsets)."""
    group_size: int = 0
    """Input columns per int4 group (0 for int8)."""
    embedding: str = "int8"
    """The (tied) embedding / lm_head matrix: "int8" per vocabulary row, or "none" (kept in
    the checkpoint's float dtype)."""
    origin: str = "float"
    """Where the integers came from: "float" (quantized here) or a GGUF block type
    ("gguf:Q4_1", ...) taken over without a float round trip."""

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantization scheme {self.scheme!r} is not one of {SCHEMES}")
        if self.scheme == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size {self.group_size} is not one of "
                             f"{INT4_GROUP_SIZES}")
        if self.scheme == "int8" and self.group_size:
            raise ValueError("int8 has one scale per row: group size must be 0")
        if self.embedding not in ("int8", "none"):
            raise ValueError(f"embedding quantization {self.embedding!r} is not int8 or none")

    def to_dict(self) -> dict[str, object]:
        return {"scheme": self.scheme, "group_size": self.group_size,
                "embedding": self.embedding, "origin": self.origin}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> QuantConfig:
        if not isinstance(d, dict) or set(d) - {"scheme", "group_size", "embedding", "origin"}:
            raise ValueError(f"quantization must be an object with scheme, group_size, "
                             f"embedding, origin; got {d!r}")
        group = d.get("group_size", 0)
        if isinstance(group, bool) or not isinstance(group, int):
            raise ValueError(f"quantization.group_size must be an integer, got {group!r}")
        return cls(str(d.get("scheme")), group, str(d.get("embedding", "int8")),
                   str(d.get("origin", "float")))

    def scheme_of(self, name: str) -> str | None:
        """The scheme that stores weight `name` ("int8", "int4"), None for a float tensor."""
        if name == "tok_embeddings.weight" or name == "output.weight":
            return None if self.embedding == "none" else "int8"
        if name.endswith((".wqkv.weight", ".wo.weight", ".w13.weight", ".w2.weight")):
            return self.scheme
        return None


INT8_CLIP_RATIOS = tuple(1.0 - 0.02 * i for i in range(21))
"""Candidate int8 scales of a row, as fractions of max|row| / 127: the one with the least
squared error over the row is kept (clipping a few outliers buys finer steps for the rest).
On SmolLM2 (whose weights are Q4_1 values) it took the held-out perplexity with fp32
activations from +1.2% to +1.0% of the float model's (loadtest/results/quant.md)."""


def int8_clip_errors(w: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Squared error over w's columns of each candidate scale: w [N, K] (a whole row or some of
    its columns), amax [N] the whole row's max |w| -> float64 [len(INT8_CLIP_RATIOS), N]."""
    w = w.float()
    errs = []
    for r in INT8_CLIP_RATIOS:
        s = torch.where(amax > 0, amax.float() * r / 127.0, torch.ones_like(amax, dtype=w.dtype))
        q = torch.round(w / s[:, None]).clamp_(-127, 127)  # [N, K]
        errs.append(((q * s[:, None] - w).double() ** 2).sum(dim=1))  # [N]
    return torch.stack(errs)


def int8_row_scale(amax: torch.Tensor, errors: torch.Tensor) -> torch.Tensor:
    """The kept scale of each row [N] float32 from its max |w| and its candidates' errors
    (the first of equal errors); 0 for an all-zero row."""
    best = errors.argmin(dim=0)  # [N], argmin returns the first minimum
    ratios = torch.tensor(INT8_CLIP_RATIOS, dtype=torch.float32)[best]
    return torch.where(amax > 0, amax.float() * ratios / 127.0, torch.zeros_like(ratios))


def quantize_int8(w: torch.Tensor, scale: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], scale float32 [N]); w ~= q * scale[:, None]. scale: the
    rows' scales when w holds only some of their columns (a rowwise slice: see the module
    docstring), else chosen here (INT8_CLIP_RATIOS)."""
    w = w.float()
    if scale is None:
        amax = w.abs().amax(dim=1)  # [N]
        scale = int8_row_scale(amax, int8_clip_errors(w, amax))
    scale = scale.float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)  # [N, K]
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(q [N, K] int8, scale [N]) -> float32 [N, K]."""
    return q.float() * scale.float()[:, None]


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed uint8 [N, K/2], qparams float32 [N, K/group, 2]); min/max per group:
    scale = (max - min) / 15, offset = min + 8 scale, v = round((w - min) / scale) - 8."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"{k} input columns are not a multiple of the group size {group_size}")
    g = w.float().reshape(n, k // group_size, group_size)  # [N, K/G, G]
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # [N, K/G]
    scale = (hi - lo) / 15.0  # [N, K/G]
    offset = lo + 8.0 * scale  # [N, K/G]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((g - lo[..., None]) / safe[..., None]).clamp_(0, 15)  # [N, K/G, G]
    q = torch.where(scale[..., None] > 0, q, torch.full_like(q, 8.0))  # flat group: v = 0
    offset = torch.where(scale > 0, offset, lo)
    v = q.to(torch.int16).reshape(n, k) - 8  # [N, K] in [-8, 7]
    return pack_int4(v), torch.stack([scale, offset], dim=-1)


def pack_int4(v: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit values v [N, K] (int, in [-8, 7]) -> uint8 [N, K/2], column 2j low nibble."""
    u = (v.to(torch.int16) & 0xF).to(torch.uint8)  # [N, K] two's complement nibbles
    return u[:, 0::2] | (u[:, 1::2] << 4)  # [N, K/2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> signed int8 [N, K] in [-8, 7] (inverse of pack_int4)."""
    lo = (packed & 0xF).to(torch.int8)  # [N, K/2]
    hi = (packed >> 4).to(torch.int8)  # [N, K/2]
    v = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)  # [N, K]
    return torch.where(v >= 8, v - 16, v)


def dequantize_int4(packed: torch.Tensor, qparams: torch.Tensor) -> torch.Tensor:
    """(packed [N, K/2] uint8, qparams [N, K/G, 2]) -> float32 [N, K]."""
    v = unpack_int4(packed).float()  # [N, K]
    n, k = v.shape
    groups = qparams.shape[1]
    v = v.reshape(n, groups, k // groups)  # [N, K/G, G]
    qp = qparams.float()
    return (v * qp[..., 0:1] + qp[..., 1:2]).reshape(n, k)


def quantize_weight(name: str, w: torch.Tensor, qcfg: QuantConfig,
                    int8_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The stored tensors of weight `name` (w [N, K], global or one rank's slice; int8_scale:
    see quantize_int8)."""
    scheme = qcfg.scheme_of(name)
    if scheme is None:
        return {name: w}
    if scheme == "int8":
        q, scale = quantize_int8(w, int8_scale)
        return {name: q, name + SCALE_SUFFIX: scale}
    packed, qparams = quantize_int4(w, qcfg.group_size)
    return {name: packed, name + QPARAMS_SUFFIX: qparams}


def stored_tensors(name: str, shape: tuple[int, ...], float_dtype: torch.dtype,
                   qcfg: QuantConfig) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, global shape, dtype) of what a checkpoint stores for float tensor `name`."""
    scheme = qcfg.scheme_of(name)
    if scheme is None:
        return [(name, shape, float_dtype)]
    n, k = shape
    if scheme == "int8":
        return [(name, (n, k), torch.int8), (name + SCALE_SUFFIX, (n,), torch.float32)]
    if k % qcfg.group_size:
        raise ValueError(f"{name}: {k} input columns are not a multiple of the int4 group size "
                         f"{qcfg.group_size}")
    return [(name, (n, k // 2), torch.uint8),
            (name + QPARAMS_SUFFIX, (n, k // qcfg.group_size, 2), torch.float32)]


def component_of(name: str) -> tuple[str, str]:
    """("X.weight", suffix) for a stored quantization tensor "X.weight<suffix>", suffix "" for
    the weight itself or any other tensor."""
    for suffix in (SCALE_SUFFIX, QPARAMS_SUFFIX):
        if name.endswith(".weight" + suffix):
            return name[: -len(suffix)], suffix
    return name, ""
