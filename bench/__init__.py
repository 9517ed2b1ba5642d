"""Benchmarks: gateway overhead over a bare pass-through, and in-process student throughput.

Nothing here is imported by the gateway or its packages; see bench/README.md.
"""
