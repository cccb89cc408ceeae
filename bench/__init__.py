"""Benchmarks of the ensemble: fused graph vs separate sessions, offline and through the service.

    python -m bench sweep         build models of several widths and ensembles, time every way to run them
    python -m bench scale         a width-2 pair across input sizes: separate vs fused per thread and spinning layout
    python -m bench load          HTTP load against the service, next to the in-process floor and a naive server;
                                  the service under overload and stalled uploads
    python -m bench interference  each service mode alone vs interleaved with the other modes
    python -m bench quant         int8 versions of the fused graph: latency and held-out accuracy next to fp32
    python -m bench compare       fused or separate, for any model directory, in-process and over /v2
    python -m bench layouts       today's layout against the one DEFAULT_MODE=auto picks; goodput under overload
    python -m bench peers         this service against KServe's model server and a naive server

The modules: `__main__` (the command line), `core` (what every measurement shares: the timing loop, the ways to run
a model in-process, one process per configuration, statistics and targets, the machine), `http_load` (servers on
loopback, `hey`, the asyncio load loops), `report` (markdown and charts of every experiment), and one module per
experiment, named after its command (`scale` lives in `sweep`: the same question across input sizes).
docs/benchmarks.md explains the method and holds the latest tables.
"""
