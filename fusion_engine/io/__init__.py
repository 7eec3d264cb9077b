"""Checkpoint I/O: memory-mapped safetensors (single and sharded), .bin, sharded atomic output (issue 4)."""
