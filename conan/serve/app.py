"""The FastAPI app: OpenAI-compatible `POST /v1/embeddings`, `GET /v1/models`, `/health`, Prometheus `/metrics`.

Bad requests get a 4xx with OpenAI's error body ({"error": {"message", "type", "param", "code"}}); the
server never answers a client's mistake with a 5xx. The encoder is loaded in the app's lifespan, so the
same app runs under uvicorn and as a Ray Serve ingress (one encoder per replica).
"""

from __future__ import annotations

import base64
import json
import os
import time
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from conan.config import ServeConfig
from conan.encoder import model_name
from conan.serve.batcher import DynamicBatcher


MAX_CHARS_PER_TOKEN = 64


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request; token-id inputs are refused with a clear message."""

    model_config = ConfigDict(extra="allow")

    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: StrictStr
    dimensions: StrictInt | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: StrictStr | None = None


class APIError(Exception):
    """A client error with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _error(status: int, message: str, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class ServerMetrics:
    """Prometheus metrics of one app (its own registry: several apps may live in one process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("conan_embedding_requests", "embedding requests by HTTP status", ["status"],
                                registry=self.registry)
        self.texts = Counter("conan_embedded_texts", "texts embedded", registry=self.registry)
        self.tokens = Counter("conan_embedded_tokens", "input tokens embedded", registry=self.registry)
        self.latency = Histogram("conan_embedding_request_seconds", "latency of successful embedding requests",
                                 registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batches = Gauge("conan_embedding_batches", "forward batches run by the dynamic batcher",
                             registry=self.registry)


def create_app(cfg: ServeConfig) -> FastAPI:
    """The embeddings app for cfg; the model loads when the app starts."""
    name = model_name(cfg.model_dir, cfg.model_name)
    api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    if cfg.api_key_env and not api_key:
        raise ValueError(f"api_key_env: environment variable {cfg.api_key_env} is not set")
    metrics = ServerMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from conan.encoder import Encoder

        encoder = Encoder(cfg.model_dir, device=cfg.device, batch_size=cfg.max_batch_size)
        app.state.encoder = encoder
        app.state.batcher = DynamicBatcher(encoder.encode, cfg.max_batch_size, cfg.max_wait_ms)
        app.state.batcher.start()
        metrics.batches.set_function(lambda: app.state.batcher.batches)
        app.state.created = int(time.time())
        yield
        await app.state.batcher.stop()

    app = FastAPI(title="Conan embeddings", version="1", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        metrics.requests.labels(str(err.status)).inc()
        return _error(err.status, err.message, err.param, err.code, err.kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        param = ".".join(str(x) for x in first.get("loc", ())[1:2]) or None
        metrics.requests.labels("400").inc()
        message = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                            for e in err.errors()[:5])
        return _error(400, message or "invalid request body", param)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        metrics.requests.labels("500").inc()
        return _error(500, f"internal error: {type(err).__name__}", kind="server_error")

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                metrics.requests.labels("401").inc()
                return _error(401, "missing or wrong API key (Authorization: Bearer <key>)",
                              code="invalid_api_key", kind="authentication_error")
        response = await call_next(request)
        response.headers["x-conan-replica"] = str(os.getpid())  # which process (Ray Serve replica) answered
        return response

    @app.get("/health")
    async def health():
        """Liveness and the served model."""
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    async def models(request: Request):
        """The one served model, OpenAI's list shape."""
        return {"object": "list", "data": [{"id": name, "object": "model", "created": request.app.state.created,
                                            "owned_by": "conan"}]}

    @app.get("/metrics")
    async def prometheus():
        """Prometheus exposition of the request counters and latency."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        """Embed `input` (a string or a list of strings), optionally truncated to `dimensions`."""
        start = time.perf_counter()
        encoder = request.app.state.encoder
        texts = _validate(body, encoder, name, cfg)
        limit = cfg.max_input_tokens or encoder.max_length
        # A token takes at least one character: far longer strings are refused before tokenizing them.
        too_long = [i for i, t in enumerate(texts) if len(t) > limit * MAX_CHARS_PER_TOKEN]
        counts = [] if too_long else encoder.token_counts(texts)
        too_long = too_long or [i for i, n in enumerate(counts) if n > limit]
        if too_long:
            raise APIError(400, f"input[{too_long[0]}] is longer than the model's limit of {limit} tokens", "input",
                           "context_length_exceeded")
        vectors = await request.app.state.batcher.embed(texts, body.dimensions)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
                 else v.tolist()} for i, v in enumerate(vectors)]
        metrics.requests.labels("200").inc()
        metrics.texts.inc(len(texts))
        metrics.tokens.inc(sum(counts))
        metrics.latency.observe(time.perf_counter() - start)
        # Serialised here: FastAPI's generic encoder walks every float of the response and costs more than the model.
        return Response(json.dumps({"object": "list", "data": data, "model": name,
                                    "usage": {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}}),
                        media_type="application/json")

    return app


def _validate(body: EmbeddingRequest, encoder, name: str, cfg: ServeConfig) -> list[str]:
    """The request's texts, or an APIError saying what is wrong."""
    if body.model != name:
        raise APIError(404, f"model {body.model!r} is not served here; this server serves {name!r}", "model",
                       "model_not_found")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise APIError(400, "input must not be an empty list", "input")
    if not all(isinstance(t, str) for t in texts):
        raise APIError(400, "token-id input is not supported; send strings", "input")
    if len(texts) > cfg.max_inputs_per_request:
        raise APIError(400, f"at most {cfg.max_inputs_per_request} inputs per request, got {len(texts)}", "input")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise APIError(400, f"input[{empty[0]}] is empty", "input")
    if body.dimensions is not None:
        try:
            encoder.check_dim(body.dimensions)
        except ValueError as err:
            raise APIError(400, str(err), "dimensions") from None
    return texts
