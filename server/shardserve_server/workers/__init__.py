"""Shard workers: one process per TP rank, a leader that batches, and their supervisor."""
