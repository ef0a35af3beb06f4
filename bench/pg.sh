#!/usr/bin/env bash
# Wallet holds with PostgreSQL as the store (issue 17, item 4): the gateway alone on core 1;
# PostgreSQL, the mock and the load generator on core 0. Per binary: a fresh database, a key
# with a wallet, then closed-loop loads at 32 and 64 connections and a fixed 1 000 req/s; the
# admitted rate, errors (503 wallet_unavailable when a hold waits past hold_timeout), latency,
# the gateway's CPU per request, and how far the writer is behind at the end (usage queue).
#
#   bench/pg.sh [BIN...]   # default target/release/tollgate; needs a PostgreSQL server
#                          # (Debian's postgresql) and runs as root or as a user that can
#                          # run initdb
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
OUT=bench/out-pg
SECONDS_PER_RUN=${SECONDS_PER_RUN:-8}
rm -rf "$OUT"; mkdir -p "$OUT"
if [ $# -ge 1 ]; then BINS=("$@"); else
  cargo build --release -q -p tollgate
  BINS=(target/release/tollgate)
fi
cargo build --release -q -p tollgate-loadgen
LG=target/release/tollgate-loadgen
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ -n "${PG_BIN:-}" ] && "${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PWD/$OUT/pg/data" stop -m immediate >/dev/null 2>&1 || true
}
trap cleanup EXIT
pg_start "$PWD/$OUT/pg" 5439 taskset -c 0 || { echo "no PostgreSQL server (apt install postgresql)" >&2; exit 1; }
taskset -c 0 "${BINS[0]}" mock-provider --listen 127.0.0.1:4010 2>"$OUT/mock.log" & pids+=($!)
ADMIN=tg_bench_admin_$(date +%s)
TCK=$(getconf CLK_TCK)
i=0
for TG in "${BINS[@]}"; do
  i=$((i + 1)); port=$((4200 + i)); label=$(basename "$TG")
  "${PG_AS[@]}" psql -q -h 127.0.0.1 -p 5439 -U tollgate -d postgres -c "CREATE DATABASE bench$i"
  gateway_config "$OUT/$label.toml" "$port" "$OUT/data-$i" wallet
  printf '[store]\nurl = "postgres://tollgate@127.0.0.1:5439/bench%s"\n' "$i" >> "$OUT/$label.toml"
  TOLLGATE_ADMIN_KEY=$ADMIN RUST_LOG=warn taskset -c 1 "$TG" serve --config "$OUT/$label.toml" 2>"$OUT/$label.log" >/dev/null & pid=$!; pids+=($pid)
  wait_healthy "$port"
  KEY=$(bench_key "$port" "$ADMIN" wallet)
  for load in "--concurrency 32" "--concurrency 64" "--rate 1000"; do
    before=$(cpu_ticks "$pid")
    # shellcheck disable=SC2086
    line=$(taskset -c 0 $LG --url "http://127.0.0.1:$port/v1/chat/completions" --key "$KEY" $load --warmup 1 --seconds "$SECONDS_PER_RUN" --label "$label pg-wallet ${load#--}")
    after=$(cpu_ticks "$pid")
    queue=$(curl -sf "http://127.0.0.1:$port/metrics" | awk '/^tollgate_usage_queue_depth/ {print $2}')
    python3 - "$line" "$before" "$after" "$TCK" "${queue:-0}" <<'PY' | tee -a "$OUT/results.jsonl"
import json, sys
r = json.loads(sys.argv[1]); before, after, tck = map(int, sys.argv[2:5])
r["cpu_us_per_request"] = round((after - before) * 1e6 / tck / max(r["requests"], 1), 1)
r["usage_queue_after"] = int(float(sys.argv[5]))
print(json.dumps(r))
PY
  done
  curl -sf "http://127.0.0.1:$port/admin/wallets/verify" -H "Authorization: Bearer $ADMIN" > "$OUT/$label-verify.json" || echo "wallet verify failed for $label" >&2
  kill -9 "$pid" 2>/dev/null || true
done
python3 - "$OUT/results.jsonl" <<'PY'
import json, sys
print("| run | admitted rps | errors | p50 ms | p99 ms | CPU µs/req | usage queue after |")
print("|---|---|---|---|---|---|---|")
for r in map(json.loads, open(sys.argv[1])):
    print(f"| {r['label']} | {r['achieved_rps']:.0f} | {r['errors']} | {r['ms']['p50']:.1f} | {r['ms']['p99']:.1f} | {r['cpu_us_per_request']:.0f} | {r['usage_queue_after']} |")
PY
