"""shardserve_client: Python client for the shardserve gRPC text-generation API.

Installs without torch (see clients/pyproject.toml); depends only on grpcio and protobuf.
"""

__version__ = "0.1.0"
