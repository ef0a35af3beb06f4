"""Folds `perf script` output (a --call-graph dwarf recording) into where time goes.

    perf script -i bench/out-profile/perf.data | python3 bench/fold.py [SYMBOL_SUBSTRING]

Without an argument: the share of samples under each of tollgate's own functions (inclusive:
a sample counts for every tollgate frame on its stack), the answer to "which phase costs what".
With one: the tollgate frames nearest the leaf in samples whose leaf contains the substring,
the answer to "who calls malloc". Writes folded stacks to bench/out-profile/folded.txt as well
(the input of any flame-graph tool).
"""
import collections
import re
import sys

want = sys.argv[1] if len(sys.argv) > 1 else None
stacks = []
cur = []
for line in sys.stdin:
    line = line.rstrip("\n")
    if not line.strip():
        if cur:
            stacks.append(cur)
        cur = []
        continue
    if line.startswith((" ", "\t")):
        m = re.match(r"\s+[0-9a-f]+\s+(.*?)\s+\(([^)]*)\)$", line)
        if m:
            sym = re.sub(r"\+0x[0-9a-f]+$", "", m.group(1))
            cur.append(sym)
if cur:
    stacks.append(cur)

total = len(stacks) or 1
ours = lambda s: s.startswith(("tollgate::", "tollgate_proto::", "<tollgate", "<tollgate_proto"))
short = lambda s: re.sub(r"\{\{closure\}\}|::\{closure#\d+\}", "", s)[:110]

with open("bench/out-profile/folded.txt", "w") as f:
    counts = collections.Counter(";".join(reversed([short(x) for x in s])) for s in stacks)
    for k, v in counts.most_common():
        f.write(f"{k} {v}\n")

c = collections.Counter()
if want:
    for s in stacks:
        if want in s[0]:
            near = next((short(x) for x in s if ours(x)), "(outside tollgate)")
            c[near] += 1
    hits = sum(c.values())
    print(f"{hits} of {total} samples ({100 * hits / total:.1f}%) have a leaf matching {want!r}; nearest tollgate frame:")
else:
    for s in stacks:
        for x in set(short(y) for y in s if ours(y)):
            c[x] += 1
    print(f"{total} samples; inclusive share of tollgate's functions:")
for k, v in c.most_common(40):
    print(f"{100 * v / total:6.2f}%  {k}")
