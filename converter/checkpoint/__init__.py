"""Checkpoint I/O: reading sources (local or hub), writing sharded MLA checkpoints atomically."""
