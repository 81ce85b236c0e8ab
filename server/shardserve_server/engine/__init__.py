"""The generation engine: sampling, stopping, detokenization and the batched step loop."""
