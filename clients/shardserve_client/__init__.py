"""shardserve_client: Python client for the shardserve gRPC text-generation API.

Installs without torch (see clients/pyproject.toml); depends only on grpcio and protobuf.

    from shardserve_client import Client
    with Client("127.0.0.1:50051") as c:
        print(c.generate("Hello", max_new_tokens=16, temperature=0).text)
"""

from .client import AsyncClient, Client
from .targets import READINESS
from .types import (
    Cancelled,
    DeadlineExceeded,
    FinishReason,
    GenerationResult,
    InternalError,
    InvalidArgument,
    ModelInfo,
    Overloaded,
    Sample,
    ShardserveError,
    StreamChunk,
    Timing,
    Token,
    Unauthenticated,
    Unavailable,
)

__version__ = "0.1.0"

__all__ = [
    "READINESS", "AsyncClient", "Cancelled", "Client", "DeadlineExceeded", "FinishReason",
    "GenerationResult", "InternalError", "InvalidArgument", "ModelInfo", "Overloaded",
    "Sample", "ShardserveError", "StreamChunk", "Timing", "Token", "Unauthenticated", "Unavailable",
]
