#!/usr/bin/env bash
# Reproducible benchmark: tollgate in front of the standalone mock provider, against the mock
# called directly and nginx as a plain reverse proxy, in the same run on the same machine.
#
#   bench/run.sh            # needs nginx (apt install nginx-light); builds release binaries
#
# Results (one JSON line per run) go to bench/out/results.jsonl; a Markdown table is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
OUT=bench/out
rm -rf "$OUT"; mkdir -p "$OUT"
SECONDS_PER_RUN=${SECONDS_PER_RUN:-15}
RATE_JSON=${RATE_JSON:-1000}
RATE_STREAM=${RATE_STREAM:-500}
CONC=${CONC:-32}

cargo build --release -q -p tollgate -p tollgate-loadgen
TG=target/release/tollgate
LG=target/release/tollgate-loadgen

pids=()
# KILL, not TERM: a gateway whose store is already gone would spend its grace period
# flushing, and still be running (and using CPU) when the next bench starts.
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; nginx -p "$PWD/$OUT/nginx" -c nginx.conf -s stop 2>/dev/null || true; }
trap cleanup EXIT

$TG mock-provider --listen 127.0.0.1:4010 2>"$OUT/mock.log" & pids+=($!)

cat > "$OUT/tollgate.toml" <<TOML
# Defaults everywhere else: loop guard, retry budgets and coalescing on (the load generator
# numbers every request, so none is a repeat).
[server]
listen = "127.0.0.1:4000"
data_dir = "$OUT/data"
[[providers]]
name = "up"
kind = "openai"
base_url = "http://127.0.0.1:4010/v1"
models = ["mock*"]
[[providers]]
name = "claude"
kind = "anthropic"
base_url = "http://127.0.0.1:4010/v1"
[[models]]
name = "via-claude"
deployments = [{ provider = "claude", model = "mock" }]
TOML
ADMIN=tg_bench_admin_$(date +%s)
TOLLGATE_ADMIN_KEY=$ADMIN RUST_LOG=warn $TG serve --config "$OUT/tollgate.toml" 2>"$OUT/tollgate.log" >/dev/null & pids+=($!)

nginx_start "$OUT" auto

for _ in $(seq 100); do curl -sf http://127.0.0.1:4000/healthz >/dev/null && break; sleep 0.1; done
KEY=$(curl -sf http://127.0.0.1:4000/admin/keys -H "Authorization: Bearer $ADMIN" -d '{"name":"bench"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
# A key whose limits are all on but never reached: measures what the limiter itself costs.
LKEY=$(curl -sf http://127.0.0.1:4000/admin/keys -H "Authorization: Bearer $ADMIN" -d '{"name":"bench-limited","rpm":100000000,"tpm":1000000000000,"concurrency":100000}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')

declare -A URL=( [mock]=http://127.0.0.1:4010 [nginx]=http://127.0.0.1:4020 [tollgate]=http://127.0.0.1:4000 )
for target in mock nginx tollgate; do
  u="${URL[$target]}/v1/chat/completions"
  $LG --url "$u" --key "$KEY" --rate "$RATE_JSON" --seconds "$SECONDS_PER_RUN" --label "$target json fixed" >> "$OUT/results.jsonl"
  $LG --url "$u" --key "$KEY" --rate "$RATE_STREAM" --stream --seconds "$SECONDS_PER_RUN" --label "$target stream fixed" >> "$OUT/results.jsonl"
  $LG --url "$u" --key "$KEY" --concurrency "$CONC" --seconds "$SECONDS_PER_RUN" --label "$target json max" >> "$OUT/results.jsonl"
  $LG --url "$u" --key "$KEY" --concurrency "$CONC" --stream --seconds "$SECONDS_PER_RUN" --label "$target stream max" >> "$OUT/results.jsonl"
done

# Money: a key whose wallet holds every request's maximum cost before the call and captures
# after (one writer transaction each way, group-committed).
WKEY_JSON=$(curl -sf http://127.0.0.1:4000/admin/keys -H "Authorization: Bearer $ADMIN" -d '{"name":"bench-wallet"}')
WKEY=$(echo "$WKEY_JSON" | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
WKEY_ID=$(echo "$WKEY_JSON" | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"]["id"])')
WID=$(curl -sf http://127.0.0.1:4000/admin/wallets -H "Authorization: Bearer $ADMIN" -d "{\"owner\":\"key:$WKEY_ID\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
curl -sf "http://127.0.0.1:4000/admin/wallets/$WID/topup" -H "Authorization: Bearer $ADMIN" -d '{"amount":"1000000"}' >/dev/null
$LG --url http://127.0.0.1:4000/v1/chat/completions --key "$WKEY" --rate "$RATE_JSON" --seconds "$SECONDS_PER_RUN" --label "tollgate-wallet json fixed" >> "$OUT/results.jsonl"
$LG --url http://127.0.0.1:4000/v1/chat/completions --key "$WKEY" --concurrency "$CONC" --seconds "$SECONDS_PER_RUN" --label "tollgate-wallet json max" >> "$OUT/results.jsonl"
curl -sf "http://127.0.0.1:4000/admin/wallets/verify" -H "Authorization: Bearer $ADMIN" > "$OUT/wallet-verify.json"

# The limiter: requests, tokens and concurrency limits on, never reached.
$LG --url http://127.0.0.1:4000/v1/chat/completions --key "$LKEY" --rate "$RATE_JSON" --seconds "$SECONDS_PER_RUN" --label "tollgate-limits json fixed" >> "$OUT/results.jsonl"

# The limiter in Redis mode: a second gateway sharing limits through a local redis-server.
if command -v redis-server >/dev/null; then
  redis-server --port 6390 --bind 127.0.0.1 --save "" --appendonly no >"$OUT/redis.log" 2>&1 & pids+=($!)
  sed -e 's/127.0.0.1:4000/127.0.0.1:4001/' -e "s#$OUT/data#$OUT/data-redis#" "$OUT/tollgate.toml" > "$OUT/tollgate-redis.toml"
  printf '[limits]\nbackend = "redis"\n[limits.redis]\nurl = "redis://127.0.0.1:6390"\n' >> "$OUT/tollgate-redis.toml"
  TOLLGATE_ADMIN_KEY=$ADMIN RUST_LOG=warn $TG serve --config "$OUT/tollgate-redis.toml" 2>"$OUT/tollgate-redis.log" >/dev/null & pids+=($!)
  for _ in $(seq 100); do curl -sf http://127.0.0.1:4001/healthz >/dev/null && break; sleep 0.1; done
  RKEY=$(curl -sf http://127.0.0.1:4001/admin/keys -H "Authorization: Bearer $ADMIN" -d '{"name":"bench-redis","rpm":100000000,"tpm":1000000000000,"concurrency":100000}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
  RNOKEY=$(curl -sf http://127.0.0.1:4001/admin/keys -H "Authorization: Bearer $ADMIN" -d '{"name":"bench-redis-nolimits"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
  $LG --url http://127.0.0.1:4001/v1/chat/completions --key "$RNOKEY" --rate "$RATE_JSON" --seconds "$SECONDS_PER_RUN" --label "tollgate-redis-nolimits json fixed" >> "$OUT/results.jsonl"
  $LG --url http://127.0.0.1:4001/v1/chat/completions --key "$RKEY" --rate "$RATE_JSON" --seconds "$SECONDS_PER_RUN" --label "tollgate-redis-limits json fixed" >> "$OUT/results.jsonl"
  # Hot wallets (on with the Redis limiter): holds decided in Redis, the ledger in the store.
  HW_JSON=$(curl -sf http://127.0.0.1:4001/admin/keys -H "Authorization: Bearer $ADMIN" -d '{"name":"bench-hot-wallet"}')
  HWKEY=$(echo "$HW_JSON" | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
  HWKEY_ID=$(echo "$HW_JSON" | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"]["id"])')
  HWID=$(curl -sf http://127.0.0.1:4001/admin/wallets -H "Authorization: Bearer $ADMIN" -d "{\"owner\":\"key:$HWKEY_ID\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  curl -sf "http://127.0.0.1:4001/admin/wallets/$HWID/topup" -H "Authorization: Bearer $ADMIN" -d '{"amount":"1000000"}' >/dev/null
  $LG --url http://127.0.0.1:4001/v1/chat/completions --key "$HWKEY" --rate "$RATE_JSON" --seconds "$SECONDS_PER_RUN" --label "tollgate-hotwallet json fixed" >> "$OUT/results.jsonl"
  $LG --url http://127.0.0.1:4001/v1/chat/completions --key "$HWKEY" --concurrency "$CONC" --seconds "$SECONDS_PER_RUN" --label "tollgate-hotwallet json max" >> "$OUT/results.jsonl"
  curl -sf "http://127.0.0.1:4001/admin/wallets/verify" -H "Authorization: Bearer $ADMIN" > "$OUT/hot-wallet-verify.json"
else
  echo "redis-server not installed: skipping the Redis limiter run (apt install redis-server)" >&2
fi

# PostgreSQL as the store: wallet holds in its transactions (4002), and hot wallets in Redis
# with the ledger in PostgreSQL (4003). The cluster is a throwaway one, initdb'd here.
if command -v redis-server >/dev/null && pg_start "$PWD/$OUT/pg" 5439; then
  pids+=("$PG_PID"); AS=("${PG_AS[@]}")
  for g in 4002:postgres 4003:hot; do
    port=${g%%:*}; kind=${g##*:}
    sed -e "s/127.0.0.1:4000/127.0.0.1:$port/" -e "s#$OUT/data#$OUT/data-$port#" "$OUT/tollgate.toml" > "$OUT/tollgate-$port.toml"
    printf '[store]\nurl = "postgres://tollgate@127.0.0.1:5439/postgres"\n' >> "$OUT/tollgate-$port.toml"
    if [ "$kind" = hot ]; then
      sed -i 's#postgres"$#tollgate_hot"#' "$OUT/tollgate-$port.toml"
      "${AS[@]}" psql -q -h 127.0.0.1 -p 5439 -U tollgate -d postgres -c 'CREATE DATABASE tollgate_hot'
      printf '[limits]\nbackend = "redis"\n[limits.redis]\nurl = "redis://127.0.0.1:6390"\n' >> "$OUT/tollgate-$port.toml"
    fi
    TOLLGATE_ADMIN_KEY=$ADMIN RUST_LOG=warn $TG serve --config "$OUT/tollgate-$port.toml" 2>"$OUT/tollgate-$port.log" >/dev/null & pids+=($!)
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
    J=$(curl -sf "http://127.0.0.1:$port/admin/keys" -H "Authorization: Bearer $ADMIN" -d '{"name":"bench-pg-wallet"}')
    K=$(echo "$J" | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
    KID=$(echo "$J" | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"]["id"])')
    W=$(curl -sf "http://127.0.0.1:$port/admin/wallets" -H "Authorization: Bearer $ADMIN" -d "{\"owner\":\"key:$KID\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
    curl -sf "http://127.0.0.1:$port/admin/wallets/$W/topup" -H "Authorization: Bearer $ADMIN" -d '{"amount":"1000000"}' >/dev/null
    u="http://127.0.0.1:$port/v1/chat/completions"
    $LG --url "$u" --key "$K" --rate "$RATE_JSON" --seconds "$SECONDS_PER_RUN" --label "tollgate-pg-$kind-wallet json fixed" >> "$OUT/results.jsonl"
    $LG --url "$u" --key "$K" --concurrency "$CONC" --seconds "$SECONDS_PER_RUN" --label "tollgate-pg-$kind-wallet json max" >> "$OUT/results.jsonl"
    # How far the ledger writes are behind: records still queued right after the load.
    curl -sf "http://127.0.0.1:$port/metrics" | grep -E '^tollgate_usage_(queue_depth|records_written_total)' > "$OUT/pg-$kind-queue.txt" || true
  done
else
  echo "PostgreSQL or redis-server not installed: skipping the PostgreSQL runs" >&2
fi

# The translation path: a Chat Completions client served by an Anthropic-dialect deployment.
u=http://127.0.0.1:4000/v1/chat/completions
$LG --url "$u" --key "$KEY" --model via-claude --rate "$RATE_JSON" --seconds "$SECONDS_PER_RUN" --label "tollgate-xlate json fixed" >> "$OUT/results.jsonl"
$LG --url "$u" --key "$KEY" --model via-claude --rate "$RATE_STREAM" --stream --seconds "$SECONDS_PER_RUN" --label "tollgate-xlate stream fixed" >> "$OUT/results.jsonl"

# Every benchmarked request through tollgate was metered: compare with what the loadgen sent.
curl -sf "http://127.0.0.1:4000/admin/usage?by=key" -H "Authorization: Bearer $ADMIN" > "$OUT/usage.json"

python3 bench/report.py "$OUT/results.jsonl" "$OUT/usage.json"
