#!/usr/bin/env bash
# The benchmark (DESIGN.md, "Performance targets"): a node's batch throughput against the bare whisper.cpp engine
# on the same cores, for several pool configurations, and the API's submission latency. Prints one table.
#
#   ./bench.sh            the full batch, three rounds (about 4 minutes on 2 idle cores)
#   ./bench.sh --quick    a smaller batch, two rounds, fewer configurations (about 1 minute; also BENCH_QUICK=1)
#   ./bench.sh --help     every option (--configs 1x2,2x1, --rounds N, --json FILE, --strict, ...)
#
# Generated audio and the converted model are cached in ~/.cache/v2t-node-bench. Everything runs on 127.0.0.1;
# nodes and their directories are removed on exit, failure or interrupt.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/v2t-bench.XXXXXX")
child=""

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  # 1. Ask the benchmark to stop: it stops its node and removes its directories itself.
  if [[ -n $child ]] && kill -0 "$child" 2>/dev/null; then
    kill -TERM "$child" 2>/dev/null || true
    wait "$child" 2>/dev/null || true
  fi
  # 2. A node the benchmark could not stop (it was killed first): its pid is in its run directory.
  for pidfile in "$work"/node-*/node.pid; do
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
