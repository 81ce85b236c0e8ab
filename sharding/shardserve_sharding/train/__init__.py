"""A small hybrid-parallel (DP x TP x PP) trainer that writes real sharded checkpoints."""
