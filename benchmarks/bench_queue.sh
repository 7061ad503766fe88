#!/usr/bin/env bash
# bench_queue.sh LONG NAME...: bench each recipe NAME (one seed, --resume) one after another, with
# LONG's virtualenv, runs, records and logs as benchmarks/long_runs.sh lays them out.
LONG=$1; shift
for name in "$@"; do
  "$LONG/venv/bin/l2l-recipes" bench "$name" --seeds 1 --device cpu --resume --runs-dir "$LONG/bench" \
    --results-dir "$LONG/results" --no-progress >>"$LONG/logs/$name.log" 2>&1
done
