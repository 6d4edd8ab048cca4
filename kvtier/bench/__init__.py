"""Benchmarks: perplexity with a compressed cache, speed against transformers."""
