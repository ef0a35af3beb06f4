#!/usr/bin/env bash
# Regenerates the tool-output corpus (bench/corpus/tool-outputs) from real commands run on
# this machine: what an agent's shell and API tools hand back to a model. Each file is cut to
# a size an agent harness would pass on (a few to a few tens of KiB). Run from the repo root.
set -eu  # no pipefail: `head -c` closing early is how outputs are cut
out=bench/corpus/tool-outputs
mkdir -p "$out"
cap() { head -c "${2:-40000}" > "$out/$1"; }
tty() { PAGER=cat GIT_PAGER=cat script -qec "$1" /dev/null < /dev/null; }  # a pseudo-terminal, so tools print their colours

# A test runner, in colour, as an agent's terminal shows it.
tty "cargo test -p tollgate-proto --color always" 2>&1 | cap cargo-test-color.txt
# Version control.
git log --stat -n 30 | cap git-log.txt
git show --stat -p HEAD~2 | cap git-show.txt 30000
tty "git --no-pager -c color.ui=always log --oneline --graph -n 120" | cap git-graph-color.txt
# A directory listing, and a recursive one.
ls -la /usr/lib/x86_64-linux-gnu | cap ls-la.txt 30000
find /usr/share/doc -maxdepth 2 | sort | cap find.txt 30000
# A JSON API answer, pretty-printed as most APIs and tools return it.
cargo metadata --format-version 1 --no-deps | python3 -m json.tool --indent 2 | cap api-metadata.json 40000
python3 - <<'PY' | cap api-records.json 40000
import json, subprocess
log = subprocess.run(["git", "log", "-n", "60", "--format=%H%x1f%an%x1f%aI%x1f%s"],
                     capture_output=True, text=True).stdout.splitlines()
items = []
for i, l in enumerate(log):
    sha, author, date, subject = l.split("\x1f")
    items.append({"id": i + 1, "sha": sha, "author": {"login": author, "type": "User", "site_admin": False},
                  "created_at": date, "title": subject[:120], "state": "closed" if i % 3 else "open",
                  "labels": [{"name": "gateway", "color": "ededed", "default": False}],
                  "comments": i % 7, "draft": False, "url": f"https://api.example.com/repos/x/y/pulls/{i + 1}"})
print(json.dumps({"total_count": len(items), "incomplete_results": False, "items": items}, indent=2))
PY
# Stack traces: Python (a recursion, which repeats frames) and Node.
python3 -c 'import json
def walk(n): return walk(n + 1)
walk(0)' 2>&1 | cap python-recursion.txt 30000 || true
python3 - 2>&1 <<'PY' | cap python-traceback.txt 20000 || true
import json, urllib.parse
def load(p):
    with open(p) as f:
        return json.load(f)
def main():
    for p in ["/etc/hostname", "/etc/os-release"]:
        try:
            load(p)
        except Exception as e:
            import traceback; traceback.print_exc()
    load("/nonexistent/config.json")
main()
PY
node -e 'function a(n){ if(n>40) throw new Error("connect ECONNREFUSED 127.0.0.1:5432"); return a(n+1) } try { a(0) } catch (e) { console.error(e.stack); } JSON.parse("{bad")' 2>&1 | cap node-error.txt 20000 || true
# A package manager's log, in colour, with its repeated lines.
tty "npm --color always --loglevel http view left-pad versions" 2>&1 | cap npm-view-color.txt 20000 || true
# An HTML page fetched by a browsing tool.
cap manual.html 40000 < /usr/share/doc/bzip2/manual.html
# A service log with retries, as `journalctl`/`kubectl logs` shows it.
python3 - <<'PY' | cap service-log.txt 60000
import datetime
t = datetime.datetime(2026, 12, 3, 11, 0, 0)
lines = []
for i in range(480):
    t += datetime.timedelta(milliseconds=37)
    if 200 <= i < 320:
        lines.append("WARN tollgate::metering: usage batch write failed; retrying attempt=5 error=database: postgres: error connecting to server records=1")
    else:
        lines.append(f"{t.isoformat()}Z INFO tollgate::proxy: request req_{i:016x} status=200 latency_ms={i % 97}")
print("\n".join(lines))
PY
wc -c "$out"/*
