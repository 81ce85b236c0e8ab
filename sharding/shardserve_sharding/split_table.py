"""The one table that says how every parameter of every model family splits across TP ranks.

Kinds (the words of gpt-fast's tp.py and vLLM's parallel layers):
- colwise: split the output features (dim 0 of a [out, in] weight).
- rowwise: split the input features (dim 1); the layer's output is all-reduced.
- vocab: split dim 0 (vocabulary rows) after padding the vocabulary to a multiple of TP.
- replicated: every rank holds the whole tensor (norms).
- fused_qkv: [q heads; k heads; v heads] on dim 0, each part split by KV-head group, with KV
  heads replicated when TP exceeds their number.
- fused_halves: [gate; up] (or GLU [value; gate]) on dim 0, each half split colwise.

Quantized checkpoints (quant/scheme.py) store a weight's integers under the weight's own name
(same kind: int4 bytes pack two input columns, so rowwise cuts fall between bytes) and its
scales beside it, which follow the weight: `NAME_scale` (int8, one per output row) follows the
rows of colwise kinds and is replicated for rowwise ones (every rank's partial sum needs every
row's scale); `NAME_qparams` (int4, [rows, groups, 2]) and `NAME_group_scale` (int8,
[rows, groups]) follow the rows of colwise kinds and the groups (dim 1) of rowwise ones.

The trainer, the resharder and the serving workers all ask this module; nothing else encodes
a split rule.
"""

from __future__ import annotations

import re
from enum import Enum


class SplitKind(str, Enum):
    COLWISE = "colwise"
    ROWWISE = "rowwise"
    VOCAB = "vocab"
    REPLICATED = "replicated"
    FUSED_QKV = "fused_qkv"
    FUSED_HALVES = "fused_halves"


_TABLE: dict[str, list[tuple[str, SplitKind]]] = {
    "llama": [
        (r"tok_embeddings\.weight", SplitKind.VOCAB),
        (r"output\.weight", SplitKind.VOCAB),
        (r"layers\.\d+\.attention\.wqkv\.weight", SplitKind.FUSED_QKV),
        (r"layers\.\d+\.attention\.wo\.weight", SplitKind.ROWWISE),
        (r"layers\.\d+\.feed_forward\.w13\.weight", SplitKind.FUSED_HALVES),
        (r"layers\.\d+\.feed_forward\.w2\.weight", SplitKind.ROWWISE),
        (r"(layers\.\d+\.(attention_norm|ffn_norm)|norm)\.weight", SplitKind.REPLICATED),
    ],
    "convlm": [
        (r"tok_embeddings\.weight", SplitKind.VOCAB),
        (r"output\.weight", SplitKind.VOCAB),
        (r"layers\.\d+\.conv\.(weight|bias)", SplitKind.FUSED_HALVES),
        (r"layers\.\d+\.proj\.weight", SplitKind.ROWWISE),
        (r"(layers\.\d+\.norm|norm)\.weight", SplitKind.REPLICATED),
    ],
    "rnnlm": [
        (r"tok_embeddings\.weight", SplitKind.VOCAB),
        (r"output\.weight", SplitKind.VOCAB),
        # fused gate rows are unit-major (models/rnnlm.py): colwise keeps whole hidden units,
        # all their gates, on one rank; w_hh's input (every unit's h) is gathered per step
        (r"layers\.\d+\.(w_ih|w_hh)\.(weight|bias)", SplitKind.COLWISE),
        (r"layers\.\d+\.proj\.weight", SplitKind.ROWWISE),
        (r"(layers\.\d+\.norm|norm)\.weight", SplitKind.REPLICATED),
    ],
}


SCALE_SUFFIX = "_scale"
"""int8 per-row scales of weight NAME are stored as NAME_scale."""
GROUP_SCALE_SUFFIX = "_group_scale"
"""int8 scales per group of input columns of weight NAME [N, K/G] are stored as
NAME_group_scale: they split as the weight does (rowwise: whole groups follow their columns)."""
QPARAMS_SUFFIX = "_qparams"
"""int4 grouped (scale, offset) pairs of weight NAME are stored as NAME_qparams."""


def split_kind(family: str, name: str) -> SplitKind:
    """The split kind of parameter `name` in `family` (or of a quantized weight's scales);
    unknown names are an error."""
    if name.endswith(".weight" + SCALE_SUFFIX):
        kind = _table_kind(family, name[: -len(SCALE_SUFFIX)])
        return SplitKind.REPLICATED if kind is SplitKind.ROWWISE else kind
    if name.endswith(".weight" + QPARAMS_SUFFIX):
        return _table_kind(family, name[: -len(QPARAMS_SUFFIX)])
    if name.endswith(".weight" + GROUP_SCALE_SUFFIX):
        return _table_kind(family, name[: -len(GROUP_SCALE_SUFFIX)])
    return _table_kind(family, name)


def _table_kind(family: str, name: str) -> SplitKind:
    rules = _TABLE.get(family)
    if rules is None:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(_TABLE)}")
    for pattern, kind in rules:
        if re.fullmatch(pattern, name):
            return kind
    raise ValueError(f"parameter {name!r} of family {family!r} has no entry in the split table")
