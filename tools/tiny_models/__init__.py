"""Tiny random-weight checkpoints in the real file layouts, for tests, demos and benchmarks."""
