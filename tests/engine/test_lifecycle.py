"""A process that uses the engine never dies abnormally: at exit, on Ctrl-C, on SIGTERM, after fork.

Every check runs real Python processes (the failures it guards against happen only while an
interpreter tears down). Short processes run two at a time; the bench
(bench/test_bench_lifecycle.py) runs the exit scripts 500 times. The many-run, CLI and Ray checks
are ``slow``; the quick loop keeps one check of each kind (exit, Ctrl-C, SIGTERM, fork, close).
"""

import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ddpm_engine import Engine

from .process_helpers import CONCURRENT, SCRIPT_TIMEOUT_S, SINGLE, assert_all_clean, run_many, run_script

# submit, sample_async and serve(), each left running when the script ends
SERVING = """
import asyncio
from ddpm_engine import Engine
engine = Engine.from_pretrained("digits", device="cpu", backend="torch")
engine.submit([1], sampler="ddim", steps=3).result()
asyncio.run(engine.sample_async([2], sampler="ddim", steps=3))
server = engine.serve(max_batch=4)
server.sample([3], sampler="ddim", steps=3)
server.submit([4], sampler="ddpm")  # still running at exit: fails with ServerClosedError, no abort
"""
@pytest.fixture(autouse=True)
def children_take_ctrl_c():
    """Children start as from a terminal, with SIGINT at its default, even where pytest itself ignores
    it (started with nohup or in a non-interactive shell's background): an ignored SIGINT passes
    through exec, Python then installs no KeyboardInterrupt handler, and a Ctrl-C test would see its
    child run on. A handler here is reset to the default in an exec'd child."""
    if signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(scope="module", autouse=True)
def shared_cache(cache):
    """One ONNX export for every process of this module (they inherit $DDPM_ENGINE_CACHE)."""
    Engine.from_pretrained("digits", device="cpu").close()
    return cache


# ---- 1. interpreter exit ---------------------------------------------------------------------
@pytest.mark.slow
def test_a_script_that_samples_once_always_exits_with_status_0():
    assert_all_clean(run_many(SINGLE, 50))


@pytest.mark.slow
def test_a_script_whose_threads_sample_at_once_always_exits_with_status_0():
    assert_all_clean(run_many(CONCURRENT, 30))


def test_submit_sample_async_and_serve_exit_with_status_0():
    assert_all_clean(run_many(SERVING, 4))


@pytest.mark.slow
def test_the_cli_sample_and_check_exit_with_status_0(tmp_path):
    sample = [sys.executable, "-m", "ddpm_engine", "sample", "--sampler", "ddim", "--steps", "3", "-n", "2",
              "--quiet", "--out", str(tmp_path / "grid.png")]
    check = [sys.executable, "-m", "ddpm_engine", "check", "--backend", "onnxruntime", "--steps", "3"]
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True,
                                                        timeout=SCRIPT_TIMEOUT_S), [sample, check]))
    for p in done:
        assert p.returncode == 0 and "terminate called" not in p.stderr, p.stderr[-2000:]
    assert (tmp_path / "grid.png").is_file()


# ---- 2. Ctrl-C -------------------------------------------------------------------------------
INTERRUPTED = """
import json, sys, threading, time, torch
from ddpm_engine import Engine, EngineError
engine = Engine.from_pretrained("digits", device="cpu", backend="torch")
seeds = [5, 6]
before = engine.sample(seeds, sampler="ddim", steps=4)
rider = {}
def ride():
    try:
        engine.sample([7], sampler="ddpm")
        rider["outcome"] = "finished"
    except EngineError as exc:
        rider["outcome"] = type(exc).__name__
t = threading.Thread(target=ride)
t.start()
time.sleep(0.5)  # the rider's request runs: the next one joins its batch
print("ready", flush=True)
try:
    engine.sample(8, sampler="ddpm")
    outcome = "finished"
except KeyboardInterrupt:
    outcome = "KeyboardInterrupt"
t.join(60)
after = engine.sample(seeds, sampler="ddim", steps=4)
print(json.dumps({"caller": outcome, "rider": rider.get("outcome", "hung"), "same": torch.equal(before, after)}))
"""


def wait_for_line(proc, text: str):
    for line in proc.stdout:
        if line.strip() == text:
            return
    raise AssertionError(f"the process ended before printing {text!r}: {proc.stderr.read()[-2000:]}")


def test_ctrl_c_interrupts_the_caller_fails_its_batch_mates_and_the_engine_goes_on():
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_line(proc, "ready")
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=SCRIPT_TIMEOUT_S)
    assert proc.returncode == 0 and "terminate called" not in err, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"caller": "KeyboardInterrupt", "rider": "BatchInterruptedError", "same": True}


@pytest.mark.slow
def test_ctrl_c_in_the_cli_exits_130_with_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-u", "-c", "import sys; from ddpm_engine.__main__ import main; "
                             "print('ready', flush=True); sys.exit(main(sys.argv[1:]))", "sample", "-n", "8",
                             "--backend", "torch", "--quiet", "--out", str(tmp_path / "g.png")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(proc, "ready")
    time.sleep(4.0)  # into the 1000 DDPM steps
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=SCRIPT_TIMEOUT_S)
    assert proc.returncode == 130
    assert err == "interrupted\n"


# ---- 3. SIGTERM ------------------------------------------------------------------------------
SERVER_UNDER_SIGTERM = """
import signal, sys
from ddpm_engine import Engine
from ddpm_engine.serving import Server, ServerClosedError
if sys.argv[1] == "exit":  # a service's usual handler: leave through SystemExit
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
server = Server(Engine.from_pretrained("digits", device="cpu", backend="torch"), max_batch=8)
def report(f):
    print("done" if f.exception() is None else type(f.exception()).__name__, flush=True)
futures = [server.submit([k], sampler="ddpm" if k % 2 else "ddim", steps=None if k % 2 else 5) for k in range(6)]
for f in futures:
    f.add_done_callback(report)
print("ready", flush=True)
for f in futures:
    f.result()
"""


@pytest.mark.parametrize("handler", ["exit", pytest.param("default", marks=pytest.mark.slow)])
def test_sigterm_to_a_process_running_a_server_ends_it_within_10_s(handler):
    proc = subprocess.Popen([sys.executable, "-c", SERVER_UNDER_SIGTERM, handler], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_line(proc, "ready")
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    out, err = proc.communicate(timeout=SCRIPT_TIMEOUT_S)
    assert time.monotonic() - sent < 10.0
    assert "terminate called" not in err, err[-2000:]
    if handler == "default":
        assert proc.returncode == -signal.SIGTERM
        return
    assert proc.returncode == 0, err[-2000:]
    outcomes = out.split()
    assert len(outcomes) == 6 and set(outcomes) <= {"done", "ServerClosedError"}, out
    assert "ServerClosedError" in outcomes  # the DDPM-1000 requests were still running


# The CLI's serve drains on SIGTERM and Ctrl-C: new requests get 503 at once, in-flight ones finish
# within --grace-s, those past it get a 503 JSON answer (never a dropped connection), and the process
# exits 0 within grace + 2 s leaving no Ray process. DDIM requests: 1000 steps of one image take about
# 2 s here, of eight images about 4 s.
EXIT_AFTER_GRACE_S = 2.0


def stop_mid_request(server, sig, seeds, during=lambda server: None) -> dict:
    """POST a DDIM-1000 request of ``seeds``, send ``sig`` while it runs, call ``during(server)``,
    and wait for the exit: what the client got, when (seconds after the signal), the exit time
    and status, the Ray processes left, the server's output, and what ``during`` returned."""
    import json as json_

    from .process_helpers import http_call

    got = {}

    def post():
        body = json_.dumps({"seeds": seeds, "sampler": "ddim", "steps": 1000}).encode()
        got["answer"] = http_call("POST", f"{server.url}/sample", body)
        got["answered"] = time.monotonic()

    client = threading.Thread(target=post)
    client.start()
    time.sleep(0.7)  # it runs: 1000 steps take seconds
    server.proc.send_signal(sig)
    sent = time.monotonic()
    got["during"] = during(server)
    server.proc.wait(60)
    got["exited"] = time.monotonic() - sent
    client.join(60)
    got["answered"] -= sent
    got["left"] = server.left_behind(wait_s=1.0)  # gone by the time it exits (the kernel reaps them)
    got["out"] = server.output()
    return got


def wait_until_draining(url: str, limit_s: float = 10.0):
    """Poll /readyz until it answers 503 (the drain reached the replica)."""
    from .process_helpers import http_call

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        status, _, answer = http_call("GET", f"{url}/readyz", timeout=5)
        if status == 503:
            assert answer == {"status": "draining"}, answer
            return
        assert status == 200 and answer == {"status": "ready"}, (status, answer)
        time.sleep(0.05)
    raise AssertionError(f"/readyz did not turn 503 within {limit_s} s of the signal")


@pytest.mark.slow
def test_sigterm_to_the_cli_serve_lets_in_flight_requests_finish_and_refuses_new_ones():
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'ddpm-engine[ray]'")
    from ddpm_engine.ray_serve import from_json

    from .process_helpers import CliServer, http_call

    def during(server):  # draining: refused at once, still alive
        wait_until_draining(server.url)
        return (http_call("POST", f"{server.url}/sample", b'{"seeds": [1], "sampler": "ddim", "steps": 3}'),
                http_call("GET", f"{server.url}/healthz"))

    grace = 8.0
    with CliServer("--grace-s", str(grace)) as server:
        assert http_call("GET", f"{server.url}/healthz")[::2] == (200, {"status": "alive"})
        assert http_call("GET", f"{server.url}/readyz")[::2] == (200, {"status": "ready"})
        got = stop_mid_request(server, signal.SIGTERM, [11, 12], during)
    status, _, answer = got["answer"]
    assert status == 200, got
    want = Engine.from_pretrained("digits", device="cpu", backend="torch").sample([11, 12], sampler="ddim", steps=1000)
    assert (from_json(answer) - want).abs().max().item() <= 5e-5
    late, alive = got["during"]
    assert late[0] == 503 and late[1].get("retry-after") == "1" and late[2]["error"] == "ServerClosedError", late
    assert alive[::2] == (200, {"status": "alive"})
    assert server.proc.returncode == 0, got["out"]
    assert got["exited"] <= min(got["answered"], grace) + EXIT_AFTER_GRACE_S, got
    assert "draining" in got["out"] and "stopping" in got["out"], got["out"]
    assert not got["left"], f"Ray processes left behind: {got['left']}"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "ctrl-c"])
def test_a_request_past_the_grace_period_gets_a_503_and_the_cli_serve_exits_in_time(sig):
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'ddpm-engine[ray]'")
    from .process_helpers import CliServer

    grace = 1.0
    with CliServer("--grace-s", str(grace)) as server:
        got = stop_mid_request(server, sig, list(range(8)))  # 1000 steps of 8 images: past the grace period
    status, headers, answer = got["answer"]
    assert status == 503 and headers.get("retry-after") == "1", got
    assert answer == {"error": "ServerClosedError", "message": "the server was closed before this request finished"}
    assert grace - 0.1 <= got["answered"] <= grace + 1.0, got  # at the end of the grace period, not before
    assert server.proc.returncode == 0, got["out"]
    assert got["exited"] <= grace + EXIT_AFTER_GRACE_S, got
    assert not got["left"], f"Ray processes left behind: {got['left']}"


# ---- 4. fork and spawn -----------------------------------------------------------------------
FORKED = """
import json, multiprocessing as mp, sys, threading
from ddpm_engine import Engine, EngineError
backend, method = sys.argv[1], sys.argv[2]
SEEDS = [11, 12, 13]

def child_sample(_):
    try:
        engine = ENGINE if method == "fork" else Engine.from_pretrained("digits", device="cpu", backend=backend)
        return engine.sample(SEEDS, sampler="ddim", steps=4).tolist()
    except EngineError as exc:
        return f"{type(exc).__name__}: {exc}"

if __name__ == "__main__":
    ENGINE = Engine.from_pretrained("digits", device="cpu", backend=backend)
    parent = ENGINE.sample(SEEDS, sampler="ddim", steps=4).tolist()
    if len(sys.argv) > 3:
        ENGINE.backend.survives_fork = False
    busy = threading.Thread(target=ENGINE.sample, args=(list(range(8)),), kwargs=dict(sampler="ddim", steps=30))
    busy.start()  # the scheduler is mid-batch when the children fork
    with mp.get_context(method).Pool(2) as pool:
        children = pool.map_async(child_sample, range(2)).get(120)
    busy.join()
    print(json.dumps({"same": [c == parent for c in children], "errors": [c for c in children if isinstance(c, str)]}))
"""


@pytest.mark.parametrize("backend,method", [pytest.param("onnxruntime", "fork", marks=pytest.mark.slow), ("torch", "fork"),
                                            pytest.param("onnxruntime", "spawn", marks=pytest.mark.slow)])
def test_children_sample_the_parents_images(backend, method, tmp_path):
    script = tmp_path / "forked.py"  # spawn re-imports the main module: a file, not -c
    script.write_text(FORKED)
    p = subprocess.run([sys.executable, str(script), backend, method], capture_output=True, text=True,
                       timeout=SCRIPT_TIMEOUT_S)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"same": [True, True], "errors": []}


def test_a_backend_that_cannot_survive_fork_gives_the_child_a_typed_error(tmp_path):
    script = tmp_path / "forked.py"
    script.write_text(FORKED)
    p = subprocess.run([sys.executable, str(script), "torch", "fork", "refuse"], capture_output=True, text=True,
                       timeout=SCRIPT_TIMEOUT_S)
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["same"] == [False, False]
    assert all(e.startswith("BackendUnavailableError: this engine came through a fork: the torch backend does "
                            "not survive fork()") and "spawn" in e for e in result["errors"]), result


# ---- 5. closing ------------------------------------------------------------------------------
def scheduler_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "ddpm-engine-scheduler"]


def test_close_garbage_collection_and_with_stop_the_engines_threads():
    import gc

    before = len(scheduler_threads())
    engine = Engine.from_pretrained("digits", device="cpu", backend="torch")
    images = engine.sample([1, 2], sampler="ddim", steps=3)
    engine.submit([3], sampler="ddim", steps=3).result()
    assert len(scheduler_threads()) == before + 2
    engine.close()
    assert len(scheduler_threads()) == before
    assert engine.sample([1, 2], sampler="ddim", steps=3).equal(images)  # usable after close
    engine.submit([3], sampler="ddim", steps=3).result()
    del engine
    gc.collect()
    assert len(scheduler_threads()) == before
    with Engine.from_pretrained("digits", device="cpu", backend="torch") as engine:
        assert engine.sample([1, 2], sampler="ddim", steps=3).equal(images)
        assert len(scheduler_threads()) == before + 1
    assert len(scheduler_threads()) == before
