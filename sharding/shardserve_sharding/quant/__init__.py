"""Weight-only int8 / int4 quantization: schemes (scheme.py), run-time kernels (kernels.py),
wiring into a loaded model (apply.py), GGUF blocks taken over as they are (gguf_blocks.py)."""

from .scheme import QuantConfig, quantize_weight, stored_tensors

__all__ = ["QuantConfig", "quantize_weight", "stored_tensors"]
