#!/usr/bin/env bash
# How long each dashboard page takes to render on the server over a store of N synthetic
# records (issue 14: under 200 ms at 10 M). The records are written by the spend_scale
# example (30 days, 500 keys, 40 teams, runs of 50 requests, an outcome every other run);
# a release gateway serves that store, a session is signed in with curl, and every page is
# fetched five times: the median and the slowest, in ms (curl's time_total on loopback: the
# page is rendered whole before its first byte goes out).
#
#   bench/ui.sh [N]          # N defaults to 10 000 000; DIR=/tmp/tollgate-ui-bench
#   FILL=0 bench/ui.sh       # the store in DIR is already filled (spend_scale also times its
#                            # own reports, minutes at 10 M): only the pages are timed
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000000}
DIR=${DIR:-/tmp/tollgate-ui-bench}
PORT=${PORT:-4190}
ADMIN=tg_ui_bench_admin_key_0123456789
cargo build --release -q -p tollgate --bins --example spend_scale
mkdir -p "$DIR"
if [ "${FILL:-1}" != 0 ]; then
  target/release/examples/spend_scale "sqlite:$DIR" "$N" > "$DIR/fill.jsonl"
fi
printf '[server]\nlisten = "127.0.0.1:%s"\ndata_dir = "%s"\n' "$PORT" "$DIR" > "$DIR/ui.toml"
TOLLGATE_ADMIN_KEY=$ADMIN RUST_LOG=warn target/release/tollgate serve --config "$DIR/ui.toml" 2>"$DIR/gw.log" >/dev/null &
gw=$!
trap 'kill $gw 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done
cookie=$(curl -s -i -X POST "http://127.0.0.1:$PORT/ui/login" -d "key=$ADMIN" | tr -d '\r' | sed -n 's/^set-cookie: \([^;]*\).*/\1/Ip')
[ -n "$cookie" ] || { echo "sign-in failed" >&2; exit 1; }
echo "| page | median ms | slowest ms | status |"
echo "|---|---|---|---|"
for page in "/ui" "/ui?range=30d" "/ui?range=90d" "/ui/keys" "/ui/wallets" "/ui/requests" \
            "/ui/requests?team=team-3&status=429" "/ui/runs" "/ui/runs?range=30d" \
            "/ui/roi" "/ui/roi?by=type&range=30d"; do
  times=(); status=
  for _ in 1 2 3 4 5; do
    line=$(curl -s -o /dev/null -w '%{http_code} %{time_total}' -H "Cookie: $cookie" "http://127.0.0.1:$PORT$page")
    status=${line%% *}; times+=("${line##* }")
  done
  python3 - "$page" "$status" "${times[@]}" <<'PY'
import sys
page, status, *t = sys.argv[1:]
t = sorted(float(x) * 1000 for x in t)
print(f"| `{page}` | {t[2]:.1f} | {t[-1]:.1f} | {status} |")
PY
done
