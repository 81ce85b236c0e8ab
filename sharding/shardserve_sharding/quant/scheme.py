"""Weight-only quantization schemes: how a float weight becomes stored integers and scales.

Two schemes, both over [out, in] linear weights (rows are output channels):

- int8: symmetric, one scale per group of `group_size` consecutive input columns (the
  default, 32: llama.cpp's Q8_0 blocks map onto it exactly) or, with group size 0, per output
  row. Stored as `NAME` int8 [N, K] (values in [-127, 127]) and `NAME_scale` float32 [N] (per
  row) or `NAME_group_scale` float32 [N, K/group_size] (per group, each an fp16 value so the
  kernel holds them in half the bytes); w = q * scale.
- int4: asymmetric, one (scale, offset) pair per group of `group_size` consecutive input
  columns. Stored as `NAME` uint8 [N, K/2] (two signed 4-bit values per byte, column 2j in the
  low nibble, 2j+1 in the high one, two's complement, v in [-8, 7]) and `NAME_qparams` float32
  [N, K/group_size, 2] holding (scale, offset); w = v * scale + offset. That is torch's
  `_weight_int4pack_mm_for_cpu` convention (q = v + 8 in [0, 15], offset = the value at q = 8,
  gpt-fast's "zeros") and llama.cpp's Q4_0/Q4_1 blocks map onto it exactly (gguf_blocks.py).

Every row, and every group of a row, is quantized on its own, so cutting rows (colwise,
vocabulary) or whole groups (rowwise) before or after quantizing gives the same bytes.
The one choice that spans ranks is a per-row int8 scale under a rowwise cut (the row's input
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

from ..split_table import GROUP_SCALE_SUFFIX, QPARAMS_SUFFIX, SCALE_SUFFIX

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes torch's int4 CPU kernel accepts (int8 takes these too, or 0: per row)."""
EMBEDDINGS = ("int8-g32", "int8", "none")
"""The tied embedding / lm_head: int8 per 32 columns (the GGUF's Q8_0 blocks exactly), int8
per vocabulary row, or kept float."""


@dataclass(frozen=True)
class QuantConfig:
    """How a checkpoint's linear weights are quantized (recorded in its manifest)."""

    scheme: str
    """"int8" (grouped or per-row scales) or "int4" (grouped scales and offsets)."""
    group_size: int = 0
    """Input columns per group (int8: 0 = one scale per output row)."""
    embedding: str = "int8"
    """The (tied) embedding / lm_head matrix, one of EMBEDDINGS ("int8": per vocabulary row;
    "int8-g32": per 32 columns; "none": kept in the checkpoint's float dtype)."""
    origin: str = "float"
    """Where the integers came from: "float" (quantized here) or a GGUF block type
    ("gguf:Q4_1", ...) taken over without a float round trip."""

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantization scheme {self.scheme!r} is not one of {SCHEMES}")
        if self.scheme == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size {self.group_size} is not one of "
                             f"{INT4_GROUP_SIZES}")
        if self.scheme == "int8" and self.group_size not in (0, *INT4_GROUP_SIZES):
            raise ValueError(f"int8 group size {self.group_size} is not 0 (per row) or one of "
                             f"{INT4_GROUP_SIZES}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding quantization {self.embedding!r} is not one of "
                             f"{EMBEDDINGS}")

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

    def group_of(self, name: str) -> int:
        """Input columns per scale group of quantized weight `name` (0: one per row)."""
        if name == "tok_embeddings.weight" or name == "output.weight":
            return 32 if self.embedding == "int8-g32" else 0
        return self.group_size


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


def quantize_int8(w: torch.Tensor, scale: torch.Tensor | None = None, group_size: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], scale float32 [N]); w ~= q * scale[:, None]. scale: the
    rows' scales when w holds only some of their columns (a rowwise slice: see the module
    docstring), else chosen here (INT8_CLIP_RATIOS). group_size > 0: each group of that many
    columns on its own, scale [N, K/group_size] rounded to fp16 values (where they are
    normal fp16 numbers; exact for the GGUF's Q8_0 blocks)."""
    if group_size:
        n, k = w.shape
        if k % group_size:
            raise ValueError(f"{k} input columns are not a multiple of the group size "
                             f"{group_size}")
        g = w.float().reshape(n * (k // group_size), group_size)  # [N K/G, G]
        amax = g.abs().amax(dim=1)  # [N K/G]
        s = int8_row_scale(amax, int8_clip_errors(g, amax))
        h = s.half().float()
        s = torch.where((h >= 2.0 ** -14) & (h <= 65504.0), h, s)
        q, s = quantize_int8(g, s)
        return q.reshape(n, k), s.reshape(n, k // group_size)
    w = w.float()
    if scale is None:
        amax = w.abs().amax(dim=1)  # [N]
        scale = int8_row_scale(amax, int8_clip_errors(w, amax))
    scale = scale.float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)  # [N, K]
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(q [N, K] int8, scale [N] or [N, K/G]) -> float32 [N, K]."""
    n, k = q.shape
    sc = scale.float().reshape(n, -1)  # [N, K/G], G = K for row scales
    return (q.float().view(n, sc.shape[1], -1) * sc[..., None]).reshape(n, k)


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
        group = qcfg.group_of(name)
        q, scale = quantize_int8(w, int8_scale, group)
        return {name: q, name + (GROUP_SCALE_SUFFIX if group else SCALE_SUFFIX): scale}
    packed, qparams = quantize_int4(w, qcfg.group_size)
    return {name: packed, name + QPARAMS_SUFFIX: qparams}


def stored_tensors(name: str, shape: tuple[int, ...], float_dtype: torch.dtype,
                   qcfg: QuantConfig) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, global shape, dtype) of what a checkpoint stores for float tensor `name`."""
    scheme = qcfg.scheme_of(name)
    if scheme is None:
        return [(name, shape, float_dtype)]
    n, k = shape
    group = qcfg.group_of(name)
    if group and k % group:
        raise ValueError(f"{name}: {k} input columns are not a multiple of the {scheme} group "
                         f"size {group}")
    if scheme == "int8" and group:
        return [(name, (n, k), torch.int8),
                (name + GROUP_SCALE_SUFFIX, (n, k // group), torch.float32)]
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
    for suffix in (SCALE_SUFFIX, GROUP_SCALE_SUFFIX, QPARAMS_SUFFIX):
        if name.endswith(".weight" + suffix):
            return name[: -len(suffix)], suffix
    return name, ""
