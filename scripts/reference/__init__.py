"""Independent Python reference of the KV cache policies (see README.md)."""
