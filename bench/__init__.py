"""Benchmarks of the ensemble and the service (`python -m bench --help`): one module per experiment, named after its
command; `common` holds what they all use, `serving` the HTTP side (`hey`, the v2 request), `service` the service in
a child process, `peer_servers` the servers `peers` measures against, `hostile` and `soak` the attacks."""
