"""Scale-out on Ray Serve: engine replicas on a cluster, each batching its concurrent requests.

    from ray import serve
    from ddpm_engine.ray_serve import app

    handle = serve.run(app("digits", num_replicas=2, device="cpu"), route_prefix="/ddpm")
    images = handle.sample.remote([1, 2], sampler="ddim", steps=20).result()  # CPU float32 [2, C, H, W]

Each replica holds one ``Engine``. A request is validated when it arrives (a bad one fails alone,
never its batch-mates); then ``@serve.batch`` gathers up to ``max_batch_size`` of the replica's
concurrent requests and runs one engine call per group of equal sampler options (per
``max_batch_size`` images of it); class labels are per row, so requests with different labels
share a call. Each request gets exactly the images its seeds give on a lone
engine: a seed's image does not depend on its batch. Over HTTP, ``POST <route>/sample`` takes
``{"seeds": [...], "sampler": "ddim", "steps": 20, "eta": 0.0}`` (optionally ``"spacing": "karras"``;
for a class-conditional model ``"class_labels": [...]``, one per seed, and ``"guidance_scale": 3.0``;
``"cache_interval": 3`` for reused deep features)
and answers the images as float32 data and PNGs (``to_json``); a bad request gets a 400 with
``{"error": <type>, "message": ...}`` (``http_request``: a pure function of method, path and body,
testable without Ray; ``GET /healthz`` and ``GET /readyz`` are the probes). A drain (``drain``, the
CLI's SIGTERM) answers new requests 503, lets those in flight finish within a grace period, and
answers the rest 503.

Needs ``pip install 'ddpm-engine[ray]'``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import json
import logging
import re
import threading
import time
from typing import NamedTuple

import numpy as np
import torch

from .engine import Engine
from .errors import EngineError, InvalidRequestError, MissingDependencyError, quote
from .images import to_pil
from .noise import check_seeds

try:
    from ray import serve
except ImportError as exc:
    raise MissingDependencyError("ray[serve]", "Scaling out on Ray Serve (ddpm_engine.ray_serve)", extra="ray") from exc

logger = logging.getLogger(__name__)

REQUEST_FIELDS = ("seeds", "sampler", "steps", "eta", "spacing", "class_labels", "guidance_scale", "cache_interval")
MAX_BODY_BYTES = 4 * 2**20  # a request of 32 seeds is under 2 kB; a bigger body is refused with 413
MAX_DEPTH = 8  # JSON nesting a body may have (a request has 2), checked before parsing
MESSAGE_LIMIT = 500  # characters of an error message in an HTTP answer
RETRY_AFTER_S = 1  # a draining server's 503 asks the client to retry (on another server) after this
GRACE_S = 10.0  # how long in-flight requests may run once draining begins (the CLI's --grace-s)
NAMESPACE = "ddpm_engine"  # Ray namespace of the drain signals


class Options(NamedTuple):
    """A request's sampler options, normalized: requests with equal Options share an engine call."""

    sampler: str
    steps: int
    eta: float
    spacing: str | None = None  # None: the one the engine takes when a request names none
    guidance_scale: float = 1.0  # classifier-free guidance (1: off)
    cache_interval: int = 1  # reused deep features (engine.deepcache; 1: off)


class Request(NamedTuple):
    seeds: list
    options: Options
    labels: list | None = None  # a class-conditional model's, one per seed: they ride with the rows


def check_request(engine: Engine, seeds, sampler=None, steps=None, eta=0.0, spacing=None, class_labels=None,
                  guidance_scale=1.0, cache_interval=1, *, max_images: int) -> Request:
    """Validate one request with the engine's own checks (``Engine.plan``, ``SamplingPlan.labels``;
    raises InvalidRequestError)."""
    seeds = check_seeds(seeds)
    plan = engine.plan(sampler=sampler, steps=steps, eta=eta, spacing=spacing, guidance_scale=guidance_scale,
                       cache_interval=cache_interval)
    if len(seeds) > max_images:
        raise InvalidRequestError(f"a request of {len(seeds)} seeds exceeds max_batch_size={max_images}; "
                                  "split it into smaller requests")
    labels = plan.labels(class_labels, len(seeds))
    default = plan.spec.definition.choose_spacing(None, engine.scheduler.timestep_spacing)
    return Request(seeds, Options(plan.spec.sampler, plan.steps, plan.spec.eta,
                                  None if plan.spacing == default else plan.spacing, plan.guidance_scale,
                                  plan.cache_interval), labels)


_JSON_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(body: bytes) -> int:
    """How deep the brackets of a JSON text nest, outside its strings: a scan, not a parse (Python's
    ``json`` recurses once per level, and a deep body would exhaust the stack)."""
    text = np.frombuffer(_JSON_STRINGS.sub(b'""', body), dtype=np.uint8)
    opens = (text == ord("[")) | (text == ord("{"))
    closes = (text == ord("]")) | (text == ord("}"))
    return int(np.cumsum(opens.astype(np.int32) - closes, dtype=np.int64).max(initial=0))


def parse_body(body: bytes) -> dict:
    """The JSON body of ``POST /sample`` -> keyword arguments of ``check_request``, each of its
    JSON type (the engine checks the values)."""
    example = '{"seeds": [...], "sampler": "ddim", "steps": 20, "eta": 0.0}'
    depth = json_depth(body)
    if depth > MAX_DEPTH:
        raise InvalidRequestError(f"the body nests JSON {depth} levels deep (at most {MAX_DEPTH}); send {example}")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # ValueError: also UnicodeDecodeError and too many digits
        raise InvalidRequestError(f"the body is not valid JSON ({clip(str(exc), 100)}); send {example}") from None
    if not isinstance(payload, dict) or "seeds" not in payload:
        raise InvalidRequestError('the body must be a JSON object with at least "seeds": a list of integers')
    unknown = sorted(set(payload) - set(REQUEST_FIELDS))
    if unknown:
        raise InvalidRequestError(f"unknown field(s) {quote(unknown)}; the fields are {list(REQUEST_FIELDS)}")
    kinds = {"seeds": ((list,), "a list of integers"), "sampler": ((str,), "a string"),
             "steps": ((int, type(None)), "an integer or null"), "eta": ((int, float), "a number"),
             "spacing": ((str, type(None)), "a string or null"),
             "class_labels": ((list, type(None)), "a list of integers or null"),
             "guidance_scale": ((int, float), "a number"), "cache_interval": ((int,), "an integer")}
    for name, value in payload.items():
        types, kind = kinds[name]
        if isinstance(value, bool) or not isinstance(value, types):
            raise InvalidRequestError(f"{name} must be {kind}, got {json_type(value)} {quote(value)}")
    return payload


def json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages."""
    for types, name in ((bool, "a boolean"), (str, "a string"), ((int, float), "a number"), (list, "an array"),
                        (dict, "an object")):
        if isinstance(value, types):
            return name
    return "null"


def clip(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """At most ``limit`` characters of a message (the rest is counted, not sent)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


# ---- HTTP: a pure function of (method, path, body) and the replica's state; __call__ wraps it ----
class Answer(NamedTuple):
    """An HTTP answer: status, JSON body, extra headers."""

    status: int
    body: dict
    headers: dict = {}


def error_answer(exc: BaseException) -> Answer:
    """The JSON error answer for an exception raised while serving a request: 400 for a bad
    request, 503 (with Retry-After) when the server is shutting down, 500 for a failure of the
    engine or of this code (never a body's fault). Messages are clipped."""
    from .serving import ServerClosedError

    if isinstance(exc, ServerClosedError):
        return Answer(503, {"error": "ServerClosedError", "message": clip(str(exc))},
                      {"Retry-After": str(RETRY_AFTER_S)})
    status = 400 if isinstance(exc, InvalidRequestError) else 500
    name = type(exc).__name__ if isinstance(exc, EngineError) else "InternalError"
    return Answer(status, {"error": name, "message": clip(str(exc) or type(exc).__name__)})


def draining_error():
    from .serving import ServerClosedError

    return ServerClosedError("this server is shutting down and takes no new requests; retry on another")


def http_request(method: str, path: str, body: bytes | None, *, engine, max_images: int, ready: bool,
                 draining: bool, max_body_bytes: int = MAX_BODY_BYTES) -> Answer | Request:
    """Route one HTTP request: the Answer to send (a probe, or an error), or the validated
    ``Request`` to sample. Never raises for any method, path or body. ``body`` None: it was over
    ``max_body_bytes`` and left unread (``read_body``).

    GET /healthz: 200 while the process serves. GET /readyz: 200 once the model is loaded and
    warmed up, 503 before that and while draining. POST /sample: 413 over ``max_body_bytes``,
    400 for a bad body, 503 (Retry-After) while draining."""
    route = path.rstrip("/") or "/"
    if route in ("/healthz", "/readyz"):
        if method not in ("GET", "HEAD"):
            return Answer(405, {"error": "MethodNotAllowed", "message": f"GET {route}"}, {"Allow": "GET, HEAD"})
        if route == "/healthz":
            return Answer(200, {"status": "alive"})
        status = "draining" if draining else "ready" if ready else "warming up"
        return Answer(200 if status == "ready" else 503, {"status": status})
    if route != "/sample":
        return Answer(404, {"error": "NotFound", "message": f"no route {quote(path)}; POST to /sample, "
                                                            "GET /healthz or /readyz"})
    if method != "POST":
        return Answer(405, {"error": "MethodNotAllowed", "message": "POST a JSON body to /sample"}, {"Allow": "POST"})
    if draining:
        return error_answer(draining_error())
    if body is None or len(body) > max_body_bytes:
        return Answer(413, {"error": "PayloadTooLarge", "message": f"the body is over {max_body_bytes} bytes; "
                                                                   "a request of 32 seeds takes under 2 kB"})
    try:
        return check_request(engine, **parse_body(body), max_images=max_images)
    except InvalidRequestError as exc:
        return error_answer(exc)


async def read_body(request, limit: int) -> bytes | None:
    """The request's body, or None once it is known to be over ``limit`` bytes (by its declared
    length, unread, or after reading ``limit + 1`` bytes)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


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
    """One Serve replica: one Engine behind a batching ``Server``, its request validation, batching,
    HTTP ingress and drain."""

    def __init__(self, model, max_batch_size: int, batch_wait_timeout_s: float, engine_kwargs: dict, *,
                 max_body_bytes: int = MAX_BODY_BYTES, drain_signal: str | None = None):
        self.engine = Engine.from_pretrained(model, **engine_kwargs)
        self.max_batch_size = max_batch_size
        self.max_body_bytes = max_body_bytes
        # engine calls go through a server of the replica's own, so a drain can stop their batches
        self.server = self.engine.serve(max_batch=min(max_batch_size, self.engine.max_batch), max_wait_ms=0.0)
        self._sample_batch.set_max_batch_size(max_batch_size)
        self._sample_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._stats_lock = threading.Lock()
        self._batch_requests = collections.Counter()  # requests in a batch -> how many such batches
        self._engine_calls = 0
        self._in_flight = 0  # requests accepted and not yet answered
        self._draining = False
        self._drained = threading.Event()
        warm = self.engine.plan(sampler="ddim", steps=2)
        labels = None if warm.num_classes is None else [0]
        self.server.submit([0], plan=warm, class_labels=labels).result()  # warm-up: the first request pays no first-call costs
        self._ready = True
        if drain_signal is not None:
            threading.Thread(target=self._wait_for_drain_signal, args=(drain_signal,), name="ddpm-drain-signal",
                             daemon=True).start()

    # ---- drain ---------------------------------------------------------------------------------
    def _wait_for_drain_signal(self, name: str):
        """A thread: block on the app's DrainSignal, then drain and report done to it."""
        import ray

        try:
            signal = ray.get_actor(name, namespace=NAMESPACE)
            grace_s = ray.get(signal.wait.remote())
        except Exception as exc:  # the signal's owner is gone: Serve's own graceful shutdown applies
            logger.info("drain signal %s unavailable (%s)", name, exc)
            return
        self._drain(grace_s)
        signal.done.remote()

    def _drain(self, grace_s: float) -> None:
        """Refuse new requests (503); let the accepted ones finish for up to ``grace_s``; then stop
        the batches of those left, which answer 503, and wait (a second at most) for their answers
        to leave. Idempotent; blocking (a thread, never the event loop)."""
        with self._stats_lock:
            first, self._draining = not self._draining, True
        if not first:
            self._drained.wait(grace_s + 2.0)
            return
        deadline = time.monotonic() + grace_s
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        self.server.close()  # running requests fail with ServerClosedError: 503
        deadline = time.monotonic() + 1.0
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        self._drained.set()

    async def drain(self, grace_s: float = GRACE_S) -> dict:
        """Drain this replica (see ``_drain``); returns once drained: its id and what is left."""
        await asyncio.to_thread(self._drain, grace_s)
        return {"replica": serve.get_replica_context().replica_id.unique_id, "in_flight": self._in_flight}

    def __del__(self):
        # Serve calls this once its own graceful shutdown has drained the replica: refuse latecomers
        self._draining = True

    # ---- sampling ------------------------------------------------------------------------------
    async def sample(self, seeds, sampler=None, steps=None, eta=0.0, spacing=None, class_labels=None,
                     guidance_scale=1.0, cache_interval=1) -> torch.Tensor:
        """The images of ``seeds``, float32 [n, C, H, W] in [-1, 1] on the CPU."""
        if self._draining:
            raise draining_error()
        request = check_request(self.engine, seeds, sampler, steps, eta, spacing, class_labels, guidance_scale,
                                cache_interval, max_images=self.max_batch_size)
        self._in_flight += 1
        try:
            return await self._sample_request(request)
        finally:
            self._in_flight -= 1

    async def _sample_request(self, request: Request) -> torch.Tensor:
        images = await self._sample_batch(request)
        if isinstance(images, BaseException):  # its option group failed (the others did not)
            raise images
        return images

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)  # set per app in __init__
    async def _sample_batch(self, requests: list[Request]) -> list:
        return await asyncio.to_thread(self._run_groups, requests)

    def _run_groups(self, requests: list[Request]) -> list:
        """One engine call per option group (per max_batch_size images of it), all submitted to the
        replica's server at once; each request gets its own rows (and their labels), or its group's error."""
        groups = collections.defaultdict(list)
        for k, r in enumerate(requests):
            groups[r.options].append(k)
        calls = []  # (members, futures of their chunks) per group, or (members, error)
        size = self.server.max_batch
        for options, members in groups.items():
            seeds = [s for k in members for s in requests[k].seeds]
            labels = None if requests[members[0]].labels is None else [c for k in members for c in requests[k].labels]
            try:
                futures = [self.server.submit(seeds[at:at + size], sampler=options.sampler, steps=options.steps,
                                              eta=options.eta, spacing=options.spacing,
                                              guidance_scale=options.guidance_scale,
                                              cache_interval=options.cache_interval,
                                              class_labels=None if labels is None else labels[at:at + size])
                           for at in range(0, len(seeds), size)]
            except EngineError as exc:  # the server is closed: a drain ran out of grace
                calls.append((members, exc))
                continue
            calls.append((members, futures))
        results = [None] * len(requests)
        for members, futures in calls:
            try:
                if isinstance(futures, BaseException):
                    raise futures
                images = torch.cat([f.result() for f in futures])
            except EngineError as exc:
                for k in members:
                    results[k] = exc
                continue
            parts = images.split([len(requests[k].seeds) for k in members])
            for k, part in zip(members, parts):
                results[k] = part.clone()  # its own storage: a view would ship the whole batch
        with self._stats_lock:
            self._batch_requests[len(requests)] += 1
            self._engine_calls += sum(len(f) for _, f in calls if not isinstance(f, BaseException))
        return results

    def stats(self) -> dict:
        """This replica's batching so far: requests per batch (a histogram) and engine calls."""
        with self._stats_lock:
            hist = dict(sorted(self._batch_requests.items()))
            return {"replica": serve.get_replica_context().replica_id.unique_id,
                    "requests_per_batch": hist, "batches": sum(hist.values()),
                    "requests": sum(n * c for n, c in hist.items()), "engine_calls": self._engine_calls}

    # ---- HTTP ----------------------------------------------------------------------------------
    async def __call__(self, request):
        from starlette.responses import JSONResponse

        path, root = request.scope["path"], request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        try:
            body = await read_body(request, self.max_body_bytes) if request.method == "POST" else b""
            got = http_request(request.method, path, body, engine=self.engine, max_images=self.max_batch_size,
                               ready=self._ready, draining=self._draining, max_body_bytes=self.max_body_bytes)
            if isinstance(got, Request):
                answer = await self._answer(got)
            else:
                answer = got
        except Exception as exc:  # a bug here still answers JSON
            logger.exception("request to %s failed", quote(path))
            answer = error_answer(exc)
        return JSONResponse(answer.body, answer.status, headers=answer.headers)

    async def _answer(self, request: Request) -> Answer:
        if self._draining:  # it began while the body was read
            return error_answer(draining_error())
        self._in_flight += 1
        try:
            return Answer(200, to_json(await self._sample_request(request)))
        except EngineError as exc:
            return error_answer(exc)
        finally:
            self._in_flight -= 1


def app(model, *, num_replicas: int = 1, ray_actor_options: dict | None = None, max_batch_size: int = 32,
        batch_wait_timeout_s: float = 0.005, grace_s: float = GRACE_S, max_body_bytes: int = MAX_BODY_BYTES,
        drain_signal: str | None = None, **engine_kwargs):
    """A Serve application of ``num_replicas`` replicas, each one ``Engine.from_pretrained(model,
    **engine_kwargs)``: ``serve.run(app(...), route_prefix=...)`` deploys it.

    ray_actor_options: each replica's Ray resources; default ``{"num_gpus": 1}`` (one replica per GPU)
        when ``device`` is "cuda" (Ray hides the GPUs from an actor that reserves none), else Serve's
        default of one CPU.
    max_batch_size: most requests per batch, images per engine call, and images per request.
    batch_wait_timeout_s: how long a replica waits for batch-mates after a request arrives.
    grace_s: when Serve stops a replica (scale-down, redeploy, shutdown), how long its in-flight
        requests may still run (Serve's ``graceful_shutdown_timeout_s``).
    max_body_bytes: a larger HTTP body is answered 413.
    drain_signal: the name of a ``DrainSignal`` (``drain_signal()``): setting it drains every replica.
    """
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise InvalidRequestError(f"max_batch_size must be a positive integer, got {quote(max_batch_size)}")
    for name, value in (("grace_s", grace_s), ("max_body_bytes", max_body_bytes)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise InvalidRequestError(f"{name} must be a number >= 0, got {quote(value)}")
    if ray_actor_options is None and str(engine_kwargs.get("device", "")).startswith("cuda"):
        ray_actor_options = {"num_gpus": 1}
    options = {} if ray_actor_options is None else {"ray_actor_options": ray_actor_options}
    # One batch runs while the next one forms: Serve's default of 5 ongoing requests would cap batches at 5.
    deployment = serve.deployment(EngineReplica, name="ddpm").options(
        num_replicas=num_replicas, max_ongoing_requests=2 * max_batch_size, graceful_shutdown_timeout_s=grace_s,
        graceful_shutdown_wait_loop_s=0.1, **options)
    return deployment.bind(model, max_batch_size, batch_wait_timeout_s, engine_kwargs, max_body_bytes=int(max_body_bytes),
                           drain_signal=drain_signal)


def start(address: str | None = None, *, host: str = "127.0.0.1", port: int = 8000, **ray_init_kwargs):
    """Start Ray here (or join the cluster at ``address``) and Serve's HTTP proxy on host:port. Without
    an address this always starts a new local Ray, never one found on the machine."""
    import ray

    ray.init(address=address or "local", **ray_init_kwargs)
    serve.start(http_options={"host": host, "port": port})


# ---- draining every replica at once (the CLI's SIGTERM) -------------------------------------------
class DrainSignal:
    """A named Ray actor the replicas of one app wait on: ``set(grace_s)`` starts every replica's
    drain at once (Serve's router cannot address each replica), ``drained`` waits for their reports."""

    def __init__(self):
        self._set = asyncio.Event()
        self._done = asyncio.Condition()
        self.grace_s = None
        self.replicas_done = 0

    async def set(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._set.set()

    async def wait(self) -> float:
        await self._set.wait()
        return self.grace_s

    async def done(self) -> None:
        async with self._done:
            self.replicas_done += 1
            self._done.notify_all()

    async def drained(self, replicas: int, timeout_s: float) -> int:
        """Wait until ``replicas`` replicas reported drained (or ``timeout_s``); how many did."""
        async with self._done:
            try:
                await asyncio.wait_for(self._done.wait_for(lambda: self.replicas_done >= replicas), timeout_s)
            except asyncio.TimeoutError:
                pass
            return self.replicas_done


def drain_signal(name: str):
    """Create the named DrainSignal (owned by this driver) for ``app(..., drain_signal=name)``."""
    import ray

    return ray.remote(num_cpus=0)(DrainSignal).options(name=name, namespace=NAMESPACE).remote()


def drain(signal, replicas: int, grace_s: float) -> int:
    """Drain every replica waiting on ``signal``: new requests get 503, in-flight ones have
    ``grace_s`` to finish, the rest get 503. Returns how many replicas reported drained (within
    grace + 1.5 s)."""
    import ray

    ray.get(signal.set.remote(grace_s))
    return ray.get(signal.drained.remote(replicas, grace_s + 1.5))
