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

# Issue 11's targets. (ours, reference, endpoint, minimum throughput ratio, maximum p99 ratio,
# placement): "on" = memcached on the server's core (labels without a placement suffix), "off" =
# memcached with wrk (`@mc-off`), "any" = both. Each row is read for every loop count measured
# (labels ending `@Nloop`, the reference at the same count).
TARGETS = [
    ("ours-hb-non-sticky", "hb-memory", "read", 0.95, 1.5, "off"),
    ("ours-hb-non-sticky", "hb-memory", "counter", 0.85, 1.5, "off"),
    ("ours-hb-non-sticky", "hb-memory", "counter", 0.65, 1.5, "on"),
    ("ours-hb-non-sticky", "hb-memory", "read", None, 1.5, "on"),
    ("ours-hb-non-sticky", "hb-memory", "hello", None, 1.5, "any"),
    ("ours-hb-sticky", "hb-memory", "read", 1.15, 1.5, "any"),
    ("ours-hb-sticky", "hb-memory", "counter", 1.1, 1.5, "any"),
    ("ours-hb-sticky-sync", "hb-memory", "counter", 0.8, 1.5, "any"),
    ("ours-vapor-non-sticky", "vapor-memory", "counter", 3.0, 1.5, "any"),
    # The cost of sealing (AES-256-GCM, HMAC keys): the same server with and without it.
    ("ours-hb-non-sticky-sealed", "ours-hb-non-sticky", "counter", None, None, "any"),
    ("ours-hb-non-sticky-sealed", "ours-hb-non-sticky", "read", None, None, "any"),
    ("ours-hb-non-sticky-sealed", "hb-memory", "counter", None, None, "any"),
    # The cost of TLS to memcached (memcached -Z): the same server with and without it.
    ("ours-hb-non-sticky-tls", "ours-hb-non-sticky", "counter", None, None, "any"),
    ("ours-hb-non-sticky-tls", "ours-hb-non-sticky", "read", None, None, "any"),
    ("ours-hb-non-sticky-tls", "hb-memory", "counter", None, None, "any"),
]
LOOP_SUFFIXES = [""] + sorted({"@" + label.rsplit("@", 1)[1] for label, _ in rows if label.endswith("loop")})
out = []
out.append("# End-to-end benchmark: the session-counter workload")
out.append("")
out.append(f"Measured {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC on {platform.node()} ({os.cpu_count()} cores), one run, "
           "by `scripts/bench-e2e`, with `../shared/bench/run-workload.sh` (wrk, 8 threads / 8 connections, "
           f"{rows and next(iter(rows.values()))['threads']} threads; warm-up, then the median of the runs). Each server pinned to "
           "CPU 0 and wrk to CPU 1; its two memcached nodes on CPU 0 (labels without `@mc-off`) or on CPU 1 with wrk "
           "(`@mc-off`: memcached off the server's core, standing in for other hosts). Every response is checked by the "
           "workload's Lua script: a mismatch is a lost update. Event loops, for every server: "
           f"{os.environ.get('EVENT_LOOPS_LABEL', 'NIO default')} (labels ending `@Nloop`: N loops)."
           + (" Every server, ours and the references, built with `-Xswiftc -enforce-exclusivity=unchecked`."
              if os.environ.get("EXCLUSIVITY") == "unchecked" else ""))
out.append("")
out.append("## Targets, as ratios within this run")
out.append("")
out.append("| ours | reference | endpoint | req/s ours | req/s reference | ratio | target | p99 ours / reference | target | mismatches |")
out.append("| --- | --- | --- | ---: | ---: | ---: | --- | ---: | --- | ---: |")
expanded = []
for loops in LOOP_SUFFIXES:
    for ours, ref, endpoint, min_ratio, max_p99, placement in TARGETS:
        places = {"on": [""], "off": ["@mc-off"], "any": ["", "@mc-off"]}[placement]
        for place in places:
            # The sealed, TLS rows compare like with like: the reference in the same placement.
            ref_place = place if ref.startswith("ours-") else ""
            expanded.append((ours + place + loops, ref + ref_place + loops, endpoint, min_ratio, max_p99))
            # Each server at its own default (`msm serve`: one loop when pinned to one core) also
            # against the reference at every loop count measured: the strongest reference counts.
            if loops == "" and not ref.startswith("ours-"):
                for other in LOOP_SUFFIXES[1:]:
                    expanded.append((ours + place, ref + other, endpoint, min_ratio, max_p99))
for ours, ref, endpoint, min_ratio, max_p99 in expanded:
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
out.append(f"wrk: taskset -c 1 wrk -t8 -c8 -d{os.environ.get('DURATION', '15')}s --latency -s {shared}/lua/session-counter.lua http://127.0.0.1:PORT/ -- ENDPOINT 100 0")
out.append("```")
print("\n".join(out))
