"""Reproducible benchmarks for batchline; nothing in the product imports this package."""
