"""Tiny random checkpoints in the released on-disk layouts (tests, demo, benchmarks)."""
