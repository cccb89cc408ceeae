"""Benchmarks of the ensemble: fused graph against separate sessions, in-process and through the service.

    python -m bench sweep     build UNets of several widths and ensembles of them, time separate vs fused, chart
                              latency against accuracy (the published experiment)
    python -m bench scale     a width-2 pair across input sizes: separate vs fused per thread and spinning layout
    python -m bench compare   fused or separate, for any model directory, in-process and over /v2
    python -m bench layouts   the service under each INFERENCE_SLOTS layout, through HTTP
    python -m bench peers     this service against KServe's Python model server and a naive server

One module per experiment, named after its command (its measurement and its report); `common` holds what they all
use (the machine, the service's runtime timed in interleaved rounds, intervals, tables, docs sections), `serving`
the HTTP side (`hey`, the v2 request), `peer_servers` the servers `peers` measures against. Every in-process figure
comes from the service's own runtime (app.engine.runtime); every HTTP load from Debian's `hey`.
"""
