"""Generated gRPC stubs (see proto/generate_stubs.py)."""
