#!/usr/bin/env bash
# Before/after: two tollgate builds (a base commit and the work tree) against nginx, in the
# pinned one-core mode: the proxy under test alone on core 1, the mock provider and the load
# generator on core 0. Reports throughput, latency and CPU microseconds per request of the
# proxy process (utime + stime from /proc), and each proxy's ratio to nginx.
#
#   bench/compare.sh [BASE_REV]     # default: HEAD~1; needs nginx (apt install nginx-light)
#
# One JSON line per run in bench/out-compare/results.jsonl, a Markdown table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
BASE=${1:-HEAD~1}
OUT=bench/out-compare
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
RATE=${RATE:-1000}
CONC=${CONC:-16}
rm -rf "$OUT"; mkdir -p "$OUT"

cargo build --release -q -p tollgate -p tollgate-loadgen
cp target/release/tollgate "$OUT/tollgate-head"
LG=target/release/tollgate-loadgen
git worktree remove --force "$OUT/base-src" 2>/dev/null || true
git worktree add -f -q "$OUT/base-src" "$BASE"
CARGO_TARGET_DIR="$PWD/target/bench-base" cargo build --release -q --manifest-path "$OUT/base-src/Cargo.toml" -p tollgate
cp target/bench-base/release/tollgate "$OUT/tollgate-base"
git worktree remove --force "$OUT/base-src"

pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; nginx -p "$PWD/$OUT/nginx" -c nginx.conf -s stop 2>/dev/null || true; }
trap cleanup EXIT

taskset -c 0 "$OUT/tollgate-head" mock-provider --listen 127.0.0.1:4010 2>"$OUT/mock.log" & pids+=($!)

nginx_start "$OUT" 1 taskset -c 1
TCK=$(getconf CLK_TCK)

run() { # label url key pids...
  local label=$1 url=$2 key=$3; shift 3
  local before after line
  before=$(cpu_ticks "$@")
  line=$(taskset -c 0 $LG --url "$url" --key "$key" "${LGARGS[@]}" --warmup 0 --seconds "$SECONDS_PER_RUN" --label "$label")
  after=$(cpu_ticks "$@")
  python3 - "$line" "$before" "$after" "$TCK" <<'PY' >> "$OUT/results.jsonl"
import json, sys
r = json.loads(sys.argv[1]); before, after, tck = map(int, sys.argv[2:])
r["cpu_us_per_request"] = (after - before) * 1e6 / tck / max(r["requests"], 1)
print(json.dumps(r))
PY
}

ADMIN=tg_bench_admin_$(date +%s)
for build in base head; do
  port=$([ "$build" = base ] && echo 4000 || echo 4001)
  gateway_config "$OUT/$build.toml" "$port" "$OUT/data-$build" default
  TOLLGATE_ADMIN_KEY=$ADMIN RUST_LOG=warn taskset -c 1 "$OUT/tollgate-$build" serve --config "$OUT/$build.toml" 2>"$OUT/$build.log" >/dev/null & pids+=($!)
  eval "PID_$build=$!"
  wait_healthy "$port"
  eval "KEY_$build=$(curl -sf "http://127.0.0.1:$port/admin/keys" -H "Authorization: Bearer $ADMIN" -d '{"name":"bench"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')"
done

for mode in fixed max; do
  if [ "$mode" = fixed ]; then LGARGS=(--rate "$RATE"); else LGARGS=(--concurrency "$CONC"); fi
  # shellcheck disable=SC2086
  run "nginx json $mode" http://127.0.0.1:4020/v1/chat/completions none $NGINX_PIDS
  run "base json $mode" http://127.0.0.1:4000/v1/chat/completions "$KEY_base" "$PID_base"
  run "head json $mode" http://127.0.0.1:4001/v1/chat/completions "$KEY_head" "$PID_head"
  LGARGS+=(--stream)
  # shellcheck disable=SC2086
  run "nginx stream $mode" http://127.0.0.1:4020/v1/chat/completions none $NGINX_PIDS
  run "base stream $mode" http://127.0.0.1:4000/v1/chat/completions "$KEY_base" "$PID_base"
  run "head stream $mode" http://127.0.0.1:4001/v1/chat/completions "$KEY_head" "$PID_head"
done

python3 - "$OUT/results.jsonl" "$BASE" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {r["label"]: r for r in rows}
print(f"base = {sys.argv[2]}, head = the work tree; proxy pinned to one core\n")
print("| run | rps | errors | p50 ms | p99 ms | CPU µs/req | × nginx CPU |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    who, kind, mode = r["label"].split()
    ng = by[f"nginx {kind} {mode}"]["cpu_us_per_request"]
    print(f"| {r['label']} | {r['achieved_rps']:.0f} | {r['errors']} | {r['ms']['p50']:.3f} | {r['ms']['p99']:.3f} | {r['cpu_us_per_request']:.1f} | {r['cpu_us_per_request'] / ng if ng else float('nan'):.2f} |")
PY
