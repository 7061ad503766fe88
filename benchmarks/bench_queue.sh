#!/usr/bin/env bash
# bench_queue.sh LONG ITEM...: bench each ITEM one after another, with LONG's virtualenv, runs,
# records and logs as benchmarks/long_runs.sh lays them out. An ITEM is a recipe name, benched
# with one seed, or a quoted "NAME... [bench options]" (its options win, e.g. --seeds 3); each
# runs with --resume, so a finished one returns at once and a stopped one continues.
LONG=$1; shift
for item in "$@"; do
  read -ra args <<<"$item"
  "$LONG/venv/bin/l2l-recipes" bench --seeds 1 "${args[@]}" --device cpu --resume --runs-dir "$LONG/bench" \
    --results-dir "$LONG/results" --no-progress >>"$LONG/logs/${args[0]}.log" 2>&1
done
