"""Scale-out on Ray Serve: engine replicas on a cluster, each batching its concurrent requests.

    from ray import serve
    from ddpm_engine.ray_serve import app

    handle = serve.run(app("digits", num_replicas=2, device="cpu"), route_prefix="/ddpm")
    images = handle.sample.remote([1, 2], sampler="ddim", steps=20).result()  # CPU float32 [2, C, H, W]

Each replica holds one ``Engine``. A request is validated when it arrives (a bad one fails alone,
never its batch-mates); then ``@serve.batch`` gathers up to ``max_batch_size`` of the replica's
concurrent requests and runs one engine call per group of equal sampler options (per
``max_batch_size`` images of it). Each request gets exactly the images its seeds give on a lone
engine: a seed's image does not depend on its batch. Over HTTP, ``POST <route>/sample`` takes
``{"seeds": [...], "sampler": "ddim", "steps": 20, "eta": 0.0}`` and answers the images as float32
data and PNGs (``to_json``); a bad request gets a 400 with ``{"error": <type>, "message": ...}``.

Needs ``pip install 'ddpm-engine[ray]'``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import json
import threading
from typing import NamedTuple

import numpy as np
import torch

from .engine import Engine
from .errors import EngineError, InvalidRequestError, MissingDependencyError
from .images import to_pil
from .noise import check_seeds

try:
    from ray import serve
except ImportError as exc:
    raise MissingDependencyError("ray[serve]", "Scaling out on Ray Serve (ddpm_engine.ray_serve)", extra="ray") from exc

REQUEST_FIELDS = ("seeds", "sampler", "steps", "eta")


class Options(NamedTuple):
    """A request's sampler options, normalized: requests with equal Options share an engine call."""

    sampler: str
    steps: int
    eta: float


class Request(NamedTuple):
    seeds: list
    options: Options


def check_request(engine: Engine, seeds, sampler="ddpm", steps=None, eta=0.0, *, max_images: int) -> Request:
    """Validate one request with the engine's own checks (``Engine.plan``; raises InvalidRequestError)."""
    seeds = check_seeds(seeds)
    plan = engine.plan(sampler=sampler, steps=steps, eta=eta)
    if len(seeds) > max_images:
        raise InvalidRequestError(f"a request of {len(seeds)} seeds exceeds max_batch_size={max_images}; "
                                  "split it into smaller requests")
    return Request(seeds, Options(sampler, plan.steps, plan.spec.eta))


def parse_body(body: bytes) -> dict:
    """The JSON body of ``POST /sample`` -> keyword arguments of ``check_request``."""
    try:
        payload = json.loads(body)
    except ValueError as exc:  # also UnicodeDecodeError
        raise InvalidRequestError(f"the body is not valid JSON ({exc}); send "
                                  '{"seeds": [...], "sampler": "ddim", "steps": 20, "eta": 0.0}') from None
    if not isinstance(payload, dict) or "seeds" not in payload:
        raise InvalidRequestError('the body must be a JSON object with at least "seeds": a list of integers')
    unknown = sorted(set(payload) - set(REQUEST_FIELDS))
    if unknown:
        raise InvalidRequestError(f"unknown field(s) {unknown}; the fields are {list(REQUEST_FIELDS)}")
    return payload


def to_json(images: torch.Tensor) -> dict:
    """Images [n, C, H, W] in [-1, 1] -> the HTTP answer: shape, float32 data (base64 of little-endian
    bytes) and one base64 PNG per image."""
    images = images.detach().to("cpu", torch.float32).contiguous()
    pngs = []
    for im in to_pil(images):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        pngs.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    data = images.numpy().astype("<f4", copy=False).tobytes()
    return {"shape": list(images.shape), "dtype": "float32", "data": base64.b64encode(data).decode("ascii"),
            "png": pngs}


def from_json(answer: dict) -> torch.Tensor:
    """The float32 images of an HTTP answer (``to_json``'s inverse)."""
    data = np.frombuffer(base64.b64decode(answer["data"]), dtype="<f4")
    return torch.from_numpy(data.astype(np.float32).reshape(answer["shape"]))


class EngineReplica:
    """One Serve replica: one Engine, its request validation, batching and HTTP ingress."""

    def __init__(self, model, max_batch_size: int, batch_wait_timeout_s: float, engine_kwargs: dict):
        self.engine = Engine.from_pretrained(model, **engine_kwargs)
        self.max_batch_size = max_batch_size
        self._sample_batch.set_max_batch_size(max_batch_size)
        self._sample_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._stats_lock = threading.Lock()
        self._batch_requests = collections.Counter()  # requests in a batch -> how many such batches
        self._engine_calls = 0

    async def sample(self, seeds, sampler="ddpm", steps=None, eta=0.0) -> torch.Tensor:
        """The images of ``seeds``, float32 [n, C, H, W] in [-1, 1] on the CPU."""
        request = check_request(self.engine, seeds, sampler, steps, eta, max_images=self.max_batch_size)
        images = await self._sample_batch(request)
        if isinstance(images, BaseException):  # its option group failed (the others did not)
            raise images
        return images

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)  # set per app in __init__
    async def _sample_batch(self, requests: list[Request]) -> list:
        return await asyncio.to_thread(self._run_groups, requests)

    def _run_groups(self, requests: list[Request]) -> list:
        """One engine call per option group (per max_batch_size images of it); each request gets its
        own rows, or its group's error."""
        groups = collections.defaultdict(list)
        for k, r in enumerate(requests):
            groups[r.options].append(k)
        results = [None] * len(requests)
        calls = 0
        for options, members in groups.items():
            seeds = [s for k in members for s in requests[k].seeds]
            chunks = [seeds[at:at + self.max_batch_size] for at in range(0, len(seeds), self.max_batch_size)]
            calls += len(chunks)
            try:
                images = torch.cat([self.engine.sample(chunk, sampler=options.sampler, steps=options.steps,
                                                       eta=options.eta).to("cpu", torch.float32) for chunk in chunks])
            except EngineError as exc:
                for k in members:
                    results[k] = exc
                continue
            parts = images.split([len(requests[k].seeds) for k in members])
            for k, part in zip(members, parts):
                results[k] = part.clone()  # its own storage: a view would ship the whole batch
        with self._stats_lock:
            self._batch_requests[len(requests)] += 1
            self._engine_calls += calls
        return results

    def stats(self) -> dict:
        """This replica's batching so far: requests per batch (a histogram) and engine calls."""
        with self._stats_lock:
            hist = dict(sorted(self._batch_requests.items()))
            return {"replica": serve.get_replica_context().replica_id.unique_id,
                    "requests_per_batch": hist, "batches": sum(hist.values()),
                    "requests": sum(n * c for n, c in hist.items()), "engine_calls": self._engine_calls}

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        path, root = request.scope["path"], request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if path.rstrip("/") != "/sample":
            return JSONResponse({"error": "NotFound", "message": f"no route {path!r}; POST to /sample"}, 404)
        if request.method != "POST":
            return JSONResponse({"error": "MethodNotAllowed", "message": "POST a JSON body to /sample"}, 405)
        try:
            images = await self.sample(**parse_body(await request.body()))
        except InvalidRequestError as exc:
            return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, 400)
        except EngineError as exc:
            return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, 500)
        return JSONResponse(to_json(images))


def app(model, *, num_replicas: int = 1, ray_actor_options: dict | None = None, max_batch_size: int = 32,
        batch_wait_timeout_s: float = 0.005, **engine_kwargs):
    """A Serve application of ``num_replicas`` replicas, each one ``Engine.from_pretrained(model,
    **engine_kwargs)``: ``serve.run(app(...), route_prefix=...)`` deploys it.

    ray_actor_options: each replica's Ray resources; default ``{"num_gpus": 1}`` (one replica per GPU)
        when ``device`` is "cuda" (Ray hides the GPUs from an actor that reserves none), else Serve's
        default of one CPU.
    max_batch_size: most requests per batch, images per engine call, and images per request.
    batch_wait_timeout_s: how long a replica waits for batch-mates after a request arrives.
    """
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise InvalidRequestError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
    if ray_actor_options is None and str(engine_kwargs.get("device", "")).startswith("cuda"):
        ray_actor_options = {"num_gpus": 1}
    options = {} if ray_actor_options is None else {"ray_actor_options": ray_actor_options}
    # One batch runs while the next one forms: Serve's default of 5 ongoing requests would cap batches at 5.
    deployment = serve.deployment(EngineReplica, name="ddpm").options(num_replicas=num_replicas, max_ongoing_requests=2 * max_batch_size, **options)
    return deployment.bind(model, max_batch_size, batch_wait_timeout_s, engine_kwargs)


def start(address: str | None = None, *, host: str = "127.0.0.1", port: int = 8000, **ray_init_kwargs):
    """Start Ray here (or join the cluster at ``address``) and Serve's HTTP proxy on host:port. Without
    an address this always starts a new local Ray, never one found on the machine."""
    import ray

    ray.init(address=address or "local", **ray_init_kwargs)
    serve.start(http_options={"host": host, "port": port})
