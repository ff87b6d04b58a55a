"""Helpers for tests that start servers and child processes (Ray Serve, the CLI's serve): a free
loopback port, the live process tree, Ray's settings for a small shared machine, and the exit
scripts that the lifecycle tests and bench/test_bench_lifecycle.py run many times."""

import os
import socket
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Ray on a small shared machine: workers at normal priority (Ray's default nice 15 starves them) and a
# patient proxy readiness check.
SMALL_MACHINE_ENV = {"RAY_worker_niceness": "0", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_processes() -> dict:
    """{pid: (parent pid, start time)} of every process that has not exited (from /proc; Linux)."""
    live = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if fields[0] != "Z":  # a zombie has exited
            live[int(entry)] = (int(fields[1]), fields[19])
    return live


def process_tree(root: int) -> dict:
    """{pid: start time} of every live descendant of ``root``."""
    live = live_processes()
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        for child, (parent, started) in live.items():
            if parent == pid:
                tree[child] = started
                todo.append(child)
    return tree


def http_call(method: str, url: str, body: bytes | None = None, timeout: float = 120) -> tuple:
    """(status, headers (lower-case names), answer) of one HTTP call: the JSON answer (or its text if not JSON); status
    "dropped" (answer: the error) when the connection failed or closed without an answer."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, headers, text = resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        status, headers, text = err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()
    except OSError as exc:  # refused, reset, closed without an answer, timed out
        return "dropped", {}, exc
    try:
        return status, headers, json.loads(text)
    except ValueError:
        return status, headers, text.decode(errors="replace")


class CliServer:
    """``python -m ddpm_engine serve`` on a free loopback port, in its own session (so that a failed
    test can kill all it started): ``with CliServer("--grace-s", "1") as server: server.url``."""

    START_S = 240  # Ray and Serve start in about 15 s on two shared cores; a hang, not a slow machine

    def __init__(self, *args: str):
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **SMALL_MACHINE_ENV, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "ddpm_engine", "serve", "--port", str(self.port),
                                      "--backend", "torch", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        self.lines = []

    def __enter__(self):
        import queue
        import threading
        import time

        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout] + [lines.put(None)],
                         daemon=True).start()
        self._lines = lines
        deadline = time.monotonic() + self.START_S
        while True:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            if line is None:
                raise AssertionError(f"serve ended before serving: {self.proc.stderr.read()[-3000:]}")
            self.lines.append(line)
            if line.startswith("serving"):
                break
        self.ray_processes = process_tree(self.proc.pid)
        return self

    def output(self) -> str:
        """Its stdout so far (once it has exited: all of it)."""
        import queue

        while True:
            try:
                line = self._lines.get(timeout=1.0 if self.proc.poll() is not None else 0.01)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
        return "".join(self.lines)

    def left_behind(self, wait_s: float = 10.0) -> list:
        """Its Ray processes still alive ``wait_s`` after it exited (they exit asynchronously)."""
        import time

        deadline = time.monotonic() + wait_s
        while True:
            live = live_processes()
            left = [pid for pid, started in self.ray_processes.items() if live.get(pid, (0, None))[1] == started]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)

    def __exit__(self, *exc):
        import signal

        try:  # the server, and what it left in its session
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc.stderr.close()


# The scripts that once aborted at exit: sample once and end; four threads sampling at once, then end.
SINGLE = """
from ddpm_engine import Engine
Engine.from_pretrained("digits", device="cpu").sample([1], sampler="ddim", steps=3)
"""
CONCURRENT = """
import threading
from ddpm_engine import Engine
engine = Engine.from_pretrained("digits", device="cpu")
threads = [threading.Thread(target=engine.sample, args=([k],), kwargs=dict(sampler="ddim", steps=3))
           for k in range(4)]
for t in threads: t.start()
for t in threads: t.join()
"""

SCRIPT_TIMEOUT_S = 300  # a hang, not a slow machine


def run_script(code: str, *args, env=None, timeout=SCRIPT_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def run_many(code: str, runs: int, workers: int = 2) -> list:
    """The (returncode, stderr) of each of ``runs`` runs of ``code``, ``workers`` at a time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    with ThreadPoolExecutor(workers) as pool:
        done = list(pool.map(lambda _: run_script(code, env=env), range(runs)))
    return [(p.returncode, p.stderr) for p in done]


def assert_all_clean(results):
    bad = [(rc, err[-2000:]) for rc, err in results if rc != 0 or "terminate called" in err]
    assert not bad, f"{len(bad)} of {len(results)} runs ended abnormally; first: {bad[0]}"
