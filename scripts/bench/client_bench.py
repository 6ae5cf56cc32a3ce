"""Runs the client benchmark matrix; see scripts/bench-client."""
import datetime
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time

DURATION = float(os.environ.get("DURATION", "10"))
CONCURRENCY = [int(c) for c in os.environ.get("CONCURRENCY", "1 16 256").split()]
OPS = os.environ.get("OPS", "get set").split()
# Each: an executor (`global`, `eventloop`, `loop`), optionally `@Nloop` for N event loops (else NIO's
# default, one per core, which does not see `taskset`: two loops sharing the pinned CPU), optionally
# `+batch`: the requests in flight sent as the reference sends them, one batch of in-flight/connections
# requests per task and connection (`--batch`, the public `executeBatch`); measured from 16 in flight.
EXECUTORS = os.environ.get("EXECUTORS", "global global@1loop loop@1loop loop@1loop+batch").split()
CONNECTIONS = 2  # memcached-bench's default, and the reference's from 2 in flight
WINDOW = 1024  # memaslap keys per concurrency (-w 1k); ours uses the same key count
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, ".build", "release", "memcached-bench")
# The pipelined C reference client (scripts/bench/refclient.c, built by scripts/bench-client).
REF = os.path.join(ROOT, ".build-bench", "refclient")
REF_LABEL = "C pipelined (refclient.c)"
# BEFORE_BENCH=PATH (BEFORE_LABEL names it): an earlier build of memcached-bench, measured right
# after ours in every cell of the same run (scripts/bench-before-after).
BEFORE = os.environ.get("BEFORE_BENCH")
BEFORE_LABEL = os.environ.get("BEFORE_LABEL", "before")
OUT = os.environ.get("OUT", os.path.join(ROOT, "docs", "benchmarks", "client-throughput.md"))
# TLS=1: the same memcached also serves TLS (memcached -Z) on a second port (its plain port stays
# open, `notls:`, for the counters and the plain rows), and ours is measured over both in each cell.
TLS = os.environ.get("TLS") == "1"
TLS_DIR = os.path.join(ROOT, ".build-bench", "tls")


def make_certificates():
    """A CA and a server certificate for 127.0.0.1 (as scripts/bench-e2e makes them)."""
    if os.path.exists(os.path.join(TLS_DIR, "server.pem")):
        return
    os.makedirs(TLS_DIR, exist_ok=True)
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda args: subprocess.run(["openssl"] + args, cwd=TLS_DIR, check=True, capture_output=True)
    run(["req", "-x509"] + curve + ["-keyout", "ca.key", "-out", "ca.pem", "-days", "3650", "-subj", "/CN=msm bench ca"])
    run(["req"] + curve + ["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=msm bench"])
    with open(os.path.join(TLS_DIR, "server.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem",
         "-days", "3650", "-extfile", "server.ext"])
    os.chmod(TLS_DIR, 0o755)
    for name in os.listdir(TLS_DIR):
        os.chmod(os.path.join(TLS_DIR, name), 0o644)  # memcached reads them as nobody


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def stats(port):
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"stats\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            data += s.recv(65536)
    return {l.split()[1]: l.split()[2] for l in data.decode().splitlines() if l.startswith("STAT ")}


def measure(cmd, port, counter):
    """Runs cmd for DURATION s; returns ops/s from memcached's counter over [30%, 90%] of the run."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = start + DURATION * 0.3
    t1 = start + DURATION * 0.9
    time.sleep(max(0, t0 - time.monotonic()))
    s0, m0 = int(stats(port)[counter]), time.monotonic()
    time.sleep(max(0, t1 - time.monotonic()))
    s1, m1 = int(stats(port)[counter]), time.monotonic()
    out, _ = proc.communicate(timeout=DURATION + 60)
    if proc.returncode != 0:
        sys.exit(f"{cmd} failed:\n{out}")
    return (s1 - s0) / (m1 - m0), out


def main():
    port = free_port()
    listen = ["-l", "127.0.0.1", "-p", str(port)]
    if TLS:
        make_certificates()
        tls_port = free_port()
        listen = ["-Z", "-o", f"ssl_chain_cert={TLS_DIR}/server.pem,ssl_key={TLS_DIR}/server.key",
                  "-l", f"127.0.0.1:{tls_port},notls:127.0.0.1:{port}"]
    server = subprocess.Popen(["taskset", "-c", "0", "memcached"] + listen + ["-U", "0",
                               "-m", "1024", "-c", "4096"] + (["-u", "nobody"] if os.getuid() == 0 else []))
    rows = []
    try:
        for _ in range(100):
            try:
                stats(port)
                break
            except OSError:
                time.sleep(0.05)
        cfg = {}
        for op in OPS:
            path = os.path.join(tempfile.gettempdir(), f"memaslap-{op}.cfg")
            with open(path, "w") as f:
                f.write("key\n48 48 1\nvalue\n1100 1100 1\ncmd\n0 %s\n1 %s\n" % (("1", "0") if op == "set" else ("0", "1")))
            cfg[op] = path
        for op in OPS:
            counter = "cmd_get" if op == "get" else "cmd_set"
            for c in CONCURRENCY:
                keys = c * WINDOW
                c_cmd = ["taskset", "-c", "1", "memcaslap", "-s", f"127.0.0.1:{port}", "-T", "1", "-c", str(c),
                         "-w", "1k", "-t", f"{int(DURATION)}s", "-F", cfg[op]]
                ref_cmd = ["taskset", "-c", "1", REF, "--server", f"127.0.0.1:{port}", "--op", op, "--concurrency", str(c),
                           "--duration", str(DURATION), "--keys", str(keys)]
                ref_rate, ref_out = measure(ref_cmd, port, counter)
                result = re.search(r"misses=(\d+) errors=(\d+)", ref_out)
                if not result or result.group(2) != "0":
                    sys.exit(f"errors in {ref_cmd}:\n{ref_out}")
                rows.append((op, c, REF_LABEL, ref_rate, " ".join(ref_cmd).replace(ROOT + "/", ""), result.group(1)))
                print(f"{op} c={c} C pipelined {ref_rate:,.0f}/s", flush=True)
                c_rate, c_out = measure(c_cmd, port, counter)
                misses = re.search(r"get_misses: (\d+)", c_out)
                rows.append((op, c, "C memaslap (libmemcached 1.1.4)", c_rate, " ".join(c_cmd), misses.group(1) if misses else "-"))
                print(f"{op} c={c} memaslap {c_rate:,.0f}/s", flush=True)
                for variant in EXECUTORS:
                    variant, batched, _ = variant.partition("+batch")
                    batch = c // CONNECTIONS if batched else 1
                    if batched and (batch < 2 or c % batch):
                        continue
                    executor, _, loops = variant.partition("@")
                    loops = loops.removesuffix("loop")
                    loop_args = ["--event-loops", loops] if loops else []
                    loop_label = f", {loops} loop{'s' if loops != '1' else ''}" if loops else ""
                    if batched:
                        loop_args += ["--batch", str(batch)]
                        loop_label += f", batches of {batch}"
                    runs = [("ours", BENCH, [], port)] + ([(BEFORE_LABEL, BEFORE, [], port)] if BEFORE else [])
                    if TLS:
                        runs.append(("ours over TLS", BENCH, ["--tls-ca-file", f"{TLS_DIR}/ca.pem"], tls_port))
                    for who, binary, extra, server_port in runs:
                        our_cmd = ["taskset", "-c", "1", binary, "--server", f"127.0.0.1:{server_port}", "--op", op,
                                   "--concurrency", str(c), "--duration", str(DURATION), "--keys", str(keys),
                                   "--executor", executor] + loop_args + extra
                        rate, out = measure(our_cmd, port, counter)
                        result = re.search(r"misses=(\d+) errors=(\d+)", out)
                        if not result or result.group(2) != "0":
                            sys.exit(f"errors in {our_cmd}:\n{out}")
                        rows.append((op, c, f"{who}, {executor} executor{loop_label}", rate, " ".join(our_cmd).replace(ROOT + "/", ""), result.group(1)))
                        print(f"{op} c={c} {who}/{variant}{'+batch' if batched else ''} {rate:,.0f}/s ({rate / ref_rate:.2f}x of C pipelined)", flush=True)
    finally:
        server.terminate()
        server.wait()
    write(rows)


def write(rows):
    os.makedirs(os.path.join(ROOT, "bench-results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench-results", "client.tsv"), "a") as f:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        for op, c, who, rate, cmd, misses in rows:
            f.write(f"{stamp}\t{op}\t{c}\t{who}\t{rate:.0f}\t{misses}\t{cmd}\n")
    base = {(op, c): rate for op, c, who, rate, _, _ in rows if who == REF_LABEL}
    memaslap = {(op, c): rate for op, c, who, rate, _, _ in rows if who.startswith("C memaslap")}
    lines = [
        "# Client throughput: ours vs a pipelined C client",
        "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()} "
        f"({os.cpu_count()} cores), one run, by `scripts/bench-client` (DURATION={DURATION:g} s per cell).",
        "memcached 1.6 pinned to CPU 0, each client pinned to CPU 1, 48-byte keys, 1,100-byte values, 100% hits.",
        "Operations per second are memcached's own `cmd_get`/`cmd_set` deltas over the steady 30%-90% of each run,",
        "so every client is counted the same way. \"In flight\" is, for ours, concurrent tasks calling the public API",
        "(`client.get` / `client.set`) over 2 pipelined connections; for the reference, `scripts/bench/refclient.c`",
        "(C on raw sockets, one thread, poll(2)), the same meta commands, keys and values over the same connections,",
        "each a closed loop of batches of in-flight/connections commands (one connection at 1 in flight); for",
        "memaslap, which does not pipeline, one connection per request in flight. \"vs C\" is against the pipelined",
        "reference (the issue's target); \"vs memaslap\" is kept for comparison with earlier tables. Executors:",
        "`global` = Swift's default cooperative pool; `eventloop` = NIO's event loop installed as the global executor",
        "(tasks and connections share a thread, but the loop runs jobs as its serial executor, so every call into a",
        "nonisolated async function switches executors); `loop` = each task prefers an event loop's `EventLoopExecutor`",
        "(a task executor preference, as the session layer runs request handlers): no executor switch, and a reply",
        "resumes its task on the thread that read it. Event loops: NIO's default is one per core (2 here), which does not",
        "see `taskset`, so both loops share the client's one CPU; \"1 loop\" is `--event-loops 1`, what a client pinned",
        "to one CPU should run (as `msm serve` now does by default). At 1 in flight, ops/s is the inverse of a round",
        "trip's latency. \"batches of B\" (`--batch B`) sends the same requests in flight the way the reference",
        "does: in-flight/B tasks (two), each a closed loop of `client.executeBatch` calls of B",
        "requests (the public pipelining API): the same work and the same shape as the C client's.",
        "",
        "| op | in flight | client | ops/s | vs C | vs memaslap |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for op, c, who, rate, _, _ in rows:
        lines.append(f"| {op} | {c} | {who} | {rate:,.0f} | {rate / base[(op, c)]:.2f}x | {rate / memaslap[(op, c)]:.2f}x |")
    lines += ["", "memaslap's `-F` file for gets (for sets, the `cmd` lines are `0 1` and `1 0`):", "",
              "```", "key", "48 48 1", "value", "1100 1100 1", "cmd", "0 0", "1 1", "```", "",
              "Command lines (port chosen at run time):", ""]
    seen = set()
    for op, c, who, rate, cmd, _ in rows:
        if (op, c, who) not in seen:
            seen.add((op, c, who))
            lines.append(f"- `{cmd}`")
    # The analysis written by hand below the generated part (from "## Where the time goes" on) is kept.
    notes = ""
    if os.path.exists(OUT):
        previous = open(OUT).read()
        marker = previous.find("\n## Where the time goes")
        notes = previous[marker:] if marker >= 0 else ""
    with open(OUT, "w") as f:
        f.write("\n".join(lines) + "\n" + ("\n" + notes.lstrip("\n") if notes else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
