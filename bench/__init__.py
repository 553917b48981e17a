"""Benchmarks and the tools they share (the link shaper)."""
