#!/usr/bin/env python3
"""instructions.py — instructions per request of `msm serve`, counted by callgrind: deterministic,
so that a change can be judged on a shared, noisy machine (req/s ratios are the figures to report,
instruction counts the figure to steer by).

For each binary (LABEL=PATH), mode and endpoint: two memcached nodes, `msm serve` under
`valgrind --tool=callgrind --instr-atstart=no`, a warm-up, then instrumentation switched on for
exactly REQUESTS sequential keep-alive requests from this script (one session: /counter creates it,
then every request carries its cookie), switched off, dumped; the dump's total divided by REQUESTS.
Every thread of the server counts (event loops, the memcached client, the asynchronous writer).

  scripts/bench/instructions.py after=.build/release/msm before=/tmp/before/.build/release/msm
  REQUESTS=2000 MODES="sticky non-sticky" ENDPOINTS="read counter" scripts/bench/instructions.py ...
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


def measure(label, binary, mode, endpoint, workdir):
    m1, m2, port = free_port(), free_port(), free_port()
    user = ["-u", "nobody"] if os.getuid() == 0 else []
    memcached = [subprocess.Popen(["memcached", "-l", "127.0.0.1", "-p", str(p), "-U", "0", "-m", "64"] + user) for p in (m1, m2)]
    out = os.path.join(workdir, f"callgrind.{label}.{mode}.{endpoint}")
    # Valgrind 3.19 cannot read the DWARF 5 the Swift toolchain writes: a copy without debug
    # information (the symbol table stays, so functions keep their names).
    stripped = os.path.join(workdir, f"msm.{label}")
    if not os.path.exists(stripped):
        subprocess.run(["strip", "--strip-debug", "-o", stripped, binary], check=True)
    binary = stripped
    arguments = ["serve", "--mode", mode, "--nodes", f"n1:127.0.0.1:{m1},n2:127.0.0.1:{m2}", "--port", str(port)]
    if mode == "sticky":
        arguments += ["--route", "b1"]
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", binary] + arguments,
        stdout=subprocess.DEVNULL, stderr=open(out + ".log", "w"))
    try:
        for p in (m1, m2):
            wait_port(p)
        wait_port(port, timeout=300, process=server)
        client = Client(port)
        client.get("/counter")
        for _ in range(WARMUP):
            client.get("/" + endpoint)
        subprocess.run(["callgrind_control", "--instr=on", str(server.pid)], check=True, capture_output=True)
        for _ in range(REQUESTS):
            client.get("/" + endpoint)
        subprocess.run(["callgrind_control", "--instr=off", str(server.pid)], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "--dump", str(server.pid)], check=True, capture_output=True)
        time.sleep(1)
    finally:
        server.terminate()
        server.wait(timeout=120)
        for m in memcached:
            m.terminate()
            m.wait()
    # The dump on demand is file.1 (or .N): the instrumented window only.
    dumps = sorted(n for n in os.listdir(workdir) if n.startswith(os.path.basename(out) + "."))
    dumps = [n for n in dumps if not n.endswith(".log")]
    total = 0
    if dumps:
        for line in open(os.path.join(workdir, dumps[0])):
            match = re.match(r"^(summary|totals):\s+(\d+)", line)
            if match:
                total = int(match.group(2))
    return total / REQUESTS


def main():
    binaries = [arg.split("=", 1) for arg in sys.argv[1:]]
    if not binaries:
        raise SystemExit(__doc__)
    workdir = os.environ.get("WORKDIR") or tempfile.mkdtemp(prefix="msm-callgrind-")
    os.makedirs(workdir, exist_ok=True)
    results = {}
    for mode in MODES:
        for endpoint in ENDPOINTS:
            for label, binary in binaries:
                value = measure(label, binary, mode, endpoint, workdir)
                results[(mode, endpoint, label)] = value
                print(f"{label} {mode} /{endpoint}: {value:,.0f} instructions per request", file=sys.stderr, flush=True)
    labels = [label for label, _ in binaries]
    lines = [f"| mode | endpoint | " + " | ".join(f"{label} (instructions/request)" for label in labels)
             + ("" if len(labels) < 2 else f" | {labels[0]} / {labels[1]}") + " |",
             "| --- | --- | " + " | ".join("---:" for _ in labels) + ("" if len(labels) < 2 else " | ---:") + " |"]
    for mode in MODES:
        for endpoint in ENDPOINTS:
            values = [results[(mode, endpoint, label)] for label in labels]
            row = f"| {mode} | /{endpoint} | " + " | ".join(f"{v:,.0f}" for v in values)
            if len(values) >= 2:
                row += f" | {values[0] / values[1]:.3f}"
            lines.append(row + " |")
    table = "\n".join(lines)
    print(table)
    if os.environ.get("OUT"):
        with open(os.environ["OUT"], "w") as f:
            f.write(table + "\n")
    print(f"callgrind files in {workdir}", file=sys.stderr)


if __name__ == "__main__":
    main()
