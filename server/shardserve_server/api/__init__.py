"""The gRPC front end: shardserve.v1.TextGeneration, health, reflection, metrics, auth, TLS."""
