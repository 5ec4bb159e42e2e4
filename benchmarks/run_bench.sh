#!/bin/sh
# Regenerates benchmarks/results/bench.{json,png}: every method, BERT shapes from ~1M to
# ~335M parameters, peak extra memory at bert-base. Extra arguments go to `bertopt bench`
# (e.g. --threads 1, --sizes bert-base). Run it on an otherwise idle machine: the JSON
# records the load average and the CPU share other processes took during the run.
set -e
cd "$(dirname "$0")/.."
BERTOPT="${BERTOPT:-.venv/bin/bertopt}"
exec "$BERTOPT" bench --out benchmarks/results "$@"
