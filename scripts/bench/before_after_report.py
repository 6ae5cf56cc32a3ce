#!/usr/bin/env python3
"""before_after_report.py TSV BEFORE AFTER — scripts/bench-before-after's end-to-end table: each
configuration's throughput as a ratio to its framework's in-memory sessions, for the earlier build
(labels before-ours-*) and this one (ours-*), measured in the same run, and the change."""
import csv
import datetime
import os
import platform
import sys

tsv, before, after = sys.argv[1:4]
rows = {(r["label"], r["endpoint"]): r for r in csv.DictReader(open(tsv), delimiter="\t")}
REFERENCE = {"ours-vapor-non-sticky": "vapor-memory"}

out = [
    f"# Before and after: {before} and {after}, end to end",
    "",
    f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()} "
    f"({os.cpu_count()} cores), one run, by `scripts/bench-before-after {before}`: the session-counter workload of "
    "`scripts/bench-e2e` (each server and its two memcached nodes on CPU 0, wrk on CPU 1, every response checked), "
    f"`msm serve` built at {before} and at {after}, run one after the other for each configuration. The ratio is "
    "req/s over the same framework's in-memory sessions (hb-memory, vapor-memory) in this run; the change is the "
    "after ratio over the before ratio (the target: none worse than -5%).",
    "",
    "| configuration | endpoint | req/s before | req/s after | reference req/s | ratio before | ratio after | change | p99 ms before / after | mismatches |",
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
]
worst = None
for (label, endpoint), a in rows.items():
    if not label.startswith("ours-"):
        continue
    b = rows.get(("before-" + label, endpoint))
    ref = rows.get((REFERENCE.get(label, "hb-memory"), endpoint))
    if not b or not ref:
        continue
    r_ref = float(ref["rps_median"])
    ratio_b, ratio_a = float(b["rps_median"]) / r_ref, float(a["rps_median"]) / r_ref
    change = ratio_a / ratio_b - 1
    worst = change if worst is None else min(worst, change)
    out.append(f"| {label} | /{endpoint} | {int(b['rps_median']):,} | {int(a['rps_median']):,} | {int(r_ref):,} | "
               f"{ratio_b:.2f}x | {ratio_a:.2f}x | {change:+.1%} | {float(b['p99_ms']):.2f} / {float(a['p99_ms']):.2f} | "
               f"{int(b['mismatches']) + int(a['mismatches'])} |")
out.append("")
if worst is not None:
    out.append(f"Worst change: {worst:+.1%} ({'within' if worst >= -0.05 else '**beyond**'} the 5% allowed).")
print("\n".join(out))
