#!/usr/bin/env python3
"""e2e_report.py TSV COMMANDS SHARED — the end-to-end benchmark as Markdown: the results table
(shared/bench/lib/table.py), the target ratios measured in this run, and the command lines."""
import csv
import datetime
import os
import platform
import subprocess
import sys

tsv, commands_path, shared = sys.argv[1:4]
rows = {}
for row in csv.DictReader(open(tsv), delimiter="\t"):
    rows[(row["label"], row["endpoint"])] = row

TARGETS = [
    # (ours, reference, endpoint, minimum throughput ratio, maximum p99 ratio)
    ("ours-hb-non-sticky", "hb-memory", "counter", 0.9, 1.5),
    ("ours-hb-sticky", "hb-memory", "counter", 1.0, 1.5),
    ("ours-hb-sticky", "hb-memory", "read", 1.2, 1.5),
    ("ours-hb-sticky-sync", "hb-memory", "counter", None, None),
    ("ours-hb-non-sticky", "hb-memory", "read", None, None),
    ("ours-hb-non-sticky", "hb-memory", "hello", None, None),
    ("ours-vapor-non-sticky", "vapor-memory", "counter", 3.0, None),
    # The cost of sealing (AES-256-GCM, HMAC keys): the same server with and without it.
    ("ours-hb-non-sticky-sealed", "ours-hb-non-sticky", "counter", None, None),
    ("ours-hb-non-sticky-sealed", "ours-hb-non-sticky", "read", None, None),
    ("ours-hb-non-sticky-sealed", "hb-memory", "counter", None, None),
    # The cost of TLS to memcached (memcached -Z): the same server with and without it.
    ("ours-hb-non-sticky-tls", "ours-hb-non-sticky", "counter", None, None),
    ("ours-hb-non-sticky-tls", "ours-hb-non-sticky", "read", None, None),
    ("ours-hb-non-sticky-tls", "hb-memory", "counter", None, None),
]

out = []
out.append("# End-to-end benchmark: the session-counter workload")
out.append("")
out.append(f"Measured {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC on {platform.node()} ({os.cpu_count()} cores), one run, "
           "by `scripts/bench-e2e`, with `../shared/bench/run-workload.sh` (wrk, 8 threads / 8 connections, "
           f"{rows and next(iter(rows.values()))['threads']} threads; warm-up, then the median of the runs). Each server and its two "
           "memcached nodes pinned to CPU 0, wrk to CPU 1. Every response is checked by the workload's Lua script: "
           f"a mismatch is a lost update. Event loops, for every server: {os.environ.get('EVENT_LOOPS_LABEL', 'NIO default')}.")
out.append("")
out.append("## Targets, as ratios within this run")
out.append("")
out.append("| ours | reference | endpoint | req/s ours | req/s reference | ratio | target | p99 ours / reference | target | mismatches |")
out.append("| --- | --- | --- | ---: | ---: | ---: | --- | ---: | --- | ---: |")
for ours, ref, endpoint, min_ratio, max_p99 in TARGETS:
    a, b = rows.get((ours, endpoint)), rows.get((ref, endpoint))
    if not a or not b:
        continue
    ratio = float(a["rps_median"]) / float(b["rps_median"])
    p99 = float(a["p99_ms"]) / float(b["p99_ms"]) if float(b["p99_ms"]) > 0 else float("nan")
    def verdict(value, bound, higher_is_better):
        if bound is None:
            return "-"
        ok = value >= bound if higher_is_better else value <= bound
        return f"{'≥' if higher_is_better else '≤'} {bound} {'met' if ok else '**missed**'}"
    out.append(f"| {ours} | {ref} | /{endpoint} | {int(a['rps_median']):,} | {int(b['rps_median']):,} | {ratio:.2f}x | "
               f"{verdict(ratio, min_ratio, True)} | {p99:.2f}x | {verdict(p99, max_p99, False)} | {a['mismatches']} |")
out.append("")
out.append("## All results")
out.append("")
table = subprocess.run([sys.executable, os.path.join(shared, "lib", "table.py"), tsv], capture_output=True, text=True)
out.append(table.stdout.rstrip())
out.append("")
out.append("## Servers")
out.append("")
out.append("- `hb-memory`: `../shared/bench/apps/hb-sessions` (Hummingbird 2.28.1, hummingbird-auth `SessionMiddleware` over "
           "`MemoryPersistDriver`), release build.")
out.append("- `vapor-memory`: `../shared/bench/apps/vapor-sessions` (Vapor 4.122.3 `SessionsMiddleware`, memory driver), release build.")
out.append("- `ours-*`: `msm serve` (release), Hummingbird or Vapor with `MemcachedSessionMiddleware`, two memcached nodes.")
out.append("")
out.append("Command lines (ports chosen at run time):")
out.append("")
out.append("```")
for line in open(commands_path):
    label, command = line.rstrip("\n").split("|", 1)
    out.append(f"{label}: {command}")
out.append(f"wrk: taskset -c 1 wrk -t8 -c8 -d15s --latency -s {shared}/lua/session-counter.lua http://127.0.0.1:PORT/ -- ENDPOINT 100 0")
out.append("```")
print("\n".join(out))
