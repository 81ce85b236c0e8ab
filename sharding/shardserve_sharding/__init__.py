"""shardserve_sharding: models, checkpoint formats, import/export and resharding (offline side)."""

__version__ = "0.1.0"
