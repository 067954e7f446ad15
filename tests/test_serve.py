"""Export and serving: sentence-transformers / AutoModel loading offline, the OpenAI-compatible server over a real
socket (official `openai` client, bad requests, fuzzing), dynamic batching and Ray Serve replicas."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

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


@pytest.fixture(scope="module")
def encoder(embedding_model_dir):
    return Encoder(embedding_model_dir)


@pytest.fixture(scope="module")
def server(embedding_model_dir):
    """A live uvicorn server on 127.0.0.1 with bearer-token auth."""
    import uvicorn

    os.environ["CONAN_TEST_API_KEY"] = TOKEN
    cfg = ServeConfig(model_dir=str(embedding_model_dir), model_name="conan-test", port=free_port(),
                      api_key_env="CONAN_TEST_API_KEY", max_inputs_per_request=16, max_input_tokens=64)
    srv = uvicorn.Server(uvicorn.Config(create_app(cfg), host=cfg.host, port=cfg.port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://{cfg.host}:{cfg.port}"
    srv.should_exit = True
    thread.join(10)


def post(url, body, token=TOKEN):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
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
])
def test_bad_requests_get_a_4xx_with_a_message(server, body, token, status, param):
    response = post(server, body, token)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["param"] == param


def test_malformed_json_is_a_400(server):
    response = httpx.post(f"{server}/v1/embeddings", content=b"{not json", timeout=10,
                          headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["message"]


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                                       max_size=4), max_leaves=12)
BODIES = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["conan-test", "x", ""]) | JSON, "input": st.text(max_size=50) | st.lists(
        st.text(max_size=30), max_size=20) | JSON, "dimensions": st.integers(-5, 300) | JSON,
    "encoding_format": st.sampled_from(["float", "base64", "hex"]) | JSON}) | JSON


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=BODIES)
def test_fuzzed_requests_never_get_a_5xx(server, body):
    response = post(server, body)
    assert response.status_code < 500, (body, response.text)
    assert response.status_code == 200 or response.json()["error"]["message"]


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
