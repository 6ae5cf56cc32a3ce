#!/usr/bin/env python3
"""Soak (issue 8 §6): mixed sticky and non-sticky load for a long time with a memcached node killed
and restarted every few minutes; resident memory and open file descriptors of every app process
must stay flat (under 10% growth after warm-up) and no count may be lost, go backwards or skip.

Three memcached processes; two non-sticky `msm serve` instances and two sticky ones (synchronous
saves) on them, each pair with its own checked browsers (scripts/drills/chaos.py's load).
Sessions churn: now and then a browser logs out and starts a new session. Every `--kill-every`
seconds the next memcached node is killed (kill -9) and started empty on its port `--down`
seconds later. Every `--sample` seconds each app's VmRSS and open descriptors and the throughput
are sampled; at the end docs/soak.md gets the figures and docs/soak.svg the plot.

  scripts/drills/soak.py                           # 30 minutes
  scripts/drills/soak.py --minutes 3 --warmup 1    # a quick look (writes to test-artifacts/)
"""
import argparse
import http.client
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chaos  # noqa: E402

ROOT = chaos.ROOT


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


class ChurningLoad(chaos.Load):
    """The checked load; before a request a browser sometimes logs out and starts again."""

    def __init__(self, apps, browsers, sticky, logout_probability):
        super().__init__(apps, browsers, sticky)
        self.logout_probability = logout_probability
        self.logouts = 0
        # Counters, not a list of every request: half an hour of records would slow the load
        # generator itself down (Python's garbage collector walks them).
        self.requests = 0
        self.failed = 0
        self.max_latency = 0.0

    def record(self, started, duration, ok, refused):
        with self.lock:
            self.requests += 1
            if not ok:
                self.failed += 1
            self.max_latency = max(self.max_latency, duration)

    def step(self, browser):
        if browser.cookie and random.random() < self.logout_probability:
            try:
                status, _, _ = browser.request(browser.pick(), "POST", "/logout", browser.cookie)
            except (OSError, http.client.HTTPException):
                status = None
            if status == 303:
                browser.reset()
                with self.lock:
                    self.logouts += 1
        super().step(browser)


def svg_plot(samples, kills, path, title):
    """Resident memory per app (MiB, left axis) and requests per second (right axis) over minutes."""
    width, height, left, right, top, bottom = 900, 420, 70, 70, 40, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    t_max = max(s["t"] for s in samples) or 1
    apps = sorted(samples[0]["rss"].keys())
    rss_max = max(max(s["rss"].values()) for s in samples) / 1024 * 1.15
    rps_max = max(s["rps"] for s in samples) * 1.15 or 1
    colors = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b"]

    def x(t):
        return left + plot_w * t / t_max

    def y_rss(v):
        return top + plot_h * (1 - v / 1024 / rss_max)

    def y_rps(v):
        return top + plot_h * (1 - v / rps_max)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>',
             f'<line x1="{left + plot_w}" y1="{top}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="black"/>']
    for kill in kills:
        parts.append(f'<line x1="{x(kill):.1f}" y1="{top}" x2="{x(kill):.1f}" y2="{top + plot_h}" stroke="#d62728" stroke-dasharray="4,3"/>')
    for index in range(6):
        minutes = t_max / 60 * index / 5
        parts.append(f'<text x="{x(minutes * 60):.1f}" y="{top + plot_h + 18}" text-anchor="middle">{minutes:.0f}</text>')
        rss = rss_max * index / 5
        parts.append(f'<text x="{left - 6}" y="{y_rss(rss * 1024) + 4:.1f}" text-anchor="end">{rss:.0f}</text>')
        rps = rps_max * index / 5
        parts.append(f'<text x="{left + plot_w + 6}" y="{y_rps(rps) + 4:.1f}">{rps:.0f}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle">minutes (dashed: a memcached node killed)</text>')
    parts.append(f'<text x="16" y="{top + plot_h / 2}" transform="rotate(-90 16 {top + plot_h / 2})" text-anchor="middle">resident memory (MiB)</text>')
    parts.append(f'<text x="{width - 12}" y="{top + plot_h / 2}" transform="rotate(90 {width - 12} {top + plot_h / 2})" text-anchor="middle">requests per second</text>')
    points = " ".join(f"{x(s['t']):.1f},{y_rps(s['rps']):.1f}" for s in samples)
    parts.append(f'<polyline points="{points}" fill="none" stroke="#ff7f0e" stroke-width="1"/>')
    for index, app in enumerate(apps):
        points = " ".join(f"{x(s['t']):.1f},{y_rss(s['rss'][app]):.1f}" for s in samples)
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colors[index % 4]}" stroke-width="2"/>')
        parts.append(f'<text x="{left + 10 + index * 150}" y="{top + 14}" fill="{colors[index % 4]}">RSS {app}</text>')
    parts.append(f'<text x="{left + 10 + len(apps) * 150}" y="{top + 14}" fill="#ff7f0e">req/s (all)</text>')
    parts.append("</svg>")
    with open(path, "w") as out:
        out.write("\n".join(parts) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--warmup", type=float, default=5, help="minutes before the baseline sample")
    parser.add_argument("--kill-every", type=float, default=180, help="seconds between node kills")
    parser.add_argument("--down", type=float, default=10, help="seconds a killed node stays down")
    parser.add_argument("--sample", type=float, default=5)
    parser.add_argument("--browsers", type=int, default=12, help="per cluster")
    parser.add_argument("--binary", default=os.path.join(ROOT, ".build", "release", "msm"))
    parser.add_argument("--output", help="directory for soak.md and soak.svg (default: docs/ for 30 minutes or more, "
                                         "test-artifacts/ otherwise)")
    arguments = parser.parse_args()
    if arguments.output is None:
        arguments.output = os.path.join(ROOT, "docs" if arguments.minutes >= 30 else "test-artifacts")
    os.makedirs(arguments.output, exist_ok=True)
    state = tempfile.mkdtemp(prefix="msm-soak-")
    memcached = [chaos.Memcached(f"n{index + 1}", state) for index in range(chaos.NODES)]
    nodes = ",".join(f"{m.node_id}:127.0.0.1:{m.port}" for m in memcached)
    apps, loads = [], []
    try:
        non_sticky = [chaos.App(index, "non-sticky", nodes, state, arguments.binary) for index in range(2)]
        sticky = [chaos.App(index + 2, "sticky-sync", nodes, state, arguments.binary) for index in range(2)]
        apps = non_sticky + sticky
        loads = [ChurningLoad(non_sticky, arguments.browsers, False, 0.002),
                 ChurningLoad(sticky, arguments.browsers, True, 0.002)]
        for load in loads:
            load.start()
        started = time.monotonic()
        end = started + arguments.minutes * 60
        next_kill = started + arguments.kill_every
        restart_at, down_node, victim = None, None, 0
        samples, kills = [], []
        last_count, last_time = 0, started
        names = {app.route: f"{app.route} ({app.mode})" for app in apps}
        while time.monotonic() < end:
            time.sleep(arguments.sample)
            now = time.monotonic()
            if restart_at is None and now >= next_kill:
                down_node = memcached[victim % len(memcached)]
                victim += 1
                down_node.kill()
                kills.append(now - started)
                restart_at = now + arguments.down
                print(f"== {(now - started) / 60:5.1f} min: killed memcached {down_node.node_id}", flush=True)
            elif restart_at is not None and now >= restart_at:
                down_node.start()
                print(f"== {(now - started) / 60:5.1f} min: memcached {down_node.node_id} back, empty", flush=True)
                restart_at = None
                next_kill = now + arguments.kill_every - arguments.down
            count = sum(load.requests for load in loads)
            sample = {
                "t": now - started,
                "rps": (count - last_count) / (now - last_time),
                "rss": {names[app.route]: rss_kib(app.process.pid) for app in apps},
                "fds": {names[app.route]: open_fds(app.process.pid) for app in apps},
            }
            last_count, last_time = count, now
            samples.append(sample)
            if len(samples) % 12 == 0:
                print(f"   {sample['t'] / 60:5.1f} min  {sample['rps']:6.0f} req/s  RSS MiB "
                      + " ".join(f"{v / 1024:.1f}" for v in sample["rss"].values())
                      + "  fds " + " ".join(str(v) for v in sample["fds"].values()), flush=True)
            for app in apps:
                if app.process.poll() is not None:
                    raise chaos.SetupError(f"{app.route} exited ({app.process.returncode}); logs in {state}")
        if restart_at is not None:
            down_node.start()
    finally:
        for load in loads:
            load.stop()
        for app in apps:
            app.stop()
        for m in memcached:
            m.kill()

    baseline = next(s for s in samples if s["t"] >= arguments.warmup * 60)
    last = samples[-1]
    rows, broke = [], []
    for app in baseline["rss"]:
        # The last minute's peak against the baseline: a leak shows as growth, noise as a blip.
        tail = [s for s in samples if s["t"] >= last["t"] - 60]
        rss_end = max(s["rss"][app] for s in tail)
        fds_end = max(s["fds"][app] for s in tail)
        rss_growth = (rss_end - baseline["rss"][app]) / baseline["rss"][app]
        fds_growth = (fds_end - baseline["fds"][app]) / baseline["fds"][app]
        rows.append(f"| {app} | {baseline['rss'][app] / 1024:.1f} | {rss_end / 1024:.1f} | {rss_growth:+.1%} | "
                    f"{baseline['fds'][app]} | {fds_end} | {fds_growth:+.1%} |")
        if rss_growth > 0.10 or fds_growth > 0.10:
            broke.append(f"{app}: RSS {rss_growth:+.1%}, fds {fds_growth:+.1%}")
    requests = sum(load.requests for load in loads)
    failed = sum(load.failed for load in loads)
    max_latency = max(load.max_latency for load in loads)
    violations = [v for load in loads for v in load.violations]
    logouts = sum(load.logouts for load in loads)
    if violations:
        broke.append(f"{len(violations)} count violations")
    svg = os.path.join(arguments.output, "soak.svg")
    svg_plot(samples, kills, svg, f"soak: {arguments.minutes:g} min, mixed sticky and non-sticky load, "
                                  f"a memcached node killed every {arguments.kill_every:g} s")
    report = f"""# Soak

Written by `scripts/drills/soak.py` (issue 8 §6) on {time.strftime("%Y-%m-%d", time.gmtime())}:
{arguments.minutes:g} minutes, three memcached processes, two non-sticky and two sticky (synchronous
saves) `msm serve` instances (release build, Hummingbird), {arguments.browsers} checked browsers per
pair (one `/counter` at a time, every count checked as in `docs/drills.md`; a browser logs out and
starts a new session now and then). Every {arguments.kill_every:g} s the next memcached node is killed
(`kill -9`) and started empty {arguments.down:g} s later. Baseline: the first sample after
{arguments.warmup:g} minutes of warm-up; end: the highest sample of the last minute.

- requests: {requests}, failed (non-200 or broken connection, while a node was down): {failed};
  slowest request: {max_latency:.2f} s
- count violations (lost, backwards or skipped): {len(violations)}
- logouts (each followed by a new session): {logouts}
- node kills: {len(kills)}
- result: {"; ".join(broke) if broke else "flat (under 10% growth of memory and descriptors), 0 violations"}

| app | RSS at baseline (MiB) | RSS at end (MiB) | growth | fds at baseline | fds at end | growth |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
""" + "\n".join(rows) + f"""

![memory and throughput over time](soak.svg)

Reproduce: `swift build -c release --traits Tools --product msm && scripts/drills/soak.py` (`--minutes`,
`--kill-every`, `--down`, `--browsers`; shorter runs write to `test-artifacts/`).
"""
    with open(os.path.join(arguments.output, "soak.md"), "w") as out:
        out.write(report)
    print(report)
    for violation in violations[:20]:
        print(f"   VIOLATION {violation}")
    return 1 if broke else 0


if __name__ == "__main__":
    sys.exit(main())
