#!/usr/bin/env python3
"""instructions.py — instructions per request of `msm serve`, counted by callgrind: deterministic,
so that a change can be judged on a shared, noisy machine (req/s ratios are the figures to report,
instruction counts the figure to steer by).

For each binary (LABEL=PATH), mode and endpoint: two memcached nodes, `msm serve` under
`valgrind --tool=callgrind --instr-atstart=no`, a warm-up, then instrumentation switched on for
exactly REQUESTS sequential keep-alive requests from this script (one session: /counter creates it,
then every request carries its cookie), switched off, dumped; the dump's total divided by REQUESTS.
Every thread of the server counts (event loops, the memcached client, the asynchronous writer).
The work of timers and periodic tasks is taken out: an idle window as long as the requests' one
is counted too and subtracted (valgrind runs the server some fifty times slower, so that work
would otherwise weigh fifty times too much). The kernel's work (system calls, the loopback TCP
stack) and memcached's are not counted: instructions in the server process only.

A reference labelled hb-memory (the shared workload's Hummingbird app with in-memory sessions,
built by scripts/bench-e2e) runs once per endpoint, without memcached. Each row is split by who
runs the instructions (self cost: our modules, SwiftNIO, Hummingbird, other packages, the Swift
standard library, the Swift runtime with concurrency, Foundation, libc), and TOP_FOR endpoints
list their top functions by inclusive cost.

Valgrind 3.19 dies on Swift 6.3 programs with an `async main` (its rt_sigsuspend wrapper writes
into libdispatch's read-only signal mask); sigsuspend-shim.c, preloaded, avoids it.

  scripts/bench/instructions.py after=.build/release/msm before=/tmp/before/.build/release/msm
  scripts/bench/instructions.py hb-memory=.build-bench/hb-sessions/.build/release/HBSessions ours=.build/release/msm
  REQUESTS=2000 MODES="sticky non-sticky" ENDPOINTS="read counter" scripts/bench/instructions.py ...
  MODES="sticky-sync" ENDPOINTS="counter" scripts/bench/instructions.py ...   # sticky, --sync-saves
Writes a Markdown table to stdout (and OUT if set)."""
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

REQUESTS = int(os.environ.get("REQUESTS", "2000"))
WARMUP = int(os.environ.get("WARMUP", "200"))
MODES = os.environ.get("MODES", "non-sticky sticky").split()
ENDPOINTS = os.environ.get("ENDPOINTS", "hello read counter").split()
# The endpoints whose top functions by inclusive cost are listed.
TOP_FOR = os.environ.get("TOP_FOR", "counter").split()
TOP_COUNT = int(os.environ.get("TOP_COUNT", "15"))
# EVENT_LOOPS=N: `msm serve --event-loops N` (default: NIO's, one loop per core; the end-to-end runs pin
# the server to one core, where `msm serve` runs one loop). MSM_GLOBAL_EXECUTOR passes through.
EVENT_LOOPS = os.environ.get("EVENT_LOOPS", "")
# REUSE=1: the dumps already in WORKDIR are read again (only the report is made anew).
REUSE = os.environ.get("REUSE") == "1"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=120, process=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}) before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"nothing listens on {port} after {timeout} s")


class Client:
    """One keep-alive HTTP/1.1 connection, one request at a time, the session cookie kept."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buffer = b""
        self.cookie = None

    def get(self, path):
        headers = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if self.cookie:
            headers += f"Cookie: {self.cookie}\r\n"
        self.sock.sendall((headers + "\r\n").encode())
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise SystemExit("the server closed the connection")
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value.strip())
            elif name.lower() == "set-cookie":
                pair = value.strip().split(";", 1)[0]
                if pair.split("=", 1)[1]:
                    self.cookie = pair
        while len(self.buffer) < length:
            self.buffer += self.sock.recv(65536)
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        if status != 200:
            raise SystemExit(f"{path}: HTTP {status} {body[:200]!r}")
        return body


def shim(workdir):
    """Valgrind 3.19's rt_sigsuspend wrapper writes into the signal mask it is handed, and
    libdispatch's dispatch_main (the main thread of an `async main`, once it has started the
    executor) hands it a const mask in read-only memory: valgrind dies with an internal SIGSEGV as
    the program starts its threads. A preloaded sigsuspend that passes a writable copy avoids it
    (the same system call, the same instructions counted in the program)."""
    library = os.path.join(workdir, "libsigsuspend-shim.so")
    if not os.path.exists(library):
        source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sigsuspend-shim.c")
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", source, "-o", library], check=True)
    return library


def measure(label, binary, mode, endpoint, workdir):
    """Instructions per request (the requests' window less an idle window as long), and the
    per-group split of the same difference, and the dump of the requests' window."""
    reference = mode == "memory"
    out = os.path.join(workdir, f"callgrind.{label}.{mode}.{endpoint}")
    if REUSE and os.path.exists(out + ".1") and os.path.exists(out + ".2"):
        return report(label, mode, endpoint, out, window=None)
    m1, m2, port = free_port(), free_port(), free_port()
    user = ["-u", "nobody"] if os.getuid() == 0 else []
    memcached = [] if reference else [
        subprocess.Popen(["memcached", "-l", "127.0.0.1", "-p", str(p), "-U", "0", "-m", "64"] + user) for p in (m1, m2)]
    for stale in (out + ".1", out + ".2"):
        if os.path.exists(stale):
            os.remove(stale)
    # Valgrind 3.19 cannot read the DWARF 5 the Swift toolchain writes: a copy without debug
    # information (the symbol table stays, so functions keep their names).
    stripped = os.path.join(workdir, f"bin.{label}")
    if not os.path.exists(stripped):
        subprocess.run(["strip", "--strip-debug", "-o", stripped, binary], check=True)
    binary = stripped
    if reference:
        # Hummingbird's in-memory sessions (the shared workload's app): PORT from the environment.
        arguments = []
    else:
        # "sticky-sync": sticky mode with synchronous saves (`--sync-saves`).
        arguments = ["serve", "--mode", "sticky" if mode.startswith("sticky") else mode,
                     "--nodes", f"n1:127.0.0.1:{m1},n2:127.0.0.1:{m2}", "--port", str(port)]
        if mode.startswith("sticky"):
            arguments += ["--route", "b1"]
        if mode == "sticky-sync":
            arguments += ["--sync-saves"]
        if EVENT_LOOPS:
            arguments += ["--event-loops", EVENT_LOOPS]
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", binary] + arguments,
        stdout=subprocess.DEVNULL, stderr=open(out + ".log", "w"),
        env=dict(os.environ, LD_PRELOAD=shim(workdir), PORT=str(port)))
    try:
        for p in (m1, m2) if memcached else ():
            wait_port(p)
        wait_port(port, timeout=300, process=server)
        client = Client(port)
        client.get("/counter")
        for _ in range(WARMUP):
            client.get("/" + endpoint)
        control = lambda *args: subprocess.run(["callgrind_control", *args, str(server.pid)], check=True, capture_output=True)
        control("--instr=on")
        started = time.monotonic()
        for _ in range(REQUESTS):
            client.get("/" + endpoint)
        window = time.monotonic() - started
        control("--instr=off")
        control("--dump")
        # The same wall time with no request: the work of timers and periodic tasks (probes,
        # samples, heartbeats, notice reads), which valgrind's slowness stretches over many more
        # requests' worth of wall time than a real run. Subtracted from the window above.
        control("--instr=on")
        time.sleep(window)
        control("--instr=off")
        control("--dump")
        time.sleep(1)
    finally:
        server.terminate()
        server.wait(timeout=120)
        for m in memcached:
            m.terminate()
            m.wait()
    return report(label, mode, endpoint, out, window)


def report(label, mode, endpoint, out, window):
    """(instructions per request, per group, per function) from the two dumps."""
    functions = {}
    for sign, suffix in ((1, ".1"), (-1, ".2")):
        for count, function, obj in annotate(out + suffix, inclusive=False):
            # The server's own executable under one name, so that servers compare function by function.
            obj = "the server" if os.path.basename(obj).startswith("bin.") else obj
            functions[(function, obj)] = functions.get((function, obj), 0) + sign * count / REQUESTS
    net = {group: 0.0 for group in GROUPS}
    for (function, obj), count in functions.items():
        net[group_of(function, obj)] += count
    busy = sum(count for count, _, _ in annotate(out + ".1", inclusive=False)) / REQUESTS
    print(f"  {label} {mode} /{endpoint}: {busy:,.0f} per request with the window's idle work"
          + (f" ({window:.1f} s)" if window else ""), file=sys.stderr, flush=True)
    return sum(net.values()), net, functions


# What each function is counted as: by the library it is in, and in the executable by the module
# its mangled name starts with (a generic specialized into a module counts as the generic's).
GROUPS = ["ours", "SwiftNIO", "Hummingbird", "other packages", "Swift stdlib", "Swift runtime", "Foundation", "libc"]
OURS = {"Memcached", "MemcachedSessions", "MemcachedSessionsHummingbird", "MemcachedSessionsOperations",
        "MemcachedSessionsVapor", "MSMApp", "msm", "HBSessions"}


def group_of(function, obj):
    name = os.path.basename(obj)
    if name.startswith("libswiftCore"):
        # The standard library's Swift code (String, Array, ...) beside the runtime's C++ (retain
        # and release, metadata, exclusivity, casts).
        return "Swift stdlib" if function.startswith("$s") else "Swift runtime"
    if re.match(r"lib(swift_Concurrency|swiftSynchronization|swift_StringProcessing|swiftDispatch|dispatch|BlocksRuntime|swift_RegexParser)", name):
        # Concurrency: task allocation, executors, continuations, cancellation handlers.
        return "Swift runtime"
    if "Foundation" in name or "ICU" in name or "icu" in name:
        return "Foundation"
    if name.startswith(("libc.", "libc-", "ld-linux", "libm.", "libpthread", "libstdc++", "libgcc", "libsigsuspend")):
        return "libc"
    match = re.match(r"\$s(\d+)", function)
    if match:
        digits = match.group(1)
        module = function[2 + len(digits):2 + len(digits) + int(digits)]
        if module in OURS:
            return "ours"
        if module.startswith(("NIO", "_NIO", "CNIO")):
            return "SwiftNIO"
        if module.startswith("Hummingbird"):
            return "Hummingbird"
        return "other packages"
    if function.startswith(("$ss", "$sS")):
        return "Swift stdlib"  # its generics, specialized into the binary
    if function.startswith(("c_nio", "CNIO")):
        return "SwiftNIO"
    return "other packages"


def annotate(path, inclusive):
    """(instructions, function, object) per function of a dump."""
    result = subprocess.run(["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}", "--threshold=100", path],
                            check=True, capture_output=True, text=True).stdout
    rows = []
    for line in result.splitlines():
        match = re.match(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(\S*?):(.+)\s\[(.+)\]\s*$", line)
        if match:
            rows.append((int(match.group(1).replace(",", "")), match.group(3).strip(), match.group(4)))
    return rows


def demangle(names):
    try:
        out = subprocess.run(["swift-demangle", "--simplified", "--compact"], input="\n".join(names), check=True,
                             capture_output=True, text=True).stdout.splitlines()
        return out if len(out) == len(names) else names
    except (OSError, subprocess.CalledProcessError):
        return names


def top_functions(functions, count=TOP_COUNT, against=None):
    """The functions with the most instructions per request of their own (self cost), or, with
    `against`, the most more than in `against`."""
    keys = set(functions) | set(against or {})
    scored = sorted(keys, key=lambda k: functions.get(k, 0) - (against or {}).get(k, 0), reverse=True)[:count]
    names = demangle([function for function, _ in scored])
    lines = []
    for key, name in zip(scored, names):
        short = name if len(name) <= 100 else name[:97] + "..."
        cells = f"{functions.get(key, 0):,.0f}"
        if against is not None:
            cells = f"{functions.get(key, 0) - against.get(key, 0):+,.0f} | {cells} | {against.get(key, 0):,.0f}"
        lines.append(f"| {cells} | {group_of(*key)} | `{short.replace('|', '/')}` |")
    return lines


def main():
    binaries = [arg.split("=", 1) for arg in sys.argv[1:]]
    if not binaries:
        raise SystemExit(__doc__)
    workdir = os.environ.get("WORKDIR") or tempfile.mkdtemp(prefix="msm-callgrind-")
    os.makedirs(workdir, exist_ok=True)
    # (label, mode) pairs: msm binaries in each mode, a reference (label hb-memory) once.
    runs = []
    for label, binary in binaries:
        for mode in (["memory"] if label.startswith("hb-memory") else MODES):
            runs.append((label, binary, mode))
    results = {}
    for label, binary, mode in runs:
        for endpoint in ENDPOINTS:
            results[(label, mode, endpoint)] = measure(label, binary, mode, endpoint, workdir)
            print(f"{label} {mode} /{endpoint}: {results[(label, mode, endpoint)][0]:,.0f} instructions per request",
                  file=sys.stderr, flush=True)
    references = {endpoint: value[0] for (label, mode, endpoint), value in results.items() if mode == "memory"}
    lines = ["Instructions per request (the requests' window less an idle window as long), and by whom:", "",
             "| server | mode | endpoint | instructions/request | vs hb-memory | " + " | ".join(GROUPS) + " |",
             "| --- | --- | --- | ---: | ---: | " + " | ".join("---:" for _ in GROUPS) + " |"]
    for label, _, mode in runs:
        for endpoint in ENDPOINTS:
            total, net, _ = results[(label, mode, endpoint)]
            ratio = f"{total / references[endpoint]:.2f}x" if endpoint in references and references[endpoint] else "-"
            lines.append(f"| {label} | {mode} | /{endpoint} | {total:,.0f} | {ratio} | "
                         + " | ".join(f"{net[g]:,.0f}" for g in GROUPS) + " |")
    reference_functions = {endpoint: value[2] for (label, mode, endpoint), value in results.items() if mode == "memory"}
    for label, _, mode in runs:
        for endpoint in TOP_FOR:
            if (label, mode, endpoint) not in results:
                continue
            functions = results[(label, mode, endpoint)][2]
            lines += ["", f"Top functions by their own instructions per request (self cost), {label} {mode} /{endpoint}:", "",
                      "| instructions/request | group | function |", "| ---: | --- | --- |"]
            lines += top_functions(functions)
            if mode != "memory" and endpoint in reference_functions:
                lines += ["", f"What {label} {mode} /{endpoint} runs more than hb-memory /{endpoint}, function by function:", "",
                          "| more | ours | hb-memory | group | function |", "| ---: | ---: | ---: | --- | --- |"]
                lines += top_functions(functions, against=reference_functions[endpoint])
    table = "\n".join(lines)
    print(table)
    if os.environ.get("OUT"):
        with open(os.environ["OUT"], "w") as f:
            f.write(table + "\n")
    print(f"callgrind files in {workdir}", file=sys.stderr)


if __name__ == "__main__":
    main()
