"""Tensor parallelism applied from outside: collectives, parallel layers, and the applier."""

from .apply import apply_tensor_parallel, load_tp_state
from .comm import Comm, ProcessGroupComm, ThreadGroup
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

__all__ = [
    "ColumnParallelLinear",
    "Comm",
    "ProcessGroupComm",
    "RowParallelLinear",
    "ThreadGroup",
    "VocabParallelEmbedding",
    "apply_tensor_parallel",
    "load_tp_state",
]
