#!/usr/bin/env python3
"""Chaos drills with real processes (issue 8 §4).

Real `msm serve` instances (release build), real memcached processes, real HTTP, under a checked
`/counter` load: every browser sends one request at a time and every count it is answered with is
checked against what it was answered before (0 lost, backwards or skipped counts; a request that
failed may or may not have counted, so the next count may be one higher for each).

The drills, each on a running cluster, one after the other:
  freeze   SIGSTOP the memcached node holding most sessions longer than the request timeout, SIGCONT
  drop     nftables drops every packet to and from that node's port, then the rule goes
  slow     the proxied node answers late (a delay below the request timeout, then above it)
  flap     the proxied node drops its connections and refuses new ones every few hundred ms
  restart  kill -9 the busiest node and start an empty memcached on its port at once
  app-kill kill -9 an app instance while requests are in flight; it comes back after a while
After each drill some sessions log out, and every cookie they ever held (old primaries of a
failover included) is read on every instance: none may be served again. Every request must end
within 3x its bound (lockWaitBudget when locking + nodes x requestTimeout + saveTimeout + 1 s).

The slow and flapping node sits behind a small fault-injecting TCP proxy in this script (delay,
stall, drop connections, refuse); the other nodes are reached directly, so that a killed node
refuses connections as a real one does.

  scripts/drills/chaos.py                     # full drills, all modes, writes docs/drills.md
  scripts/drills/chaos.py --short             # the CI version (shorter faults, fewer browsers)
  scripts/drills/chaos.py --modes non-sticky --drills freeze,drop

Exits 1 when any guarantee broke (the table says which), 2 on a set-up problem.
"""
import argparse
import asyncio
import http.client
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COOKIE = "SESSION_ID"
REQUEST_TIMEOUT = 0.5  # msm serve's requestTimeout and connectTimeout (AppServer.swift)
SAVE_TIMEOUT = 0.5  # SessionManager.Configuration default
LOCK_WAIT_BUDGET = 10.0  # SessionManager.Configuration default
NODES = 3


class SetupError(Exception):
    pass


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise SetupError(f"timed out after {timeout} s waiting for {what}")


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# --- the fault-injecting proxy -------------------------------------------------------------------


class FaultProxy:
    """A TCP proxy on its own asyncio loop (a thread): forwards bytes both ways, with controls.

    delay: seconds every chunk waits before it is forwarded (both directions);
    refusing: new connections are closed at once; drop_connections(): closes every open one."""

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.port = free_port()
        self.delay = 0.0
        self.refusing = False
        self.connections = set()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.ready.wait(5):
            raise SetupError("fault proxy did not start")

    def _run(self):
        asyncio.set_event_loop(self.loop)

        async def start():
            self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
            self.ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    async def _accept(self, reader, writer):
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self.connections.add(pair)

        async def pump(source, sink):
            try:
                while True:
                    chunk = await source.read(65536)
                    if not chunk:
                        break
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    sink.write(chunk)
                    await sink.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                writer.transport.abort()
                up_writer.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self.connections.discard(pair)

    def _call(self, function):
        done = threading.Event()

        def run():
            function()
            done.set()

        self.loop.call_soon_threadsafe(run)
        done.wait(5)

    def set_delay(self, seconds):
        self._call(lambda: setattr(self, "delay", seconds))

    def set_refusing(self, refusing):
        self._call(lambda: setattr(self, "refusing", refusing))

    def drop_connections(self):
        def drop():
            for client, upstream in list(self.connections):
                client.transport.abort()
                upstream.transport.abort()

        self._call(drop)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# --- processes -----------------------------------------------------------------------------------


class Memcached:
    def __init__(self, node_id, state):
        self.node_id = node_id
        self.port = free_port()
        self.state = state
        self.process = None
        self.start()

    def start(self):
        log = open(os.path.join(self.state, f"memcached-{self.node_id}.log"), "ab")
        self.process = subprocess.Popen(
            ["memcached", "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-m", "64", "-t", "1", "-u", "root"],
            stdout=log, stderr=log)
        wait_for(lambda: port_open(self.port) or self.process.poll() is not None, 10, f"memcached {self.node_id}")
        if self.process.poll() is not None:
            raise SetupError(f"memcached {self.node_id} exited ({self.process.returncode})")

    def kill(self):
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)


class App:
    def __init__(self, index, mode, nodes, state, binary):
        self.index = index
        self.route = f"a{index + 1}"
        self.port = free_port()
        self.mode = mode
        self.nodes = nodes
        self.state = state
        self.binary = binary
        self.process = None
        self.start()

    def start(self):
        arguments = [self.binary, "serve", "--framework", "hummingbird", "--port", str(self.port), "--nodes", self.nodes,
                     "--instance", self.route]
        if self.mode == "non-sticky":
            arguments += ["--mode", "non-sticky"]
        elif self.mode == "non-sticky-locked":
            arguments += ["--mode", "non-sticky", "--locking", "all"]
        elif self.mode == "sticky-sync":
            arguments += ["--mode", "sticky", "--route", self.route, "--sync-saves"]
        else:
            raise SetupError(f"unknown mode {self.mode}")
        log = open(os.path.join(self.state, f"app-{self.route}.log"), "ab")
        self.process = subprocess.Popen(arguments, stdout=log, stderr=log)

        def ready():
            if self.process.poll() is not None:
                return True
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                connection.request("GET", "/hello")
                return connection.getresponse().status == 200
            except (OSError, http.client.HTTPException):
                return False

        wait_for(ready, 30, f"msm serve {self.route}")
        if self.process.poll() is not None:
            raise SetupError(f"msm serve {self.route} exited ({self.process.returncode}); see {log.name}")

    def kill(self):
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


# --- the checked load ----------------------------------------------------------------------------


class Browser:
    """One user sending one request at a time, with the session cookie and every cookie it held."""

    def __init__(self, number, apps, sticky):
        self.number = number
        self.apps = apps
        self.sticky = sticky
        self.connections = {}
        self.reset()

    def reset(self):
        self.cookie = None
        self.acked = 0  # the last count a 200 answered
        self.uncertain = 0  # requests since then that failed (each may or may not have counted)
        self.history = set()

    def node(self):
        return self.cookie.split("-", 1)[1].split(".")[0] if self.cookie and "-" in self.cookie else None

    def pick(self):
        """The load balancer: round robin (non-sticky), or the cookie's route with the others as
        backups (sticky, as the demo's nginx does)."""
        if self.sticky and self.cookie and "." in self.cookie:
            route = self.cookie.rsplit(".", 1)[1]
            owners = [app for app in self.apps if app.route == route]
            if owners and owners[0].process.poll() is None:
                return owners[0]
        return random.choice(self.apps)

    def request(self, app, method, path, cookie, timeout=30):
        connection = self.connections.get(app.port)
        if connection is None:
            connection = http.client.HTTPConnection("127.0.0.1", app.port, timeout=timeout)
            self.connections[app.port] = connection
        headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie else {}
        try:
            connection.request(method, path, headers=headers)
            response = connection.getresponse()
            body = response.read().decode(errors="replace")
        except (OSError, http.client.HTTPException):
            connection.close()
            self.connections.pop(app.port, None)
            raise
        set_cookie = None
        for name, value in response.getheaders():
            if name.lower() == "set-cookie" and value.startswith(COOKIE + "="):
                set_cookie = value.split(";", 1)[0][len(COOKIE) + 1:]
        return response.status, body, set_cookie


class Load:
    """Browsers on threads; every request recorded as (start, duration, ok) and every count checked."""

    def __init__(self, apps, browsers, sticky):
        self.browsers = [Browser(number, apps, sticky) for number in range(browsers)]
        self.lock = threading.Lock()
        self.records = []
        self.violations = []
        self.running = threading.Event()
        self.paused = threading.Event()
        self.idle = {}
        self.threads = []

    def start(self):
        self.running.set()
        for browser in self.browsers:
            thread = threading.Thread(target=self._run, args=(browser,), daemon=True)
            self.idle[browser.number] = threading.Event()
            thread.start()
            self.threads.append(thread)

    def stop(self):
        self.running.clear()
        for thread in self.threads:
            thread.join(60)

    def pause(self):
        """Stops the browsers between requests; returns once every one is idle."""
        self.paused.set()
        for event in self.idle.values():
            if not event.wait(60):
                raise SetupError("a browser did not finish its request within 60 s")

    def resume(self):
        for event in self.idle.values():
            event.clear()
        self.paused.clear()

    def _run(self, browser):
        while self.running.is_set():
            if self.paused.is_set():
                self.idle[browser.number].set()
                time.sleep(0.01)
                continue
            self.step(browser)

    def step(self, browser):
        """One checked `/counter` request."""
        app = browser.pick()
        started = time.monotonic()
        before = browser.cookie
        refused = False
        try:
            status, body, set_cookie = browser.request(app, "GET", "/counter", before)
        except ConnectionRefusedError:
            # Nothing reached the instance (it is down): the request did not count. A load
            # balancer would try the next instance; so does the browser's next request.
            status, body, set_cookie, refused = None, "", None, True
        except (OSError, http.client.HTTPException):
            status, body, set_cookie = None, "", None
        duration = time.monotonic() - started
        if set_cookie is not None:
            browser.cookie = set_cookie or None
            if set_cookie:
                browser.history.add(set_cookie)
        ok = status == 200
        self.record(started, duration, ok, refused)
        if not ok:
            if not refused:
                browser.uncertain += 1
            time.sleep(0.02)
            return
        try:
            count = int(body.strip())
        except ValueError:
            self._violate(f"browser {browser.number}: /counter answered {body[:80]!r}")
            return
        low, high = browser.acked + 1, browser.acked + 1 + browser.uncertain
        if before is None or browser.acked == 0:
            low = 1
        if count < low:
            self._violate(f"browser {browser.number}: count {count} after {browser.acked} (lost or backwards; "
                          f"node {browser.node()}, {'new cookie' if browser.cookie != before else 'same cookie'})")
        elif count > high:
            self._violate(f"browser {browser.number}: count {count} after {browser.acked} with "
                          f"{browser.uncertain} failed requests (skipped)")
        browser.acked = count
        browser.uncertain = 0

    def record(self, started, duration, ok, refused):
        with self.lock:
            self.records.append((started, duration, ok, refused))

    def _violate(self, message):
        with self.lock:
            self.violations.append(message)

    def window(self, start, end):
        with self.lock:
            return [record for record in self.records if start <= record[0] < end]


# --- drills --------------------------------------------------------------------------------------


class Cluster:
    def __init__(self, mode, browsers, binary, state):
        self.mode = mode
        self.state = state
        self.memcached = [Memcached(f"n{index + 1}", state) for index in range(NODES)]
        # The last node is reached through the fault proxy (slow and flapping drills).
        self.proxy = FaultProxy(self.memcached[-1].port)
        ports = [m.port for m in self.memcached[:-1]] + [self.proxy.port]
        nodes = ",".join(f"n{index + 1}:127.0.0.1:{port}" for index, port in enumerate(ports))
        self.apps = [App(index, mode, nodes, state, binary) for index in range(2)]
        self.load = Load(self.apps, browsers, sticky=mode.startswith("sticky"))
        self.nft_table = None

    def busiest_direct_node(self):
        counts = {}
        for browser in self.load.browsers:
            node = browser.node()
            if node and node != f"n{NODES}":
                counts[node] = counts.get(node, 0) + 1
        node = max(counts, key=counts.get) if counts else "n1"
        return next(m for m in self.memcached if m.node_id == node)

    def busiest_app(self):
        counts = {}
        for browser in self.load.browsers:
            if browser.cookie and "." in browser.cookie:
                route = browser.cookie.rsplit(".", 1)[1]
                counts[route] = counts.get(route, 0) + 1
        route = max(counts, key=counts.get) if counts else "a1"
        return next(app for app in self.apps if app.route == route)

    def bound(self):
        locking = LOCK_WAIT_BUDGET if self.mode == "non-sticky-locked" else 0.0
        return locking + NODES * REQUEST_TIMEOUT + SAVE_TIMEOUT + 1.0

    def drop_packets(self, port):
        self.nft_table = f"msm_drill_{os.getpid()}"
        for command in (
            f"add table inet {self.nft_table}",
            f"add chain inet {self.nft_table} out {{ type filter hook output priority 0 ; }}",
            f"add rule inet {self.nft_table} out tcp dport {port} drop",
            f"add rule inet {self.nft_table} out tcp sport {port} drop",
        ):
            subprocess.run(["nft"] + command.split(), check=True)

    def restore_packets(self):
        if self.nft_table:
            subprocess.run(["nft", "delete", "table", "inet", self.nft_table], check=False)
            self.nft_table = None

    def close(self):
        self.restore_packets()
        for app in self.apps:
            app.stop()
        for memcached in self.memcached:
            memcached.kill()
        self.proxy.close()


def run_drill(cluster, name, fault_seconds, recovery_seconds):
    """Runs one drill on a cluster under load; returns its row."""
    load = cluster.load
    target = ""
    violations_before = len(load.violations)
    start = time.monotonic()
    if name == "freeze":
        node = cluster.busiest_direct_node()
        target = node.node_id
        os.kill(node.process.pid, signal.SIGSTOP)
        time.sleep(fault_seconds)
        os.kill(node.process.pid, signal.SIGCONT)
    elif name == "drop":
        node = cluster.busiest_direct_node()
        target = node.node_id
        cluster.drop_packets(node.port)
        time.sleep(fault_seconds)
        cluster.restore_packets()
    elif name == "slow":
        target = f"n{NODES} (proxy)"
        cluster.proxy.set_delay(REQUEST_TIMEOUT * 0.6)
        time.sleep(fault_seconds / 2)
        cluster.proxy.set_delay(REQUEST_TIMEOUT * 1.6)
        time.sleep(fault_seconds / 2)
        cluster.proxy.set_delay(0)
    elif name == "flap":
        target = f"n{NODES} (proxy)"
        deadline = time.monotonic() + fault_seconds
        down = False
        while time.monotonic() < deadline:
            down = not down
            cluster.proxy.set_refusing(down)
            if down:
                cluster.proxy.drop_connections()
            time.sleep(0.3)
        cluster.proxy.set_refusing(False)
    elif name == "restart":
        node = cluster.busiest_direct_node()
        target = node.node_id
        node.kill()
        node.start()
        time.sleep(fault_seconds)
    elif name == "app-kill":
        app = cluster.busiest_app() if cluster.mode.startswith("sticky") else cluster.apps[0]
        target = app.route
        app.kill()
        time.sleep(fault_seconds)
        app.start()
    else:
        raise SetupError(f"unknown drill {name}")
    fault_end = time.monotonic()
    time.sleep(recovery_seconds)
    end = time.monotonic()
    during = load.window(start, fault_end)
    after = load.window(fault_end, end)
    violations = load.violations[violations_before:]
    load.pause()
    served_after_logout = logout_check(cluster)
    load.resume()
    row = {
        "mode": cluster.mode, "drill": name, "target": target,
        "requests": len(during) + len(after),
        "failed_during": sum(1 for r in during if not r[2] and not r[3]),
        "failed_after": sum(1 for r in after if not r[2] and not r[3]),
        "refused": sum(1 for r in during + after if r[3]),
        "max_during": max((r[1] for r in during), default=0.0),
        "max_after": max((r[1] for r in after), default=0.0),
        "ok_after": sum(1 for r in after if r[2]),
        "bound": cluster.bound(),
        "violations": violations,
        "served_after_logout": served_after_logout,
    }
    return row


def logout_check(cluster):
    """Half of the sessions log out (those whose cookie changed first); every cookie they ever held
    is then read on every instance and must find nothing. Returns the cookies still served."""
    browsers = sorted(cluster.load.browsers, key=lambda b: -len(b.history))
    served = 0
    for browser in browsers[: max(1, len(browsers) // 2)]:
        if not browser.cookie:
            continue
        app = browser.pick()
        try:
            status, _, _ = browser.request(app, "POST", "/logout", browser.cookie)
        except (OSError, http.client.HTTPException):
            status = None
        if status != 303:
            # Not logged out (the instance could not reach memcached): nothing to check; the
            # browser keeps its session.
            continue
        for cookie in browser.history | {browser.cookie}:
            for other in cluster.apps:
                if other.process.poll() is not None:
                    continue
                try:
                    status, body, _ = browser.request(other, "GET", "/read", cookie)
                except (OSError, http.client.HTTPException):
                    continue
                if status == 200 and body.strip() not in ("0", ""):
                    served += 1
                    node = cookie.split("-", 1)[1] if "-" in cookie else "?"
                    print(f"   SERVED AFTER LOGOUT: browser {browser.number}, "
                          f"{'its last' if cookie == browser.cookie else 'an older'} cookie (node {node}) "
                          f"read count {body.strip()} on {other.route}", flush=True)
        browser.reset()
    return served


def run_mode(mode, drills, arguments, binary):
    state = tempfile.mkdtemp(prefix=f"msm-drills-{mode}-")
    cluster = Cluster(mode, arguments.browsers, binary, state)
    rows = []
    try:
        cluster.load.start()
        time.sleep(arguments.warmup)
        for drill in drills:
            print(f"== {mode}: {drill}", flush=True)
            row = run_drill(cluster, drill, arguments.fault, arguments.recovery)
            print(format_row(row), flush=True)
            for violation in row["violations"][:10]:
                print(f"   VIOLATION {violation}", flush=True)
            rows.append(row)
    finally:
        cluster.load.stop()
        cluster.close()
    return rows, state


def broke(row):
    reasons = []
    if row["violations"]:
        reasons.append(f"{len(row['violations'])} count violations")
    if row["served_after_logout"]:
        reasons.append(f"{row['served_after_logout']} logged-out cookies served")
    if max(row["max_during"], row["max_after"]) > 3 * row["bound"]:
        reasons.append(f"a request took {max(row['max_during'], row['max_after']):.1f} s > 3 x {row['bound']:.1f} s")
    if row["ok_after"] == 0:
        reasons.append("no request succeeded after the fault")
    return reasons


def format_row(row):
    reasons = broke(row)
    return (f"| {row['mode']} | {row['drill']} | {row['target']} | {row['requests']} | {row['refused']} | {row['failed_during']} | "
            f"{row['failed_after']} | {row['max_during']:.2f} | {row['max_after']:.2f} | {row['bound']:.1f} | "
            f"{len(row['violations'])} | {row['served_after_logout']} | {'; '.join(reasons) or 'ok'} |")


def nft_usable():
    try:
        return subprocess.run(["nft", "list", "tables"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="the CI version: shorter faults, fewer browsers")
    parser.add_argument("--modes", default="non-sticky,non-sticky-locked,sticky-sync")
    parser.add_argument("--drills", default="freeze,drop,slow,flap,restart,app-kill")
    parser.add_argument("--browsers", type=int)
    parser.add_argument("--fault", type=float, help="seconds each fault lasts")
    parser.add_argument("--recovery", type=float, help="seconds of load after each fault")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--keep-logs", action="store_true", help="keep each mode's logs (kept anyway when a drill breaks)")
    parser.add_argument("--binary", default=os.path.join(ROOT, ".build", "release", "msm"))
    parser.add_argument("--output", help="the table (default: docs/drills.md for a full run, none for --short)")
    arguments = parser.parse_args()
    arguments.browsers = arguments.browsers or (8 if arguments.short else 16)
    arguments.fault = arguments.fault or (2.0 if arguments.short else 8.0)
    arguments.recovery = arguments.recovery or (2.0 if arguments.short else 5.0)
    if arguments.output is None and not arguments.short:
        arguments.output = os.path.join(ROOT, "docs", "drills.md")
    if not os.access(arguments.binary, os.X_OK):
        print(f"no msm binary at {arguments.binary}: swift build -c release --traits Tools --product msm", file=sys.stderr)
        return 2
    drills = arguments.drills.split(",")
    if "drop" in drills and not nft_usable():
        if arguments.drills != parser.get_default("drills"):
            print("the drop drill needs nftables (apt-get install nftables) and root", file=sys.stderr)
            return 2
        print("== skipping the drop drill: it needs nftables (apt-get install nftables) and root", file=sys.stderr)
        drills.remove("drop")
    rows = []
    started = time.monotonic()
    try:
        for mode in arguments.modes.split(","):
            mode_rows, state = run_mode(mode, drills, arguments, arguments.binary)
            rows += mode_rows
            if any(broke(row) for row in mode_rows) or arguments.keep_logs:
                print(f"== {mode}: logs in {state}", flush=True)
            else:
                shutil.rmtree(state, ignore_errors=True)
    except SetupError as error:
        print(f"set-up failed: {error}", file=sys.stderr)
        return 2
    header = ("| mode | drill | fault on | requests | refused (instance down) | failed during | failed after | "
              "max latency during (s) | max latency after (s) | bound (s) | count violations | logged-out cookies served | result |\n"
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    table = header + "\n" + "\n".join(format_row(row) for row in rows)
    failed = [row for row in rows if broke(row)]
    print(table)
    print(f"== drills: {len(rows)} run in {time.monotonic() - started:.0f} s, {len(failed)} broke a guarantee")
    if arguments.output:
        with open(arguments.output, "w") as out:
            out.write(DOC_HEAD.format(browsers=arguments.browsers, fault=arguments.fault, recovery=arguments.recovery,
                                      date=time.strftime("%Y-%m-%d", time.gmtime())))
            out.write(table + "\n")
            out.write(DOC_TAIL)
    return 1 if failed else 0


DOC_HEAD = """# Chaos drills

Written by `scripts/drills/chaos.py` (issue 8 §4) on {date}: real `msm serve` instances (release
build, Hummingbird, 2 instances), 3 real memcached processes, real HTTP. {browsers} browsers each send
one `/counter` request at a time (non-sticky: to either instance; sticky: to the instance of the
cookie's route, the other when that one is down, as the demo's nginx does) and every count is
checked: never lower than the last acknowledged one, never higher than it plus one per failed
request in between (a request that failed may or may not have counted). Each fault lasts
{fault:g} s, then {recovery:g} s of load follow; then half of the sessions log out and every cookie they
ever held (those of earlier failovers included) is read on every instance: none may be served.

Faults: **freeze** `SIGSTOP` of the memcached node holding most sessions, then `SIGCONT`; **drop**
nftables drops every packet to and from that node's port; **slow** the third node (behind the
script's fault proxy) answers 300 ms late for half the fault, 800 ms late (past the 500 ms request
timeout) for the other half; **flap** that node's proxy drops every connection and refuses new
ones every 300 ms; **restart** `kill -9` of the busiest node and an empty memcached on its port at
once; **app-kill** `kill -9` of an app instance with requests in flight (sticky: the one owning
most sessions), restarted after the fault.

The bound is `lockWaitBudget` (locked mode only, 10 s) + 3 nodes x `requestTimeout` (0.5 s) +
`saveTimeout` (0.5 s) + 1 s; a drill fails when a request takes more than 3x that. "Refused"
counts connections to a killed app instance that were refused (nothing reached it; the browser's
next request goes to either instance, as a load balancer's retry would); "failed" counts non-200
answers and connections that broke with a request in flight (each may or may not have counted).

Reproduce: `swift build -c release --traits Tools --product msm && scripts/drills/chaos.py` (root, for nftables;
about {fault:g} + {recovery:g} s per drill). CI runs `scripts/drills/chaos.py --short`.

"""

DOC_TAIL = """
Failed requests during a fault are the price of the fault: a request whose session is on a frozen,
cut-off or flapping node waits for the request timeout and either moves (a new cookie) or answers
503 when its outcome is unknown (docs/guarantees.md). What may never happen, and is checked above:
a count lost, going backwards or skipped, a logged-out session served again, a request past 3x its
bound.
"""

if __name__ == "__main__":
    sys.exit(main())
