"""The HTTP layer of ``python -m ddpm_engine serve`` (ddpm_engine.ray_serve.http_request), without Ray:
any method, path and body gets a JSON answer of a documented status, never a 500; hostile bodies
(too large, nested too deep, absurd values) get 413 or 400 with short messages; the probes answer
as documented. The same server in real processes, under SIGTERM: tests/engine/test_lifecycle.py."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'ddpm-engine[ray]'")

from ddpm_engine import Engine, EngineError, InvalidRequestError  # noqa: E402
from ddpm_engine import ray_serve  # noqa: E402
from ddpm_engine.errors import QUOTE_LIMIT, quote  # noqa: E402
from ddpm_engine.serving import ServerClosedError  # noqa: E402

MAX_IMAGES = 16
MAX_BODY = 64 * 2**10  # small, so that generated bodies cross it
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LONGEST_MESSAGE = ray_serve.MESSAGE_LIMIT + 40


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("digits", device="cpu", backend="torch")


def answer(engine, body: bytes, method="POST", path="/sample", *, ready=True, draining=False):
    return ray_serve.http_request(method, path, body, engine=engine, max_images=MAX_IMAGES, ready=ready,
                                  draining=draining, max_body_bytes=MAX_BODY)


def assert_json_error(got, status: int):
    assert isinstance(got, ray_serve.Answer) and got.status == status, got
    json.dumps(got.body, allow_nan=False)  # what the JSON response sends
    assert set(got.body) == {"error", "message"} and 0 < len(got.body["message"]) <= LONGEST_MESSAGE, got


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
field_values = {
    "seeds": st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=MAX_IMAGES) | json_values,
    "sampler": st.sampled_from(["ddpm", "ddim", "dpmpp_2m", "unipc"]) | json_values,
    "steps": st.none() | st.integers(-5, 1005) | json_values,
    "eta": st.floats(0, 1) | json_values,
}
requests = st.fixed_dictionaries({}, optional={**field_values, "step": json_values})


def deep(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    requests.map(lambda r: json.dumps(r).encode()),
    requests.map(lambda r: json.dumps(r).encode()).flatmap(  # cut or padded: not JSON any more
        lambda b: st.integers(0, len(b)).map(lambda n: b[:n] + b"\x00{[" * (n % 3))),
    st.integers(0, 3000).map(lambda d: json.dumps({"seeds": [1], "sampler": "ddim"})[:-1].encode()
                             + b', "steps": ' + deep(d).encode() + b"}"),
    st.integers(MAX_BODY - 20, MAX_BODY + 20).map(lambda n: b'{"seeds": [1], "sampler": "' + b"x" * n + b'"}'),
)


@FUZZ
@given(body=bodies)
def test_no_body_gets_a_500(engine, body):
    got = answer(engine, body)
    if isinstance(got, ray_serve.Request):  # valid: the engine's plan accepted it
        assert 1 <= len(got.seeds) <= MAX_IMAGES and got.options.steps >= 1
        return
    assert_json_error(got, 413 if len(body) > MAX_BODY else 400)


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "X"]),
       path=st.sampled_from(["/sample", "/sample/", "/healthz", "/readyz", "/", ""]) | st.text(max_size=2000),
       body=st.binary(max_size=50), ready=st.booleans(), draining=st.booleans())
def test_any_method_and_path_gets_a_json_answer_of_a_documented_status(engine, method, path, body, ready, draining):
    got = answer(engine, body, method, path, ready=ready, draining=draining)
    if isinstance(got, ray_serve.Request):
        assert method == "POST" and path.rstrip("/") == "/sample" and not draining
        return
    assert got.status in (200, 400, 404, 405, 413, 503), got
    json.dumps(got.body, allow_nan=False)
    assert len(json.dumps(got.body)) <= LONGEST_MESSAGE + 100


def test_hostile_bodies_get_400_or_413_with_short_messages(engine):
    nested = json.dumps({"seeds": [1]})[:-1] + ', "steps": ' + deep(1000) + "}"  # about 2 kB
    got = answer(engine, nested.encode())
    assert_json_error(got, 400)
    assert "nests JSON 1001 levels deep" in got.body["message"]
    assert_json_error(answer(engine, deep(100_000).encode()), 413)  # too large, before its depth matters
    assert_json_error(answer(engine, None), 413)  # over its declared length, unread
    long_name = "x" * (MAX_BODY - 100)
    got = answer(engine, json.dumps({"seeds": [1], "sampler": long_name}).encode())
    assert_json_error(got, 400)
    assert "x" * QUOTE_LIMIT in got.body["message"]
    got = answer(engine, json.dumps({"seeds": ["y" * 10_000]}).encode())
    assert_json_error(got, 400)
    got = answer(engine, json.dumps({"seeds": "12"}).encode())
    assert_json_error(got, 400)
    assert got.body["message"].startswith("seeds must be a list of integers, got a string '12'")
    got = answer(engine, json.dumps({"seeds": [1], "sampler": "ddim", "steps": 3, "x" * 10_000: 1}).encode())
    assert_json_error(got, 400)
    assert_json_error(answer(engine, b'{"seeds": [' + b"9" * 5000 + b"]}"), 400)  # past Python's int digits
    assert answer(engine, b'{"seeds": [1, 2], "sampler": "ddim", "steps": 3, "eta": 0.5}') == \
        ray_serve.Request([1, 2], ray_serve.Options("ddim", 3, 0.5))


def depth(value) -> int:
    inner = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    return 0 if inner is None else 1 + max(map(depth, inner), default=0)


bracketed_text = st.text(alphabet='[]{}"\\ab', max_size=12)
bracketed_json = st.recursive(st.none() | st.integers() | bracketed_text,
                              lambda inner: st.lists(inner, max_size=3) | st.dictionaries(bracketed_text, inner, max_size=3),
                              max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(value=bracketed_json)
def test_the_depth_of_json_is_measured_without_parsing(value):
    """Brackets, quotes and backslashes inside strings do not count."""
    assert ray_serve.json_depth(json.dumps(value).encode()) == depth(value)


def test_the_probes_answer_as_kubernetes_expects(engine):
    assert answer(engine, b"", "GET", "/healthz") == ray_serve.Answer(200, {"status": "alive"})
    assert answer(engine, b"", "GET", "/healthz", draining=True).status == 200  # alive while draining
    assert answer(engine, b"", "GET", "/readyz") == ray_serve.Answer(200, {"status": "ready"})
    assert answer(engine, b"", "GET", "/readyz", ready=False) == ray_serve.Answer(503, {"status": "warming up"})
    assert answer(engine, b"", "GET", "/readyz", draining=True) == ray_serve.Answer(503, {"status": "draining"})
    assert answer(engine, b"", "POST", "/readyz").status == 405


def test_a_draining_server_answers_503_with_retry_after(engine):
    got = answer(engine, b'{"seeds": [1]}', draining=True)
    assert_json_error(got, 503)
    assert got.body["error"] == "ServerClosedError" and got.headers == {"Retry-After": "1"}


@pytest.mark.parametrize("exc,status,name", [
    (InvalidRequestError("bad"), 400, "InvalidRequestError"),
    (ServerClosedError("closed"), 503, "ServerClosedError"),
    (EngineError("out of memory"), 500, "EngineError"),
    (RuntimeError("z" * 10_000), 500, "InternalError"),
])
def test_errors_map_to_json_answers(exc, status, name):
    got = ray_serve.error_answer(exc)
    assert_json_error(got, status)
    assert got.body["error"] == name and ("Retry-After" in got.headers) == (status == 503)


@settings(max_examples=200, deadline=None)
@given(value=json_values | st.binary(max_size=200) | st.text(min_size=100, max_size=5000)
       | st.lists(st.integers(), min_size=50, max_size=200))
def test_quote_is_short_and_starts_like_the_value(value):
    text = quote(value)
    assert len(text) <= QUOTE_LIMIT + 40, text
    if isinstance(value, (str, bytes)):
        assert text[:QUOTE_LIMIT] == repr(value[:QUOTE_LIMIT])[:QUOTE_LIMIT]
