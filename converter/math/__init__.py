"""Pure functions of the conversion (no file I/O): RoRoPE, balanced KV PCA, assembly, schedule."""
