# Shared by the bench scripts (sourced): nginx as the reference proxy, CPU time from /proc, and
# the gateway scenarios of bench/pinned.sh.

# nginx_start OUT WORKERS [TASKSET_PREFIX...]: a plain reverse proxy on :4020 to the mock on
# :4010 (keep-alive upstream, buffering off), its pids in NGINX_PIDS.
nginx_start() {
  local out=$1 workers=$2; shift 2
  mkdir -p "$out/nginx/logs"
  cat > "$out/nginx/nginx.conf" <<NGINX
worker_processes $workers;
pid nginx.pid;
error_log logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream mock { server 127.0.0.1:4010; keepalive 256; }
  server {
    listen 127.0.0.1:4020;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
NGINX
  "$@" nginx -p "$PWD/$out/nginx" -c nginx.conf
  NGINX_PIDS=$(pgrep -f "nginx: (master|worker)" | tr '\n' ' ')
}

cpu_ticks() { # total utime+stime of the given pids, in clock ticks
  local t=0
  for p in "$@"; do
    if [ -r "/proc/$p/stat" ]; then
      set -- $(sed 's/^.*) //' "/proc/$p/stat")
      t=$((t + ${12} + ${13}))
    fi
  done
  echo "$t"
}

# gateway_config FILE PORT DATA_DIR SCENARIO [REDIS_URL]: a gateway in front of the mock.
#   default   the shipped defaults
#   minimal   auth and metering only: no limits, loop guard off, no coalescing
#   policies  limits, loop guard in warn mode, retry damping, coalescing, metering
#   wallet    policies (the key gets a wallet: see bench_key)
#   memory    wallet, holds decided in the gateway's memory ([wallets] backend = "memory")
#   hot       policies with the Redis limiter and hot wallets
#   cachemiss policies with the response cache on: every body unique, every request a miss kept
#   cachehit  the same, with 64 distinct bodies (pinned.sh): every measured request a hit
#   otel      policies with every request traced (sample_ratio 1) to the OTLP sink on :4318
#   clickhouse  wallet, and every record and capture also sent to ClickHouse at $CH_URL
gateway_config() {
  local file=$1 port=$2 data=$3 scenario=$4 redis=${5:-redis://127.0.0.1:6391}
  cat > "$file" <<TOML
[server]
listen = "127.0.0.1:$port"
data_dir = "$data"
[[providers]]
name = "up"
kind = "openai"
base_url = "http://127.0.0.1:4010/v1"
models = ["mock*"]
TOML
  case $scenario in
    minimal) printf '[limits]\nrpm = 0\ntpm = 0\nconcurrency = 0\n[limits.team]\nrpm = 0\ntpm = 0\nconcurrency = 0\n[loop_guard]\nenabled = false\n[retries]\ncoalesce = false\n' >> "$file" ;;
    policies|wallet) printf '[loop_guard]\naction = "warn"\n' >> "$file" ;;
    memory) printf '[loop_guard]\naction = "warn"\n[wallets]\nbackend = "memory"\n' >> "$file" ;;
    clickhouse) printf '[loop_guard]\naction = "warn"\n[analytics]\nbackend = "clickhouse"\nurl = "%s"\ndatabase = "bench_%s"\n' "${CH_URL:-http://127.0.0.1:18123}" "$port" >> "$file" ;;
    otel) printf '[loop_guard]\naction = "warn"\n[otel]\nendpoint = "http://127.0.0.1:4318"\nsample_ratio = 1.0\n' >> "$file" ;;
    hot) printf '[loop_guard]\naction = "warn"\n[limits]\nbackend = "redis"\n[limits.redis]\nurl = "%s"\n' "$redis" >> "$file" ;;
    # Repeats of a body are what a cache is for: not retries to budget.
    cachemiss|cachehit) printf '[loop_guard]\naction = "warn"\n[retries]\nsame_request_within = "0s"\n[cache]\nenabled = true\n' >> "$file" ;;
  esac
  # EXTRA_TOML: sections to add, for a one-off comparison ('[metering]\nlinger = "0s"').
  if [ -n "${EXTRA_TOML:-}" ]; then printf '%b\n' "$EXTRA_TOML" >> "$file"; fi
}

# bench_key PORT ADMIN SCENARIO: prints a key's secret; limits high enough never to refuse
# (none for minimal), and a wallet with $1 000 000 for wallet, memory, hot and clickhouse.
bench_key() {
  local port=$1 admin=$2 scenario=$3 limits j kid wid
  limits='"rpm":100000000,"tpm":1000000000000,"concurrency":100000'
  [ "$scenario" = minimal ] && limits='"rpm":0'
  j=$(curl -sf "http://127.0.0.1:$port/admin/keys" -H "Authorization: Bearer $admin" -d "{\"name\":\"bench\",$limits}")
  if [ "$scenario" = wallet ] || [ "$scenario" = memory ] || [ "$scenario" = hot ] || [ "$scenario" = clickhouse ]; then
    kid=$(echo "$j" | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"]["id"])')
    wid=$(curl -sf "http://127.0.0.1:$port/admin/wallets" -H "Authorization: Bearer $admin" -d "{\"owner\":\"key:$kid\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
    curl -sf "http://127.0.0.1:$port/admin/wallets/$wid/topup" -H "Authorization: Bearer $admin" -d '{"amount":"1000000"}' >/dev/null
  fi
  echo "$j" | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])'
}

wait_healthy() { for _ in $(seq 100); do curl -sf "http://127.0.0.1:$1/healthz" >/dev/null && return; sleep 0.1; done; }

# pg_start DIR PORT [TASKSET_PREFIX...]: a throwaway PostgreSQL cluster (initdb'd in DIR,
# trust auth, user tollgate) on 127.0.0.1:PORT; its run-as prefix in PG_AS, its binaries in
# PG_BIN. Fails if there
# is no PostgreSQL server binary.
pg_start() {
  local dir=$1 port=$2 bin; shift 2
  bin=$(dirname "$(command -v initdb 2>/dev/null || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | tail -1)")
  [ -x "$bin/postgres" ] || return 1
  PG_BIN=$bin
  mkdir -p "$dir"
  PG_AS=(); if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$dir"; PG_AS=(runuser -u postgres --); fi
  "${PG_AS[@]}" "$bin/initdb" -D "$dir/data" -U tollgate -A trust --no-sync >/dev/null
  "${PG_AS[@]}" "$@" "$bin/postgres" -D "$dir/data" -p "$port" -h 127.0.0.1 -k "$dir" >"$dir/pg.log" 2>&1 &
  PG_PID=$!
  for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done; sleep 1
}
