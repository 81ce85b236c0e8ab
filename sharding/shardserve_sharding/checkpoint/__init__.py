"""The shardserve checkpoint format: manifest.json plus per-rank safetensors files."""
