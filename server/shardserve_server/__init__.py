"""shardserve_server: the generation engine, shard workers and the gRPC front end (online side)."""

__version__ = "0.1.0"
