"""Turns bench/out/results.jsonl into the tables of bench/RESULTS.md."""
import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
usage = json.load(open(sys.argv[2])) if len(sys.argv) > 2 else []
by = {r["label"]: r for r in rows}

print("### Fixed offered rate (latency in ms, from the scheduled send time)\n")
print("| target | kind | offered rps | achieved rps | errors | p50 | p99 | p99.9 | TTFB p50 | TTFB p99 |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if r["mode"] != "fixed-rate":
        continue
    t, kind = r["label"].split()[:2]
    m, f = r["ms"], r["ttfb_ms"]
    print(f"| {t} | {kind} | {r['offered_rps']} | {r['achieved_rps']:.0f} | {r['errors']} | {m['p50']:.3f} | {m['p99']:.3f} | {m['p999']:.3f} | {f['p50']:.3f} | {f['p99']:.3f} |")

print("\n### Added latency over calling the mock directly (ms)\n")
print("| proxy | kind | p50 | p99 | p99.9 |")
print("|---|---|---|---|---|")
for proxy in ["nginx", "tollgate", "tollgate-wallet", "tollgate-limits", "tollgate-redis-nolimits", "tollgate-redis-limits", "tollgate-xlate"]:
    for kind in ["json", "stream"]:
        base, p = by.get(f"mock {kind} fixed"), by.get(f"{proxy} {kind} fixed")
        if not base or not p:
            continue
        d = {k: p["ms"][k] - base["ms"][k] for k in ["p50", "p99", "p999"]}
        print(f"| {proxy} | {kind} | {d['p50']:+.3f} | {d['p99']:+.3f} | {d['p999']:+.3f} |")

print("\n### What the limiter adds (same gateway, a key with limits on vs. none; ms)\n")
print("| mode | p50 | p99 | p99.9 |")
print("|---|---|---|---|")
for mode, without, with_ in [("in-process", "tollgate", "tollgate-limits"), ("redis", "tollgate-redis-nolimits", "tollgate-redis-limits")]:
    a, b = by.get(f"{without} json fixed"), by.get(f"{with_} json fixed")
    if a and b:
        d = {k: b["ms"][k] - a["ms"][k] for k in ["p50", "p99", "p999"]}
        print(f"| {mode} | {d['p50']:+.3f} | {d['p99']:+.3f} | {d['p999']:+.3f} |")

print("\n### What a wallet hold adds (same gateway, a key with a wallet vs. none; ms)\n")
a, b = by.get("tollgate json fixed"), by.get("tollgate-wallet json fixed")
if a and b:
    print("| p50 | p99 | p99.9 |")
    print("|---|---|---|")
    d = {k: b["ms"][k] - a["ms"][k] for k in ["p50", "p99", "p999"]}
    print(f"| {d['p50']:+.3f} | {d['p99']:+.3f} | {d['p999']:+.3f} |")
a, b = by.get("tollgate json max"), by.get("tollgate-wallet json max")
if a and b and a["achieved_rps"]:
    print(f"\nThroughput with a wallet: {b['achieved_rps']:.0f} rps vs {a['achieved_rps']:.0f} without ({b['achieved_rps'] / a['achieved_rps']:.2f}x)")

print("\n### Maximum throughput (closed loop)\n")
print("| target | kind | concurrency | rps | errors | p50 ms | p99 ms |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    if r["mode"] != "max":
        continue
    t, kind = r["label"].split()[:2]
    print(f"| {t} | {kind} | {r['concurrency']} | {r['achieved_rps']:.0f} | {r['errors']} | {r['ms']['p50']:.3f} | {r['ms']['p99']:.3f} |")
for kind in ["json", "stream"]:
    n, t = by.get(f"nginx {kind} max"), by.get(f"tollgate {kind} max")
    if n and t and n["achieved_rps"]:
        print(f"\ntollgate / nginx throughput, {kind}: {t['achieved_rps'] / n['achieved_rps']:.2f}")

if usage:
    metered = sum(u["requests"] for u in usage)
    print(f"\nUsage records written by tollgate during the run: {metered}")
