"""Export and serving: sentence-transformers / AutoModel loading offline, the OpenAI-compatible server over a real
socket (official `openai` client, bad requests, invalid Unicode, body limits, a full queue, fuzzing over all of
Unicode), the dynamic batcher's forward passes and shutdown, and Ray Serve replicas."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from conftest import free_port
from hypothesis import strategies as st

from conan.config import ServeConfig
from conan.encoder import Encoder
from conan.serve.app import create_app

TEXTS = ["Where is the Eiffel tower?", "La tour Eiffel est à Paris.", "埃菲尔铁塔在巴黎。", "short",
         "A somewhat longer sentence about embeddings, Matryoshka dimensions and servers."]
TOKEN = "test-token-123"
BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def encoder(embedding_model_dir):
    return Encoder(embedding_model_dir)


@contextmanager
def running(cfg: ServeConfig):
    """A live uvicorn server for cfg in a thread of this process; yields (url, app)."""
    import uvicorn

    app = create_app(cfg)
    srv = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://{cfg.host}:{cfg.port}", app
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(embedding_model_dir):
    """A live uvicorn server on 127.0.0.1 with bearer-token auth and a 64 KiB body limit."""
    os.environ["CONAN_TEST_API_KEY"] = TOKEN
    cfg = ServeConfig(model_dir=str(embedding_model_dir), model_name="conan-test", port=free_port(),
                      api_key_env="CONAN_TEST_API_KEY", max_inputs_per_request=16, max_input_tokens=64,
                      max_request_bytes=BODY_LIMIT)
    with running(cfg) as (url, _):
        yield url


def post(url, body, token=TOKEN):
    bearer = b"Bearer " + token if isinstance(token, bytes) else f"Bearer {token}"
    headers = {"Authorization": bearer} if token else {}
    return httpx.post(f"{url}/v1/embeddings", json=body, headers=headers, timeout=30)


def test_sentence_transformers_loads_the_export_and_matches_the_encoder(embedding_model_dir, encoder):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(embedding_model_dir), device="cpu")
    assert np.abs(model.encode(TEXTS) - encoder.encode(TEXTS)).max() < 1e-5
    for dim in (32, 64):
        truncated = SentenceTransformer(str(embedding_model_dir), device="cpu", truncate_dim=dim)
        ours = encoder.encode(TEXTS, dim=dim)
        theirs = truncated.encode(TEXTS, normalize_embeddings=True)
        assert theirs.shape == (len(TEXTS), dim) and np.abs(theirs - ours).max() < 1e-5


def test_automodel_loads_the_export_without_conan(embedding_model_dir, encoder):
    """trust_remote_code runs the model's own source files shipped in the export; `conan` is made unimportable."""
    script = f"""
import sys, json
sys.modules["conan"] = None  # any import of conan now fails
import torch
from transformers import AutoModel, AutoTokenizer
path = {str(embedding_model_dir)!r}
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
enc = tok({TEXTS!r}, padding=True, return_tensors="pt")
with torch.no_grad():
    h = model(**enc).last_hidden_state
m = enc["attention_mask"].unsqueeze(-1).float()
e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
print(json.dumps({{"cls": type(model).__module__, "emb": e.tolist()}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["cls"].startswith("transformers_modules")  # the shipped code, not the installed package
    assert np.abs(np.array(result["emb"]) - encoder.encode(TEXTS)).max() < 1e-5


def test_openai_client_gets_embeddings_of_the_requested_dimension(server, encoder):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=TOKEN)
    assert [m.id for m in client.models.list().data] == ["conan-test"]
    assert client.models.retrieve("conan-test").id == "conan-test"
    full = client.embeddings.create(model="conan-test", input=TEXTS, encoding_format="float")
    assert [d.index for d in full.data] == list(range(len(TEXTS)))
    assert np.abs(np.array([d.embedding for d in full.data]) - encoder.encode(TEXTS)).max() < 1e-5
    assert full.usage.prompt_tokens == sum(encoder.token_counts(TEXTS))
    small = client.embeddings.create(model="conan-test", input="埃菲尔铁塔在巴黎。", dimensions=32,
                                     encoding_format="float")
    assert len(small.data[0].embedding) == 32
    assert np.abs(np.array(small.data[0].embedding) - encoder.encode([TEXTS[2]], dim=32)[0]).max() < 1e-5
    # The client's default asks for base64 and decodes it itself: same floats.
    default = client.embeddings.create(model="conan-test", input=TEXTS, dimensions=64)
    assert np.abs(np.array([d.embedding for d in default.data]) - encoder.encode(TEXTS, dim=64)).max() < 1e-6


def test_base64_decodes_to_the_same_floats(server):
    floats = post(server, {"model": "conan-test", "input": TEXTS, "encoding_format": "float"}).json()
    b64 = post(server, {"model": "conan-test", "input": TEXTS, "encoding_format": "base64"}).json()
    for f, b in zip(floats["data"], b64["data"]):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.tolist() == pytest.approx(f["embedding"], abs=1e-7)


@pytest.mark.parametrize("body,token,status,param", [
    ({"model": "conan-test", "input": ""}, TOKEN, 400, "input"),
    ({"model": "conan-test", "input": []}, TOKEN, 400, "input"),
    ({"model": "conan-test", "input": ["ok", "  "]}, TOKEN, 400, "input"),
    ({"model": "conan-test", "input": "word " * 500}, TOKEN, 400, "input"),
    ({"model": "conan-test", "input": ["x"] * 17}, TOKEN, 400, "input"),
    ({"model": "conan-test", "input": 42}, TOKEN, 400, "input"),
    ({"model": "conan-test", "input": [1, 2, 3]}, TOKEN, 400, "input"),
    ({"model": "conan-test", "input": "hi", "dimensions": 4096}, TOKEN, 400, "dimensions"),
    ({"model": "conan-test", "input": "hi", "dimensions": 0}, TOKEN, 400, "dimensions"),
    ({"model": "conan-test", "input": "hi", "dimensions": "64"}, TOKEN, 400, "dimensions"),
    ({"model": "conan-test", "input": "hi", "encoding_format": "int8"}, TOKEN, 400, "encoding_format"),
    ({"input": "hi"}, TOKEN, 400, "model"),
    ({"model": "other-model", "input": "hi"}, TOKEN, 404, "model"),
    ({"model": "conan-test", "input": "hi"}, None, 401, None),
    ({"model": "conan-test", "input": "hi"}, "wrong", 401, None),
    ({"model": "conan-test", "input": "hi"}, TOKEN + "x", 401, None),
    ({"model": "conan-test", "input": "hi"}, "ü".encode(), 401, None),  # not ASCII: compared as bytes, no 500
])
def test_bad_requests_get_a_4xx_with_a_message(server, body, token, status, param):
    response = post(server, body, token)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["param"] == param


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v1/embeddings", 405), ("GET", "/v1/models/other-model", 404), ("POST", "/v1/nothing", 404),
    ("GET", "/nothing", 404)])
def test_unknown_routes_methods_and_models_get_openais_error_body(server, method, path, status):
    response = httpx.request(method, f"{server}{path}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert response.status_code == status and response.json()["error"]["message"], response.text


def test_malformed_json_is_a_400(server):
    response = httpx.post(f"{server}/v1/embeddings", content=b"{not json", timeout=10,
                          headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["message"]


def test_behind_a_path_prefix_the_api_still_wants_its_key(embedding_model_dir, monkeypatch):
    """Served under a root path (uvicorn --root-path, a proxy's prefix), /api/v1/embeddings without the key is a 401
    as /v1/embeddings is; with it, the embeddings."""
    from fastapi.testclient import TestClient

    monkeypatch.setenv("CONAN_PREFIX_KEY", TOKEN)
    cfg = ServeConfig(model_dir=str(embedding_model_dir), model_name="conan-test", api_key_env="CONAN_PREFIX_KEY")
    body = {"model": "conan-test", "input": "hi"}
    with TestClient(create_app(cfg), root_path="/api") as client:
        assert client.post("/api/v1/embeddings", json=body).status_code == 401
        answer = client.post("/api/v1/embeddings", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 200 and len(answer.json()["data"]) == 1


# All of Unicode: lone surrogates and control characters (NUL included) drawn as often as the rest.
CHARS = st.characters(categories=["L", "M", "N", "P", "S", "Z", "C"]) | st.characters(categories=["Cs"]) | \
    st.characters(max_codepoint=0x1F)
TEXT = st.text(CHARS, max_size=30)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
                    max_leaves=12)
BODIES = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["conan-test", "x", ""]) | JSON, "input": TEXT | st.lists(TEXT, max_size=20) | JSON,
    "dimensions": st.integers(-5, 300) | JSON,
    "encoding_format": st.sampled_from(["float", "base64", "hex"]) | JSON}) | JSON


def post_raw(url, content: bytes, token=TOKEN):
    """POST raw bytes as a JSON body (httpx's json= cannot carry lone surrogates: it writes UTF-8)."""
    return httpx.post(f"{url}/v1/embeddings", content=content, timeout=30,
                      headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=BODIES, cut=st.integers(0, 200), noise=st.binary(max_size=3))
def test_fuzzed_requests_never_get_a_5xx(server, body, cut, noise):
    """Arbitrary JSON (lone surrogates as \\u escapes), then the same bytes with stray bytes spliced in."""
    encoded = json.dumps(body).encode()
    for content in (encoded, encoded[:cut] + noise + encoded[cut:]) if noise else (encoded,):
        response = post_raw(server, content)
        assert response.status_code < 500, (content, response.text)
        assert response.status_code == 200 or response.json()["error"]["message"]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.text(CHARS, min_size=1, max_size=30))
def test_any_string_is_embedded_unless_it_is_invalid_unicode_or_blank(server, encoder, text):
    body = {"model": "conan-test", "input": [text], "encoding_format": "float"}
    response = post_raw(server, json.dumps(body).encode())
    invalid = any(c == "\x00" or "\ud800" <= c <= "\udfff" for c in text)
    if invalid:
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_unicode", response.text
    elif not text.strip():
        assert response.status_code == 400 and "empty" in response.json()["error"]["message"]
    elif encoder.token_counts([text])[0] > 64:  # the fixture's max_input_tokens (a byte-level BPE: astral chars cost)
        assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    else:
        assert response.status_code == 200, response.text
        vector = np.array(response.json()["data"][0]["embedding"])
        assert np.abs(vector - encoder.encode([text])[0]).max() < 1e-5


@pytest.mark.parametrize("content,param", [
    (b'{"model": "conan-test", "input": "\\ud800 lone surrogate"}', "input"),
    (b'{"model": "conan-test", "input": ["fine", "low \\udc00 alone"]}', "input"),
    (b'{"model": "conan-test", "input": "\\ude00\\ud83d reversed pair"}', "input"),
    (b'{"model": "conan-test", "input": "nul \\u0000 inside"}', "input"),
    (b'{"model": "conan-test\\ud800", "input": "hi"}', "model"),
    (b'{"model": "conan-test", "input": "overlong \xc0\xaf slash"}', None),
    (b'{"model": "conan-test", "input": "encoded surrogate \xed\xa0\x80"}', None),
    (b'{"model": "conan-test", "input": "cut \xe4\xbd"}', None),
    (b'{"model": "conan-test", "input": "latin-1 caf\xe9"}', None),
])
def test_invalid_unicode_is_a_400(server, content, param):
    response = post_raw(server, content)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_unicode" and error["param"] == param and error["type"] == "invalid_request_error"


def test_surrogate_pairs_and_control_characters_are_valid_text(server, encoder):
    """A JSON escape pair is one astral character; tabs and other controls (not NUL) are text like any other."""
    response = post_raw(server, b'{"model": "conan-test", "input": ["\\ud83d\\ude00 smile", "bell\\u0007\\ttab"], '
                                b'"encoding_format": "float"}')
    assert response.status_code == 200, response.text
    vectors = np.array([d["embedding"] for d in response.json()["data"]])
    assert np.abs(vectors - encoder.encode(["\U0001F600 smile", "bell\x07\ttab"])).max() < 1e-5


def _raw_exchange(url: str, head: bytes, chunks=()) -> bytes:
    """Send head and chunks over one socket and return what the server answers (up to its first response)."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head)
        for chunk in chunks:
            sock.sendall(chunk)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < 2:
            answer += sock.recv(65536)
        return answer


def test_a_declared_oversized_body_is_refused_before_it_is_sent(server):
    """Only headers are sent, announcing 64 MB: a server reading the body first would wait forever."""
    head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {64 * 1024 * 1024}\r\n\r\n").encode()
    answer = _raw_exchange(server, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"


def test_a_chunked_body_is_refused_once_it_passes_the_limit(server):
    """A chunked body that never ends: the 413 comes once the limit is passed, not at the (missing) end."""
    head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"2000\r\n" + b" " * 0x2000 + b"\r\n"  # 8 KiB chunks, BODY_LIMIT / 8 KiB + 1 of them
    answer = _raw_exchange(server, head, [chunk] * (BODY_LIMIT // 0x2000 + 1))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_bodies_under_the_limit_are_read_over_it_refused(server):
    padding = {"user": "u" * (BODY_LIMIT - 200)}  # an ignored field makes the body large and still valid
    under = post(server, {"model": "conan-test", "input": "hello", **padding})
    assert under.status_code == 200 and len(under.request.content) <= BODY_LIMIT
    over = post(server, {"model": "conan-test", "input": "hello", "user": "u" * BODY_LIMIT})
    assert over.status_code == 413 and over.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(f"{server}/v1/embeddings", content=iter([b" " * 0x4000] * 5), timeout=30,
                         headers={"Authorization": f"Bearer {TOKEN}"})
    assert chunked.status_code == 413 and "transfer-encoding" in chunked.request.headers


def test_a_full_queue_answers_429_with_retry_after(embedding_model_dir):
    """The real model is made slow (its first forward pass waits for a signal): one text is in that pass, 4 queue
    behind it (the bound), the next request is refused at once; released, every accepted request is answered."""
    cfg = ServeConfig(model_dir=str(embedding_model_dir), model_name="conan-test", port=free_port(),
                      max_inputs_per_request=4, max_queued_texts=5)
    body = {"model": "conan-test", "input": "queued", "encoding_format": "float"}
    with running(cfg) as (url, app), ThreadPoolExecutor(5) as pool:
        batcher, release, in_pass = app.state.batcher, threading.Event(), threading.Event()
        encode = batcher.encode

        def slow_encode(texts, dim):
            in_pass.set()
            release.wait()
            return encode(texts, dim)

        batcher.encode = slow_encode
        accepted = [pool.submit(post, url, body, None)]
        assert in_pass.wait(20)
        accepted += [pool.submit(post, url, body, None) for _ in range(4)]
        _wait_for(lambda: batcher.queued_texts == 5)
        refused = post(url, {**body, "input": ["one more"]}, None)
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        release.set()
        assert [f.result().status_code for f in accepted] == [200] * 5
        assert post(url, body, None).status_code == 200


def _wait_for(condition, timeout=20.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.01)


def _length_encoder(passes: list):
    """count_tokens and encode for texts "x" * n: n tokens; a text's vector is [n, position in its pass]."""
    def encode(texts, key):
        passes.append([len(t) for t in texts])
        time.sleep(0.002)
        return np.array([[len(t), i] for i, t in enumerate(texts)], dtype=np.float32)
    return (lambda texts: [len(t) for t in texts]), encode


@settings(max_examples=40, deadline=None)
@given(requests=st.lists(st.lists(st.integers(1, 120), min_size=1, max_size=12), min_size=1, max_size=12),
       max_texts=st.integers(1, 16), max_tokens=st.integers(1, 400))
def test_batcher_passes_stay_within_budget_and_answer_every_request_in_order(requests, max_texts, max_tokens):
    import asyncio

    from conan.serve.batcher import DynamicBatcher, TextTooLong

    passes = []
    count_tokens, encode = _length_encoder(passes)

    async def scenario():
        batcher = DynamicBatcher(count_tokens, encode, max_text_tokens=100, truncate_at=1000,
                                 max_pass_texts=max_texts, max_pass_tokens=max_tokens)
        batcher.start()
        outcomes = await asyncio.gather(*(batcher.submit(["x" * n for n in lengths], None, lambda v, c: (v, c))
                                          for lengths in requests), return_exceptions=True)
        await batcher.stop()
        return outcomes, batcher.queued_texts

    outcomes, left = asyncio.run(scenario())
    assert left == 0
    for lengths, outcome in zip(requests, outcomes):
        if max(lengths) > 100:
            assert isinstance(outcome, TextTooLong) and lengths[outcome.index] == outcome.tokens > 100
            continue
        vectors, counts = outcome
        assert counts == lengths and vectors[:, 0].tolist() == lengths  # each text's own vector, in request order
    # First come, first served: the passes, end to end, hold every admitted text in arrival order.
    assert [n for p in passes for n in p] == [n for lengths in requests if max(lengths) <= 100 for n in lengths]
    assert all(len(p) <= max_texts and (len(p) == 1 or sum(p) <= max_tokens) for p in passes)


def test_a_pass_takes_the_oldest_texts_of_one_key_in_arrival_order():
    import asyncio

    from conan.serve.batcher import DynamicBatcher

    passes = []
    count_tokens, encode = _length_encoder(passes)

    async def scenario():
        batcher = DynamicBatcher(count_tokens, encode, max_text_tokens=100, truncate_at=100, max_pass_texts=8,
                                 max_pass_tokens=160)
        batcher.start()
        await asyncio.gather(batcher.submit(["x" * n for n in (50, 3, 4, 5, 48, 52, 6, 49)], 64, lambda v, c: v),
                             batcher.submit(["x" * n for n in (7, 8)], 32, lambda v, c: v))
        await batcher.stop()

    asyncio.run(scenario())
    # Key 64 arrived first: 50 … 48 make 110 tokens, 52 would make 162; the next pass starts at 52. Key 32's texts
    # wait for their own pass, whatever fits beside the others.
    assert passes == [[50, 3, 4, 5, 48], [52, 6, 49], [7, 8]]


def test_a_pass_with_a_missing_vector_fails_its_requests_instead_of_leaving_them_waiting():
    import asyncio

    from conan.serve.batcher import DynamicBatcher

    def short_encode(texts, key):
        return np.zeros((len(texts) - 1, 2), dtype=np.float32)

    async def scenario():
        batcher = DynamicBatcher(lambda texts: [len(t) for t in texts], short_encode, max_text_tokens=100,
                                 truncate_at=100)
        batcher.start()
        outcome = await asyncio.wait_for(asyncio.gather(batcher.submit(["a", "bb"], None, lambda v, c: v),
                                                        return_exceptions=True), timeout=10)
        await batcher.stop()
        return outcome[0], batcher.queued_texts

    error, left = asyncio.run(scenario())
    assert isinstance(error, RuntimeError) and "1 vectors for 2 texts" in str(error) and left == 0


def test_batcher_stop_answers_what_is_queued_then_refuses():
    """stop() (the server's shutdown) answers every submitted request before it returns; later submits fail; a full
    batcher refuses at once."""
    import asyncio

    from conan.serve.batcher import DynamicBatcher, QueueFull

    passes = []
    count_tokens, encode = _length_encoder(passes)

    async def scenario():
        batcher = DynamicBatcher(count_tokens, encode, max_text_tokens=100, truncate_at=100, max_pass_texts=2,
                                 max_queued_texts=6)
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(["x" * (i + 1)], None, lambda v, c: c[0])) for i in range(8)]
        await asyncio.sleep(0)  # every submit has run: 6 are held, 2 refused
        await batcher.stop()
        outcomes = await asyncio.gather(*pending, return_exceptions=True)
        with pytest.raises(RuntimeError, match="not running"):
            await batcher.submit(["late"], None, lambda v, c: c)
        return outcomes

    outcomes = asyncio.run(scenario())
    assert outcomes[:6] == [1, 2, 3, 4, 5, 6] and all(isinstance(o, QueueFull) for o in outcomes[6:])
    assert sorted(n for p in passes for n in p) == [1, 2, 3, 4, 5, 6]


def test_float_vectors_survive_json_exactly(server, encoder):
    """orjson writes float32 vectors in their shortest float32 form: read back, they are the encoder's own."""
    response = post(server, {"model": "conan-test", "input": TEXTS, "encoding_format": "float"})
    vectors = np.array([d["embedding"] for d in response.json()["data"]])
    assert np.abs(vectors - encoder.encode(TEXTS)).max() < 1e-6


def test_concurrent_requests_share_batches_and_reach_metrics(server):
    def metric(text, name):
        return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))

    before = httpx.get(f"{server}/metrics").text
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda i: post(server, {"model": "conan-test", "input": [f"text {i}"] * 2}).status_code,
                                 range(32)))
    assert statuses == [200] * 32
    after = httpx.get(f"{server}/metrics").text
    batches = metric(after, "conan_embedding_batches") - metric(before, "conan_embedding_batches")
    assert 0 < batches < 32  # 32 concurrent requests, fewer forward batches
    assert metric(after, "conan_embedded_texts_total") - metric(before, "conan_embedded_texts_total") == 64
    assert 'conan_embedding_requests_total{status="400"}' in after


def test_health_needs_no_token(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok", "model": "conan-test"}


def test_ray_serve_replicas_answer(ray_cluster, embedding_model_dir, encoder):
    from ray import serve

    from conan.serve.runner import run_ray_serve

    cfg = ServeConfig(model_dir=str(embedding_model_dir), model_name="conan-test", port=free_port(), replicas=2,
                      replica_cpus=0.25, backend="ray")
    run_ray_serve(cfg, blocking=False)
    try:
        url = f"http://{cfg.host}:{cfg.port}"
        replicas, vectors = set(), []
        for _ in range(20):
            response = post(url, {"model": "conan-test", "input": TEXTS, "encoding_format": "float"}, token=None)
            assert response.status_code == 200, response.text
            replicas.add(response.headers["x-conan-replica"])
            vectors.append(np.array([d["embedding"] for d in response.json()["data"]]))
        assert len(replicas) == 2
        assert all(np.abs(v - encoder.encode(TEXTS)).max() < 1e-5 for v in vectors)
    finally:
        serve.shutdown()
