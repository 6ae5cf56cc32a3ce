#!/usr/bin/env python3
"""The status page, tested as a person would: in a real headless browser, under load.

Starts two memcached nodes and one `msm serve` with its management endpoints and metrics, puts a
checked /counter load on it, and opens `/_msm/` in Chromium (`chromium --headless --no-sandbox`,
driven over the DevTools protocol on a pipe, which also sends the Authorization header) twice,
10 s apart. Checks: the rendered DOM shows the node ids and a counter equal to the JSON endpoint's
(`/_msm/status`), the charts' points changed between the two visits, the page needs the token, and
`/metrics` serves Prometheus text with no session id in it. Keeps both screenshots in
test-artifacts/.

Usage: scripts/e2e/status_page_e2e.py [--msm .build/release/msm]
"""
import argparse
import base64
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKEN = "status-page-e2e-token-0123456789"


class Failure(Exception):
    pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise Failure(f"nothing listens on {port} after {timeout} s")


def get(port, path, token=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connection.request("GET", path, headers=headers)
    response = connection.getresponse()
    return response.status, response.read().decode()


class Load(threading.Thread):
    """Keeps /counter busy over a fixed set of sessions, checking every count."""

    def __init__(self, port, sessions=30):
        super().__init__(daemon=True)
        self.port = port
        self.cookies = [None] * sessions
        self.counts = [0] * sessions
        self.stop = threading.Event()
        self.mismatches = 0
        self.requests = 0
        self.error = None

    def one(self, connection, index):
        headers = {"Cookie": f"SESSION_ID={self.cookies[index]}"} if self.cookies[index] else {}
        connection.request("GET", "/counter", headers=headers)
        response = connection.getresponse()
        body = response.read().decode().strip()
        for name, value in response.getheaders():
            if name.lower() == "set-cookie" and value.startswith("SESSION_ID="):
                self.cookies[index] = value.split(";", 1)[0][len("SESSION_ID="):]
        if response.status != 200 or body != str(self.counts[index] + 1):
            self.mismatches += 1
        self.counts[index] = int(body) if body.isdigit() else self.counts[index]
        self.requests += 1

    def create_all(self):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        for index in range(len(self.cookies)):
            self.one(connection, index)

    def run(self):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            while not self.stop.is_set():
                for index in range(len(self.cookies)):
                    self.one(connection, index)
                time.sleep(0.005)
        except Exception as error:  # reported by the main thread
            self.error = f"{error!r} after {self.requests} requests"


class Browser:
    """Chromium driven over the DevTools protocol on a pipe (fds 3 and 4 of the browser)."""

    def __init__(self, binary):
        self.profile = tempfile.mkdtemp(prefix="msm-chromium-")
        to_browser_read, self.to_browser = os.pipe()
        self.from_browser, from_browser_write = os.pipe()
        # The DevTools pipe is the browser's fds 3 (commands in) and 4 (answers out): the shell
        # puts our pipe ends there and execs the browser.
        command = " ".join([
            binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "--window-size=1280,1600", "about:blank"])
        self.process = subprocess.Popen(
            ["/bin/sh", "-c", f"exec {command} 3<&{to_browser_read} 4>&{from_browser_write}"],
            pass_fds=(to_browser_read, from_browser_write), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_read)
        os.close(from_browser_write)
        self.buffer = b""
        self.next_id = 0
        self.events = []

    def send(self, method, params=None, session=None):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        wanted = self.next_id
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for reply in self.read(deadline):
                if reply.get("id") == wanted:
                    if "error" in reply:
                        raise Failure(f"{method}: {reply['error']}")
                    return reply.get("result", {})
                self.events.append(reply)
        raise Failure(f"no answer to {method}")

    def read(self, deadline):
        """The messages that arrive before the deadline (none if the browser stays silent)."""
        ready, _, _ = select.select([self.from_browser], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return []
        chunk = os.read(self.from_browser, 1 << 20)
        if not chunk:
            raise Failure("the browser closed the pipe")
        self.buffer += chunk
        messages = []
        while b"\0" in self.buffer:
            raw, self.buffer = self.buffer.split(b"\0", 1)
            messages.append(json.loads(raw))
        return messages

    def open_page(self, url, headers):
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable", session=session)
        self.send("Network.enable", session=session)
        self.send("Network.setExtraHTTPHeaders", {"headers": headers}, session=session)
        return session

    def visit(self, session, url):
        navigation = self.send("Page.navigate", {"url": url}, session=session)
        if navigation.get("errorText"):
            raise Failure(f"the browser could not load {url}: {navigation['errorText']}")
        # Load events are not tied to a navigation (the blank page's may come late): wait instead
        # until this document is the one shown and fully loaded, then read it.
        expression = (f"(document.readyState === 'complete' && location.href === {json.dumps(url)} && "
                      "document.documentElement) ? document.documentElement.outerHTML : null")
        deadline = time.monotonic() + 30
        while True:
            evaluated = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
            dom = evaluated.get("result", {}).get("value")
            if isinstance(dom, str):
                break
            if time.monotonic() > deadline:
                raise Failure(f"{url} was not loaded after 30 s: {evaluated}")
            time.sleep(0.1)
        shot = self.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
        return dom, base64.b64decode(shot)

    def close(self):
        try:
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


def element_text(dom, element_id):
    match = re.search(rf'id="{re.escape(element_id)}"[^>]*>([^<]*)<', dom)
    return match.group(1) if match else None


def chart_points(dom, chart_id):
    match = re.search(rf'<svg id="{re.escape(chart_id)}".*?</svg>', dom, re.S)
    return re.findall(r'points="([^"]*)"', match.group(0)) if match else []


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--msm", default=os.path.join(ROOT, ".build", "release", "msm"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--artifacts", default=os.path.join(ROOT, "test-artifacts"))
    arguments = parser.parse_args()
    os.makedirs(arguments.artifacts, exist_ok=True)
    processes = []
    browser = None
    app = None
    try:
        user = ["-u", "nobody"] if os.getuid() == 0 else []
        ports = [free_port(), free_port()]
        for port in ports:
            processes.append(subprocess.Popen(["memcached", "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64"] + user))
        for port in ports:
            wait_port(port)
        app_port = free_port()
        nodes = f"n1:127.0.0.1:{ports[0]},n2:127.0.0.1:{ports[1]}"
        app_log = open(os.path.join(arguments.artifacts, "status-page-app.log"), "wb")
        app = subprocess.Popen(
            [arguments.msm, "serve", "--nodes", nodes, "--port", str(app_port), "--instance", "status-e2e", "--metrics"],
            env={**os.environ, "MSM_MANAGEMENT_TOKEN": TOKEN}, stdout=app_log, stderr=subprocess.STDOUT)
        processes.append(app)
        wait_port(app_port)

        # Without the token: refused.
        status, _ = get(app_port, "/_msm/status")
        if status != 401:
            raise Failure(f"/_msm/status without a token answered {status}, not 401")
        status, _ = get(app_port, "/_msm/", token="wrong-token-0123456789-xx")
        if status != 401:
            raise Failure(f"/_msm/ with a wrong token answered {status}, not 401")

        load = Load(app_port)
        load.create_all()
        load.start()
        # A few status samples under load before the first visit, so that the charts have lines.
        def samples():
            status, body = get(app_port, "/_msm/status", token=TOKEN)
            return len(json.loads(body).get("history", [])) if status == 200 else 0
        deadline = time.monotonic() + 60
        while samples() < 3:
            if time.monotonic() > deadline:
                raise Failure(f"the status history has {samples()} samples after 60 s under load")
            time.sleep(0.2)

        browser = Browser(arguments.chromium)
        session = browser.open_page(f"http://127.0.0.1:{app_port}/_msm/", {"Authorization": f"Bearer {TOKEN}"})
        pages = []
        for visit in range(2):
            if app.poll() is not None:
                raise Failure(f"msm serve exited with {app.returncode} under load")
            if load.error:
                raise Failure(f"the load failed: {load.error}")
            # A distinct address per visit: the page read is surely the new one.
            dom, png = browser.visit(session, f"http://127.0.0.1:{app_port}/_msm/?visit={visit + 1}")
            status, body = get(app_port, "/_msm/status", token=TOKEN)
            if status != 200:
                raise Failure(f"/_msm/status answered {status}")
            data = json.loads(body)
            path = os.path.join(arguments.artifacts, f"status-page-{visit + 1}.png")
            with open(path, "wb") as file:
                file.write(png)
            for node in ("n1", "n2"):
                if element_text(dom, f"node-{node}") is None and f'id="node-{node}"' not in dom:
                    raise Failure(f"the rendered page does not show node {node}")
            shown = element_text(dom, "counter-sessions_created")
            expected = data["statistics"]["counters"]["sessions_created"]
            if shown is None or int(shown) != expected:
                raise Failure(f"the page shows sessions_created {shown}, the JSON endpoint {expected}")
            points = chart_points(dom, "chart-requests")
            if not points or not any(" " in series for series in points):
                raise Failure("the requests chart has no points")
            pages.append(points)
            print(f"   visit {visit + 1}: nodes n1 n2 shown, sessions_created {shown} = JSON, "
                  f"{len(points[0].split())} chart points, screenshot {path}", flush=True)
            if visit == 0:
                time.sleep(10)
        if pages[0] == pages[1]:
            raise Failure("the charts' points did not change in 10 s under load")

        status, _ = get(app_port, "/metrics")
        if status != 401:
            raise Failure(f"/metrics without a token answered {status}, not 401 (it needs the management token by default)")
        status, metrics = get(app_port, "/metrics", token=TOKEN)
        if status != 200 or "msm_writes_total" not in metrics or "memcached_requests_total" not in metrics:
            raise Failure(f"/metrics answered {status} without the expected series")
        if any(cookie and cookie.split("-")[0] in metrics for cookie in load.cookies):
            raise Failure("/metrics contains a session id")
        load.stop.set()
        load.join(timeout=10)
        if load.error:
            raise Failure(f"the load failed: {load.error}")
        if load.mismatches:
            raise Failure(f"{load.mismatches} mismatches in the load")
        print(f"status page end-to-end: passed ({load.requests} checked requests, charts changed, metrics served)", flush=True)
        return 0
    except Exception as failure:
        print(f"FAILED: {failure!r}", flush=True)
        if app is not None:
            print(f"   msm serve: {'running' if app.poll() is None else f'exited with {app.returncode}'}; "
                  f"last lines of {app_log.name}:", flush=True)
            with open(app_log.name, "rb") as log:
                for line in log.read().decode(errors="replace").splitlines()[-30:]:
                    print(f"   | {line}", flush=True)
        return 1
    finally:
        if browser:
            browser.close()
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    sys.exit(main())
