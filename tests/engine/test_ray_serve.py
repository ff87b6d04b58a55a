"""Scale-out on Ray Serve (ddpm_engine.ray_serve): one local Ray + Serve for the whole module, on
loopback, sized for a 2-core machine. Every image is checked against a lone engine.

The tests on the cluster are ``slow`` (Ray takes about 10 s to start); the quick loop checks the
replica's request handling without one."""

import base64
import io
import json
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'ddpm-engine[ray]'")

import ray  # noqa: E402
from ray import serve  # noqa: E402

from ddpm_engine import Engine, InvalidRequestError, to_uint8  # noqa: E402
from ddpm_engine import ray_serve  # noqa: E402

from .process_helpers import SMALL_MACHINE_ENV, free_port, live_processes, process_tree  # noqa: E402

OPTS = dict(sampler="ddim", steps=5)
OTHER_OPTS = dict(sampler="ddim", steps=4, eta=1.0)
MAX_BATCH = 16
ENGINE_KWARGS = dict(device="cpu", backend="torch")
# sized for a small shared machine (with SMALL_MACHINE_ENV): one OpenMP thread per replica; the cluster
# below has no dashboard and a small object store
REPLICA_OPTIONS = {"num_cpus": 1, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}}


class Cluster:
    def __init__(self):
        self.port = free_port()
        self.earlier = process_tree(os.getpid())  # children of other tests are not Ray's
        with pytest.MonkeyPatch.context() as mp:  # Ray's processes inherit the environment at start
            for name, value in SMALL_MACHINE_ENV.items():
                mp.setenv(name, value)
            ray_serve.start(host="127.0.0.1", port=self.port, num_cpus=2, include_dashboard=False,
                            object_store_memory=128 * 2**20, _node_ip_address="127.0.0.1", log_to_driver=False)
        self.processes = {}
        self.record_processes()
        self.handle = serve.run(ray_serve.app("digits", num_replicas=2, ray_actor_options=REPLICA_OPTIONS,
                                              max_batch_size=MAX_BATCH, **ENGINE_KWARGS), route_prefix="/ddpm")
        self.record_processes()
        self.url = f"http://127.0.0.1:{self.port}/ddpm/sample"

    def record_processes(self):
        """Note the processes Ray has started so far (those the test will expect gone after shutdown)."""
        self.processes.update((pid, t) for pid, t in process_tree(os.getpid()).items() if self.earlier.get(pid) != t)

    def shutdown(self):
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def lone():
    return Engine.from_pretrained("digits", **ENGINE_KWARGS)


def post(url, body: bytes):
    """(status, answer) of a POST: the JSON answer, or the text of one that is not JSON."""
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, text = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text.decode(errors="replace")


@pytest.mark.slow
def test_concurrent_calls_match_a_lone_engine_and_form_batches(cluster, lone):
    seed = random.getrandbits(32)
    rng = random.Random(seed)
    calls = [([rng.getrandbits(64)], OPTS if k % 2 else OTHER_OPTS) for k in range(32)]
    before = replica_stats(cluster.handle)
    responses = [cluster.handle.sample.remote(seeds, **opts) for seeds, opts in calls]
    for (seeds, opts), response in zip(calls, responses):
        got = response.result(timeout_s=120)
        want = lone.sample(seeds, **opts)
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-5, f"seed={seed} {seeds} {opts}"
    after = replica_stats(cluster.handle)
    assert len(after) == 2, after
    batches = {}  # requests per batch -> batches of that size, in this test
    for r, s in after.items():
        for n, count in s["requests_per_batch"].items():
            new = count - before.get(r, {}).get("requests_per_batch", {}).get(n, 0)
            if new:
                batches[n] = batches.get(n, 0) + new
    engine_calls = sum(after[r]["engine_calls"] - before.get(r, {}).get("engine_calls", 0) for r in after)
    assert sum(n * count for n, count in batches.items()) == 32, (before, after)
    assert max(batches) > 1 and engine_calls < 32, batches


@pytest.mark.slow
def test_requests_of_many_seeds_are_split_into_engine_batches(cluster, lone):
    seed = random.getrandbits(32)
    rng = random.Random(seed)
    calls = [[rng.getrandbits(64) for _ in range(MAX_BATCH - 3)] for _ in range(6)]  # > MAX_BATCH images a batch
    responses = [cluster.handle.sample.remote(seeds, **OPTS) for seeds in calls]
    for seeds, response in zip(calls, responses):
        assert (response.result(timeout_s=120) - lone.sample(seeds, **OPTS)).abs().max().item() <= 1e-5, f"seed={seed}"


def replica_stats(handle, tries=200) -> dict:
    """{replica id: stats} of every replica that answered (the router picks one per call)."""
    seen = {}
    for _ in range(tries):
        s = handle.stats.remote().result(timeout_s=60)
        seen[s["replica"]] = s
        if len(seen) == 2:
            break
    return seen


@pytest.mark.slow
def test_http_answers_the_same_images_and_pngs(cluster, lone):
    seeds = [random.getrandbits(64) for _ in range(3)]
    status, answer = post(cluster.url, json.dumps({"seeds": seeds, **OPTS}).encode())
    assert status == 200, answer
    want = lone.sample(seeds, **OPTS)
    got = ray_serve.from_json(answer)
    assert answer["shape"] == list(want.shape) and answer["dtype"] == "float32"
    assert (got - want).abs().max().item() <= 1e-5, f"seeds={seeds}"
    from PIL import Image

    pngs = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(p)))) for p in answer["png"]])
    assert np.array_equal(pngs, to_uint8(got)[..., 0])


BAD_BODIES = [
    b"{not json", b"\xff\xfe", b"[1, 2]", b'{"sampler": "ddim"}', b'{"seeds": []}', b'{"seeds": [-1]}',
    b'{"seeds": [1.5]}', b'{"seeds": "12"}', b'{"seeds": [18446744073709551616]}',
    b'{"seeds": [1], "sampler": "euler"}', b'{"seeds": [1], "steps": 0}', b'{"seeds": [1], "steps": 1001}',
    b'{"seeds": [1], "sampler": "ddim", "steps": 2.5}', b'{"seeds": [1], "eta": 2}', b'{"seeds": [1], "eta": NaN}',
    b'{"seeds": [1], "step": 20}', json.dumps({"seeds": list(range(MAX_BATCH + 1))}).encode(),
    b'{"seeds": [1], "steps": ' + b"[" * 1000 + b"]" * 1000 + b"}", b'{"seeds": [1], "sampler": true}',
]


@pytest.mark.slow
@pytest.mark.parametrize("body", BAD_BODIES, ids=[b[:24].decode("latin-1") for b in BAD_BODIES])
def test_a_bad_http_request_gets_400_and_the_next_works(cluster, lone, body):
    status, answer = post(cluster.url, body)
    assert status == 400 and answer["error"] == "InvalidRequestError" and answer["message"], answer
    status, answer = post(cluster.url, json.dumps({"seeds": [7], **OPTS}).encode())
    assert status == 200 and (ray_serve.from_json(answer) - lone.sample([7], **OPTS)).abs().max().item() <= 1e-5


def test_the_replicas_checks_and_answer_format_hold_without_a_cluster(lone):
    """The quick loop's Ray Serve check, with no Ray started: the body parsing and request checks
    the replica runs refuse every bad body with InvalidRequestError, and the JSON answer carries
    the images exactly."""
    for body in BAD_BODIES:
        with pytest.raises(InvalidRequestError):
            ray_serve.check_request(lone, **ray_serve.parse_body(body), max_images=MAX_BATCH)
    body = json.dumps({"seeds": [7], **OPTS}).encode()
    request = ray_serve.check_request(lone, **ray_serve.parse_body(body), max_images=MAX_BATCH)
    assert request == ray_serve.Request([7], ray_serve.Options("ddim", 5, 0.0))
    images = lone.sample(request.seeds, **OPTS)
    assert torch.equal(ray_serve.from_json(ray_serve.to_json(images)), images)
    # spacing: normalised to None where it is the one a request without it gets
    for spacing, want in [(None, None), ("leading", None), ("trailing", "trailing")]:
        body = json.dumps({"seeds": [7], **OPTS, "spacing": spacing}).encode()
        request = ray_serve.check_request(lone, **ray_serve.parse_body(body), max_images=MAX_BATCH)
        assert request.options == ray_serve.Options("ddim", 5, 0.0, want), spacing
    with pytest.raises(InvalidRequestError, match="ddpm sampler takes spacing"):
        ray_serve.check_request(lone, **ray_serve.parse_body(b'{"seeds": [1], "spacing": "karras"}'), max_images=1)



class WithY(torch.nn.Module):
    """A tiny class-conditional model, forward(x, t, y), with a null label (tests/engine/test_class_labels.py)."""

    num_classes, null_label = 3, 2

    def __init__(self):
        super().__init__()
        self.conv, self.embed = torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.Embedding(3, 1)

    def forward(self, x, t, y):
        return self.conv(x) * torch.cos(t.float() / 300)[:, None, None, None] + self.embed(y)[:, :, None, None]


@pytest.fixture(scope="module")
def conditional():
    from ddpm_engine import checkpoints

    return checkpoints.from_module(WithY(), sample_shape=(1, 8, 8), name="withy")


def test_class_labels_and_guidance_are_checked_by_the_engine_and_labels_share_a_batch(conditional, lone):
    """Without a cluster: the body's class_labels and guidance_scale go through the engine's own
    checks (400 over HTTP), and the replica runs requests with different labels but equal options
    in one engine call, each request getting its lone images."""
    engine = Engine.from_pretrained(conditional, **ENGINE_KWARGS)
    body = json.dumps({"seeds": [7, 8], **OPTS, "class_labels": [0, 1], "guidance_scale": 3}).encode()
    request = ray_serve.check_request(engine, **ray_serve.parse_body(body), max_images=MAX_BATCH)
    assert request == ray_serve.Request([7, 8], ray_serve.Options("ddim", 5, 0.0, None, 3.0), [0, 1])
    for bad, message in [({"class_labels": [0]}, "1 labels for 2 seeds"), ({"class_labels": [3, 0]}, "class label 3"),
                         ({"class_labels": [0, True]}, "is not an int"), ({"class_labels": "0 1"}, "a list of integers"),
                         ({}, "class-conditional: pass class_labels"),
                         ({"class_labels": [0, 1], "guidance_scale": -1}, "guidance_scale must be"),
                         ({"class_labels": [0, 1], "guidance_scale": "2"}, "guidance_scale must be a number")]:
        answer = ray_serve.http_request("POST", "/sample", json.dumps({"seeds": [7, 8], **bad}).encode(), engine=engine,
                                        max_images=MAX_BATCH, ready=True, draining=False)
        assert answer.status == 400 and answer.body["error"] == "InvalidRequestError", (bad, answer)
        assert message in answer.body["message"], (bad, answer.body)
    for bad, message in [({"class_labels": [0]}, "takes no class labels"),
                         ({"guidance_scale": 2.0}, "needs a class-conditional model")]:
        with pytest.raises(InvalidRequestError, match=message):
            ray_serve.check_request(lone, [7], **bad, max_images=MAX_BATCH)
    assert ray_serve.check_request(lone, [7], guidance_scale=1, max_images=MAX_BATCH).labels is None

    seed = random.getrandbits(32)
    rng = random.Random(seed)
    calls = [([rng.getrandbits(64) for _ in range(n)], [rng.randrange(3) for _ in range(n)], scale)
             for n, scale in [(2, 1.0), (1, 1.0), (3, 1.0), (2, 4.0), (1, 4.0)]]
    replica = ray_serve.EngineReplica(conditional, MAX_BATCH, 0.005, ENGINE_KWARGS)
    try:
        requests = [ray_serve.check_request(replica.engine, ss, **OPTS, class_labels=labels, guidance_scale=scale,
                                            max_images=MAX_BATCH) for ss, labels, scale in calls]
        got = replica._run_groups(requests)
        assert replica._engine_calls == 2  # one per guidance scale: the labels ride with their rows
    finally:
        replica.server.close()
    for (ss, labels, scale), images in zip(calls, got):
        want = engine.sample(ss, class_labels=labels, guidance_scale=scale, **OPTS)
        assert (images - want).abs().max().item() <= 5e-5, f"seed={seed} {ss} {labels} {scale}"


@pytest.mark.slow
def test_probes_and_hostile_bodies_over_http(cluster):
    """Over loopback through Serve's proxy: the probes, a body over the size limit (413), a 2 kB body
    nested 1000 levels deep (400) and a 3 MB sampler name (400, quoted short): JSON answers, no 500."""
    root = cluster.url.rsplit("/", 1)[0]
    for probe, answer in (("healthz", {"status": "alive"}), ("readyz", {"status": "ready"})):
        with urllib.request.urlopen(f"{root}/{probe}", timeout=60) as resp:
            assert resp.status == 200 and json.loads(resp.read()) == answer
    status, answer = post(cluster.url, b'{"seeds": [1], "sampler": "' + b"x" * ray_serve.MAX_BODY_BYTES + b'"}')
    assert status == 413 and answer["error"] == "PayloadTooLarge", answer
    status, answer = post(cluster.url, b'{"seeds": [1], "steps": ' + b"[" * 1000 + b"]" * 1000 + b"}")
    assert status == 400 and "1001 levels deep" in answer["message"], answer
    status, answer = post(cluster.url, json.dumps({"seeds": [1], "sampler": "x" * 3_000_000}).encode())
    assert status == 400 and len(answer["message"]) <= ray_serve.MESSAGE_LIMIT + 40, answer["message"][:200]


@pytest.mark.slow
def test_other_routes_and_methods_are_refused(cluster):
    assert post(cluster.url.replace("/sample", "/other"), b"{}")[0] == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(cluster.url, timeout=60)  # GET
    assert err.value.code == 405


@pytest.mark.slow
def test_a_bad_request_fails_alone_not_its_batch_mates(cluster, lone):
    seed = random.getrandbits(32)
    rng = random.Random(seed)
    good = [[rng.getrandbits(64)] for _ in range(6)]
    with ThreadPoolExecutor(8) as pool:
        bad = [pool.submit(lambda: cluster.handle.sample.remote([1], sampler="euler").result(timeout_s=60)),
               pool.submit(lambda: cluster.handle.sample.remote([1], **OPTS, eta=-1.0).result(timeout_s=60))]
        ok = [pool.submit(lambda s=s: cluster.handle.sample.remote(s, **OPTS).result(timeout_s=60)) for s in good]
        for f in bad:
            with pytest.raises(InvalidRequestError):
                f.result()
        for s, f in zip(good, ok):
            assert (f.result() - lone.sample(s, **OPTS)).abs().max().item() <= 1e-5, f"seed={seed}"


@pytest.mark.slow
def test_shutdown_leaves_no_process_behind(cluster):
    # Last in this module: it shuts the module's Ray down.
    cluster.record_processes()  # with any worker started since
    assert cluster.processes, "the test saw no Ray process to begin with"
    names = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in cluster.processes
             if Path(f"/proc/{pid}/comm").exists()}
    assert {"raylet", "gcs_server"} <= set(names.values()), names
    cluster.shutdown()
    end = time.monotonic() + 60  # processes exit asynchronously after ray.shutdown()
    while True:
        live = live_processes()
        alive = [pid for pid, started in cluster.processes.items() if live.get(pid, (0, None))[1] == started]
        if not alive or time.monotonic() > end:
            break
        time.sleep(0.2)
    assert not alive, {pid: names.get(pid) for pid in alive}
