"""Export a shardserve model (any layout, merged on the way) to ONNX with an explicit cache."""
