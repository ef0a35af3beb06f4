#!/usr/bin/env bash
# Where the gateway's CPU goes under load: the gateway pinned to core 1 with one scenario of
# bench/pinned.sh, closed-loop load from core 0, `perf record` (Debian linux-perf) on the
# gateway for the measured seconds. Prints CPU per thread and the top symbols, self time
# (a symbol table to compare before/after); perf.data stays in bench/out-profile/.
#
#   bench/profile.sh [SCENARIO] [--stream]   # SCENARIO: minimal | policies (default) | wallet | default (see bench/lib.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
OUT=bench/out-profile
S=${1:-policies}
STREAM=${2:-}
SECS=${SECS:-8}
CONC=${CONC:-32}
rm -rf "$OUT"; mkdir -p "$OUT"
cargo build --release -q -p tollgate -p tollgate-loadgen
TG=target/release/tollgate
LG=target/release/tollgate-loadgen
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
taskset -c 0 $TG mock-provider --listen 127.0.0.1:4010 2>"$OUT/mock.log" & pids+=($!)
gateway_config "$OUT/tg.toml" 4099 "$OUT/data" "$S"
ADMIN=tg_profile_admin
TOLLGATE_ADMIN_KEY=$ADMIN RUST_LOG=warn taskset -c 1 $TG serve --config "$OUT/tg.toml" 2>"$OUT/tg.log" >/dev/null & pids+=($!)
PID=$!
wait_healthy 4099
KEY=$(bench_key 4099 "$ADMIN" "$S")
ARGS=(--url http://127.0.0.1:4099/v1/chat/completions --key "$KEY" --concurrency "$CONC")
[ "$STREAM" = --stream ] && ARGS+=(--stream)
taskset -c 0 $LG "${ARGS[@]}" --warmup 0 --seconds 2 >/dev/null
taskset -c 0 $LG "${ARGS[@]}" --warmup 0 --seconds "$SECS" --label "profile $S $STREAM" > "$OUT/load.json" &
LOAD=$!
perf record -F ${FREQ:-1999} ${CALLGRAPH:--g} -p "$PID" -o "$OUT/perf.data" -- sleep "$SECS" 2>"$OUT/perf.log" >/dev/null
wait $LOAD
cat "$OUT/load.json"
echo "## CPU by thread"
perf report -i "$OUT/perf.data" --no-children --sort comm --stdio 2>/dev/null | grep -E "^ +[0-9]" | sed "s/ *$//" | head -10
echo "## top symbols (self)"
perf report -i "$OUT/perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null | grep -E "^ +[0-9]" | sed "s/ *- *- *$//" | head -${TOP:-45}
