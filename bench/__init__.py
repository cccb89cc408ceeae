"""Benchmarks of the ensemble: fused graph vs separate sessions, offline and through the service.

    python -m bench sweep         build models of several widths and ensembles, time every way to run them
    python -m bench load          HTTP load against the service, next to the in-process floor and a naive server
    python -m bench interference  each service mode alone vs interleaved with the other modes
    python -m bench quant         int8 versions of the fused graph: latency and held-out accuracy next to fp32

Every configuration is timed in its own process (`bench.worker`) by one timing loop (`bench.timing`).
docs/benchmarks.md explains the method and holds the latest tables.
"""
