"""Helpers for tests that start servers and child processes (Ray Serve, the CLI's serve): a free
loopback port, the live process tree, and Ray's settings for a small shared machine."""

import os
import socket
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
