"""Throughput benchmark of flux-serve: ``python -m bench.throughput --help`` (see bench/run.sh)."""
