#!/usr/bin/env bash
# Runs benches side by side on one GPU until they end or DEADLINE seconds pass. Each argument is
# a chain of recipe names joined by commas (benched one after another, e.g. a model's trainer and
# then the variants tested from it); each chain runs in PROCS processes that share the bench's
# runs folder (`bench --resume`: each process trains the seeds no other holds). At the deadline a
# run gets SIGTERM, checkpoints and stops; the same bench command plus --resume continues it
# anywhere, on a GPU or a CPU. In a copy of the repository without git's history, set
# L2L_RECIPES_GIT_COMMIT to the commit it holds, for env.json and the records.
#   DEADLINE=480 BENCH_OPTS="--seeds 3 --episodes 1000" RUNS=DIR RESULTS=DIR \
#     bash benchmarks/gpu_bench.sh protonet-omniglot-5w1s,protonet-omniglot-20w1s
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/bench} RESULTS=${RESULTS:-benchmarks/results} LOGS=${LOGS:-$RUNS/logs}
DEADLINE=${DEADLINE:-3600} PROCS=${PROCS:-3} DEVICE=${DEVICE:-cuda} L2L=${L2L:-l2l-recipes}
BENCH_OPTS=${BENCH_OPTS:-}
mkdir -p "$LOGS"
end=$((SECONDS + DEADLINE))

chain() {  # chain LOG NAME...: bench each NAME in turn until the deadline
  local log=$1 name left; shift
  for name in "$@"; do
    left=$((end - SECONDS))
    [ "$left" -gt 0 ] || return 0
    # shellcheck disable=SC2086
    timeout -s TERM -k 60 "$left" "$L2L" bench "$name" $BENCH_OPTS --device "$DEVICE" \
      --resume --runs-dir "$RUNS" --results-dir "$RESULTS" --no-progress >>"$log" 2>&1 || return 0
  done
}

for spec in "$@"; do
  for p in $(seq "$PROCS"); do
    chain "$LOGS/${spec%%,*}-$p.log" ${spec//,/ } &
    sleep 3  # the first process takes seed 1, the next seed 2, ...
  done
done
wait
for log in "$LOGS"/*.log; do echo "== $log"; tail -n 4 "$log"; done
