#!/usr/bin/env bash
# The capacity-planning benchmark (issue 17): each proxy alone on core 1 (`taskset -c 1`), the
# mock provider, the load generator and Redis on core 0, nginx as a plain reverse proxy measured
# in the same run. For every scenario a fresh gateway is started, loaded, and its CPU time
# (utime + stime from /proc) divided by completed requests; its peak RSS (VmHWM) is read at the
# end, so each scenario's memory is its own.
#
#   [REPEAT=N] bench/pinned.sh [BIN...]  # default target/release/tollgate (built); needs nginx-light,
#                             # redis-server for the `hot` scenario
#
# Scenarios (SCENARIOS="minimal policies wallet memory hot"):
#   minimal   auth and metering only: no limits, loop guard off, no coalescing
#   policies  limits (per key, high enough never to refuse), loop guard in warn mode, retry
#             damping, coalescing, metering: the defaults a production gateway runs
#   wallet    policies + a wallet on the key: a hold in the store before every call
#   memory    the same wallet, holds decided in the gateway's memory and written with their
#             settle ([wallets] backend = "memory", ADR 0036)
#   hot       policies with the Redis limiter + hot wallets: holds in Redis
#   cachemiss policies + the response cache: every request a miss whose answer is kept
#   cachehit  the same with 64 distinct bodies: every measured request a cache hit
#   otel      policies + every request traced and exported as OTLP/HTTP protobuf to a sink
#             on core 0 that reads and discards (bench/otlp_sink.py)
#   clickhouse  wallet + [analytics] ClickHouse: every record and its capture also inserted
#             into a clickhouse-server this script starts on core 0 (or the one at $CH_URL);
#             afterwards the records ClickHouse holds are checked against the store's
# Every request body is unique (bench/loadgen numbers them), so no policy refuses one; but
# cachehit's, which repeat.
#
# One JSON line per run in bench/out-pinned/results.jsonl, a Markdown table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
OUT=bench/out-pinned
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
RATE=${RATE:-1000}
CONC=${CONC:-32}
SCENARIOS=${SCENARIOS:-minimal policies wallet memory hot}
rm -rf "$OUT"; mkdir -p "$OUT"

# Several binaries (a base and a head, say) are measured in the same run, scenario by scenario,
# each labelled with its file name.
if [ $# -ge 1 ]; then BINS=("$@"); else
  cargo build --release -q -p tollgate -p tollgate-loadgen
  BINS=(target/release/tollgate)
fi
TG=${BINS[0]}
cargo build --release -q -p tollgate-loadgen
LG=target/release/tollgate-loadgen

pids=()
# KILL, not TERM: a gateway would otherwise spend its grace period flushing while the next
# scenario runs.
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; nginx -p "$PWD/$OUT/nginx" -c nginx.conf -s stop 2>/dev/null || true; }
trap cleanup EXIT

taskset -c 0 "$TG" mock-provider --listen 127.0.0.1:4010 2>"$OUT/mock.log" & pids+=($!); disown $!
if command -v redis-server >/dev/null; then
  taskset -c 0 redis-server --port 6391 --bind 127.0.0.1 --save "" --appendonly no >"$OUT/redis.log" 2>&1 & pids+=($!); disown $!
fi

case " $SCENARIOS " in *" clickhouse "*)
  if [ -z "${CH_URL:-}" ]; then
    ch_dir="$PWD/$OUT/clickhouse"; mkdir -p "$ch_dir"/{data,tmp,files,schemas}
    printf '<?xml version="1.0"?><yandex><profiles><default></default></profiles><users><default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users><quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors><result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas></yandex>' > "$ch_dir/users.xml"
    printf '<?xml version="1.0"?><yandex><logger><level>warning</level><console>1</console></logger><http_port>18124</http_port><tcp_port>19001</tcp_port><listen_host>127.0.0.1</listen_host><path>%s/data/</path><tmp_path>%s/tmp/</tmp_path><user_files_path>%s/files/</user_files_path><format_schema_path>%s/schemas/</format_schema_path><users_config>%s/users.xml</users_config><default_profile>default</default_profile><default_database>default</default_database><mark_cache_size>268435456</mark_cache_size></yandex>' "$ch_dir" "$ch_dir" "$ch_dir" "$ch_dir" "$ch_dir" > "$ch_dir/config.xml"
    taskset -c 0 clickhouse-server --config-file="$ch_dir/config.xml" >"$OUT/clickhouse.log" 2>&1 & pids+=($!); disown $!
    export CH_URL=http://127.0.0.1:18124
    for _ in $(seq 200); do curl -sf "$CH_URL/" -d 'SELECT 1' >/dev/null && break; sleep 0.1; done
  fi ;;
esac

case " $SCENARIOS " in *" otel "*)
  taskset -c 0 python3 bench/otlp_sink.py 4318 >"$OUT/otlp.log" 2>&1 & pids+=($!); disown $! ;;
esac

nginx_start "$OUT" 1 taskset -c 1
peak_rss_kb() { local t=0; for p in "$@"; do t=$((t + $(awk '/VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0))); done; echo "$t"; }
TCK=$(getconf CLK_TCK)

run() { # scenario label url key pids...
  local scenario=$1 label=$2 url=$3 key=$4; shift 4
  local before after line
  # Warm-up outside the measured window: its CPU and its requests are not counted.
  taskset -c 0 $LG --url "$url" --key "$key" "${LGARGS[@]}" --warmup 0 --seconds 1 --label warmup >/dev/null
  before=$(cpu_ticks "$@")
  line=$(taskset -c 0 $LG --url "$url" --key "$key" "${LGARGS[@]}" --warmup 0 --seconds "$SECONDS_PER_RUN" --label "$label")
  after=$(cpu_ticks "$@")
  python3 - "$line" "$before" "$after" "$TCK" "$scenario" <<'PY' >> "$OUT/results.jsonl"
import json, sys
r = json.loads(sys.argv[1]); before, after, tck = map(int, sys.argv[2:5])
r["scenario"] = sys.argv[5]
r["cpu_us_per_request"] = (after - before) * 1e6 / tck / max(r["requests"], 1)
print(json.dumps(r))
PY
}

loads() { # scenario url key pids...
  local s=$1 url=$2 key=$3; shift 3
  local extra=(); [ "${s##*-}" = cachehit ] && extra=(--distinct 64)
  LGARGS=(--concurrency "$CONC" "${extra[@]}"); run "$s" "$s json max" "$url" "$key" "$@"
  LGARGS=(--concurrency "$CONC" --stream "${extra[@]}"); run "$s" "$s stream max" "$url" "$key" "$@"
  LGARGS=(--rate "$RATE" "${extra[@]}"); run "$s" "$s json $RATE/s" "$url" "$key" "$@"
  LGARGS=(--rate "$RATE" --stream "${extra[@]}"); run "$s" "$s stream $RATE/s" "$url" "$key" "$@"
  echo "{\"scenario\":\"$s\",\"peak_rss_kb\":$(peak_rss_kb "$@")}" >> "$OUT/rss.jsonl"
}

ADMIN=tg_bench_admin_$(date +%s)
port=4100
# REPEAT=N measures everything N times, interleaved (nginx, then each scenario with each
# binary, then again): this machine's speed drifts by tens of percent within minutes, and
# the table's medians say more than any one run.
for rep in $(seq "${REPEAT:-1}"); do
# shellcheck disable=SC2086
loads nginx http://127.0.0.1:4020/v1/chat/completions none $NGINX_PIDS
for s in $SCENARIOS; do
  for TG in "${BINS[@]}"; do
  port=$((port + 1))
  label=$s; [ ${#BINS[@]} -gt 1 ] && label="$(basename "$TG")-$s"
  if [ "$s" = hot ] && ! command -v redis-server >/dev/null; then echo "no redis-server: skipping hot" >&2; continue; fi
  gateway_config "$OUT/$label.toml" "$port" "$OUT/data-$label-$rep" "$s"
  TOLLGATE_ADMIN_KEY=$ADMIN RUST_LOG=warn taskset -c 1 "$TG" serve --config "$OUT/$label.toml" 2>"$OUT/$label.log" >/dev/null & pids+=($!)
  pid=$!; disown "$pid"
  wait_healthy "$port"
  KEY=$(bench_key "$port" "$ADMIN" "$s")
  loads "$label" "http://127.0.0.1:$port/v1/chat/completions" "$KEY" "$pid"
  if [ "$s" = wallet ] || [ "$s" = memory ] || [ "$s" = hot ]; then
    curl -sf "http://127.0.0.1:$port/admin/wallets/verify" -H "Authorization: Bearer $ADMIN" > "$OUT/$label-verify.json" || echo "wallet verify failed for $label" >&2
  fi
  if [ "$s" = clickhouse ]; then
    # What the sink had to catch up on when the load stopped, then whether ClickHouse holds
    # every record the store does, once.
    curl -sf "http://127.0.0.1:$port/metrics" | grep -E '^tollgate_analytics_(queue_depth|lag_seconds|spill_bytes|records_[a-z]+_total) ' > "$OUT/$label-analytics.txt" || true
    sleep 3
    store=$(curl -sf "http://127.0.0.1:$port/admin/usage?by=key&source=store" -H "Authorization: Bearer $ADMIN" | python3 -c 'import json,sys; print(sum(r["requests"] for r in json.load(sys.stdin)))')
    ch=$(curl -sf "$CH_URL/" -d "SELECT count(), uniqExact(id) FROM bench_$port.usage" | tr '\t' ' ')
    ledger=$(curl -sf "$CH_URL/" -d "SELECT count() FROM bench_$port.ledger")
    echo "store records $store; clickhouse usage (rows, distinct ids) $ch; ledger rows $ledger" >> "$OUT/$label-analytics.txt"
    cat "$OUT/$label-analytics.txt" >&2
  fi
  kill -9 "$pid" 2>/dev/null || true
  done
done
done

python3 - "$OUT/results.jsonl" "$OUT/rss.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
rss = {}
for r in map(json.loads, open(sys.argv[2])):
    rss[r["scenario"]] = max(rss.get(r["scenario"], 0), r["peak_rss_kb"])
# With REPEAT, one row per label: the median of each figure over the repetitions.
groups = {}
for r in runs:
    groups.setdefault(r["label"], []).append(r)
def median(rs):
    m = dict(rs[0])
    for k in ("achieved_rps", "cpu_us_per_request"):
        m[k] = statistics.median(r[k] for r in rs)
    m["ms"] = {k: statistics.median(r["ms"][k] for r in rs) for k in ("p50", "p99")}
    m["errors"] = sum(r["errors"] for r in rs)
    return m
rows = [median(rs) for rs in groups.values()]
ng = {r["label"].split(" ", 1)[1]: r for r in rows if r["scenario"] == "nginx"}
n_rep = max(len(rs) for rs in groups.values())
print("proxy pinned to one core; load generator, mock and Redis on the other" + (f"; medians of {n_rep} runs" if n_rep > 1 else "") + "\n")
print("| scenario | load | rps | × nginx rps | errors | p50 ms | p99 ms | CPU µs/req | × nginx CPU |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    load = r["label"].split(" ", 1)[1]
    n = ng[load]
    print(f"| {r['scenario']} | {load} | {r['achieved_rps']:.0f} | {r['achieved_rps'] / max(n['achieved_rps'], 1):.2f} | {r['errors']} | {r['ms']['p50']:.3f} | {r['ms']['p99']:.3f} | {r['cpu_us_per_request']:.1f} | {r['cpu_us_per_request'] / n['cpu_us_per_request'] if n['cpu_us_per_request'] else float('nan'):.2f} |")
print("\n| scenario | peak RSS MB (highest) |\n|---|---|")
for s, kb in rss.items():
    print(f"| {s} | {kb / 1024:.1f} |")
PY
