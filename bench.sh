#!/usr/bin/env bash
# The benchmark (DESIGN.md, "Performance targets"): ratios, all measured in one run on this machine. Sections:
#   engine   a node's batch throughput against the bare whisper.cpp engine on the same cores, for several pool
#            configurations, and the API's submission latency
#   cache    a hit in the LRU file cache against a fetch of the same 50 MiB object from S3 (moto's server)
#   scaling  the batch through 2 nodes with one core each against 1 node with one core (shared valkey and store)
#
#   ./bench.sh                   every section: full batch, three rounds (about 6.5 minutes on 2 idle cores)
#   ./bench.sh --quick           a smaller batch, two rounds, fewer configurations and repetitions (about 2
#                                minutes; also BENCH_QUICK=1)
#   ./bench.sh --sections cache,scaling     only those sections (engine,cache,scaling; default all)
#   ./bench.sh --help            every option (--configs 1x2,2x1, --rounds N, --cache-repeats N, --json FILE, ...)
#
# Generated audio and the converted model are cached in ~/.cache/v2t-node-bench. Everything runs on 127.0.0.1;
# nodes, servers (valkey, moto) and their directories are removed on exit, failure or interrupt.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/v2t-bench.XXXXXX")
child=""

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  # 1. Ask the benchmark to stop: it stops its nodes and servers and removes their directories itself.
  if [[ -n $child ]] && kill -0 "$child" 2>/dev/null; then
    kill -TERM "$child" 2>/dev/null || true
    wait "$child" 2>/dev/null || true
  fi
  # 2. What the benchmark could not stop (it was killed first): each process runs in a session of its own and
  #    left its pid in its run directory (node-*/node.pid, valkey-*/valkey.pid, moto-*/moto.pid).
  for pidfile in "$work"/*/*.pid; do
    [[ -f $pidfile ]] || continue
    pid=$(<"$pidfile")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# In the background, so the traps run while it works (bash defers traps until a foreground child exits).
BENCH_WORKDIR="$work" "$PYTHON" -m tests.benchmark "$@" &
child=$!
wait "$child"
