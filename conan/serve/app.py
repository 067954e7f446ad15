"""The FastAPI app: OpenAI-compatible `POST /v1/embeddings`, `GET /v1/models`, `/health`, Prometheus `/metrics`.

Bad requests get a 4xx with OpenAI's error body ({"error": {"message", "type", "param", "code"}}); the
server never answers a client's mistake with a 5xx: a body over `max_request_bytes` is refused (413) from its
Content-Length or as soon as a chunked body passes the limit, before it is parsed; text that is not valid
Unicode (bytes that are not UTF-8, lone surrogates, NUL) is a 400; a full batch queue is a 429 with
Retry-After. The event loop only reads, parses and checks requests: counting tokens, embedding and writing
the response JSON run in the batcher's worker thread, a forward pass at a time. The encoder is loaded in the app's
lifespan, so the same app runs under uvicorn and as a Ray Serve ingress (one encoder per replica); shutting
down runs every request already queued first.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import re
import time
from contextlib import asynccontextmanager
from functools import partial
from typing import Literal

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from conan.config import ConfigError, ServeConfig
from conan.encoder import check_model_dir, model_name
from conan.serve.batcher import DynamicBatcher, QueueFull, TextTooLong


MAX_CHARS_PER_TOKEN = 64
# Lone surrogates (a JSON "\ud800" escape decodes to one; valid pairs decode to one astral character) cannot be
# encoded as UTF-8, so no tokenizer takes them; NUL ends strings in much of what embeddings are stored in.
INVALID_TEXT = re.compile("[\x00\ud800-\udfff]")


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request; token-id inputs are refused with a clear message."""

    model_config = ConfigDict(extra="allow")

    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: StrictStr
    dimensions: StrictInt | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: StrictStr | None = None


class APIError(Exception):
    """A client error with its HTTP status, OpenAI error fields and extra response headers."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers


def error_response(err: APIError) -> Response:
    """OpenAI's error body for err (ASCII JSON: whatever a message quotes, it always encodes)."""
    body = {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}}
    return Response(json.dumps(body), status_code=err.status, headers=err.headers, media_type="application/json")


def json_bytes(obj) -> bytes:
    """obj (dicts, lists, strings, numbers, float32 numpy vectors) as UTF-8 JSON; orjson writes float32 arrays ~25x
    faster than json, in their shortest float32 form."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


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
        self.queued = Gauge("conan_embedding_queued_texts", "texts waiting for a forward batch",
                            registry=self.registry)


class AuthAndReplicaHeader:
    """ASGI middleware: refuses /v1/ requests without the bearer token (constant-time compare), and names the
    answering process in x-conan-replica (which Ray Serve replica answered). Plain ASGI, not @app.middleware:
    that wraps every request in extra tasks and streams, a cost paid on each request."""

    def __init__(self, app, api_key: str | None, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.replica = str(os.getpid()).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_replica(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-conan-replica", self.replica)]
            await send(message)

        # The route's path: behind a proxy prefix (uvicorn --root-path, a Serve route_prefix) scope["path"] starts
        # with root_path, which routing strips; checking the raw path let /api/v1/… through without a key.
        root, path = scope.get("root_path", ""), scope["path"]
        if self.expected and (path[len(root):] if root and path.startswith(root) else path).startswith("/v1/"):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):  # bytes: any header, ASCII or not, compares
                self.metrics.requests.labels("401").inc()
                refusal = APIError(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                   code="invalid_api_key", kind="authentication_error")
                return await error_response(refusal)(scope, receive, send_with_replica)
        await self.app(scope, receive, send_with_replica)


def create_app(cfg: ServeConfig) -> FastAPI:
    """The embeddings app for cfg; the model loads when the app starts (its directory is checked now)."""
    name = model_name(check_model_dir(cfg.model_dir), cfg.model_name)
    api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    if cfg.api_key_env and not api_key:
        raise ConfigError(f"api_key_env: environment variable {cfg.api_key_env} is not set")
    if cfg.max_queued_texts < cfg.max_inputs_per_request:  # one line from `conan serve`, not a traceback
        raise ConfigError(f"max_queued_texts ({cfg.max_queued_texts}) must hold a request of "
                         f"max_inputs_per_request ({cfg.max_inputs_per_request}) texts")
    metrics = ServerMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from conan.encoder import Encoder

        # One call of encode_packed is one forward pass (the batcher plans them).
        encoder = Encoder(cfg.model_dir, device=cfg.device, keep_freed_heap_mb=cfg.keep_freed_heap_mb)
        # Refused above the model's context; texts between its training length and that are truncated when embedded.
        limit = cfg.max_input_tokens or encoder.model.config.max_position_embeddings
        app.state.encoder, app.state.token_limit = encoder, limit
        batcher = DynamicBatcher(encoder.token_counts, encoder.encode_packed, limit, encoder.max_length,
                                 cfg.max_batch_size, cfg.forward_tokens, cfg.max_wait_ms, cfg.max_queued_texts)
        app.state.batcher = batcher
        batcher.start()
        metrics.batches.set_function(lambda: batcher.batches)
        metrics.queued.set_function(lambda: batcher.queued_texts)
        app.state.created = int(time.time())
        yield
        await batcher.stop()

    app = FastAPI(title="Conan embeddings", version="1", lifespan=lifespan)
    app.add_middleware(AuthAndReplicaHeader, api_key=api_key, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        metrics.requests.labels(str(err.status)).inc()
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def routing_error(request: Request, err: StarletteHTTPException):
        """No such route (404) or method (405): OpenAI's error body too, counted like any answer."""
        metrics.requests.labels(str(err.status_code)).inc()
        message = f"{request.method} {request.url.path}: {err.detail}"
        return error_response(APIError(err.status_code, message, headers=dict(err.headers or {})))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        metrics.requests.labels("500").inc()
        return error_response(APIError(500, f"internal error: {type(err).__name__}", kind="server_error"))

    @app.get("/health")
    async def health():
        """Liveness and the served model."""
        return {"status": "ok", "model": name}

    def served_model(request: Request) -> dict:
        """OpenAI's model object of the served model."""
        return {"id": name, "object": "model", "created": request.app.state.created, "owned_by": "conan"}

    @app.get("/v1/models")
    async def models(request: Request):
        """The one served model, OpenAI's list shape."""
        return {"object": "list", "data": [served_model(request)]}

    @app.get("/v1/models/{model}")
    async def model(request: Request, model: str):
        """The served model by its id, OpenAI's retrieve shape; any other id is a 404."""
        if model != name:
            raise APIError(404, f"model {model!r} is not served here; this server serves {name!r}", "model",
                           "model_not_found")
        return served_model(request)

    @app.get("/metrics")
    async def prometheus():
        """Prometheus exposition of the request counters and latency."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # The body is read by hand (byte limit, strict UTF-8) but documented as usual.
    request_schema = {"required": True,
                      "content": {"application/json": {"schema": EmbeddingRequest.model_json_schema()}}}

    @app.post("/v1/embeddings", openapi_extra={"requestBody": request_schema})
    async def embeddings(request: Request):
        """Embed `input` (a string or a list of strings), optionally truncated to `dimensions`."""
        start = time.perf_counter()
        body = parse_request(await read_body(request, cfg.max_request_bytes))
        encoder = request.app.state.encoder
        texts = _validate(body, encoder, name, cfg, request.app.state.token_limit)
        try:
            response_body, tokens = await request.app.state.batcher.submit(
                texts, body.dimensions, partial(embeddings_response, name, body.encoding_format))
        except QueueFull as err:
            raise APIError(429, f"the server is busy: {err}", code="rate_limit_exceeded", kind="rate_limit_error",
                           headers={"Retry-After": str(err.retry_after_s)}) from None
        except TextTooLong as err:
            raise _too_long(err.index, request.app.state.token_limit) from None
        metrics.requests.labels("200").inc()
        metrics.texts.inc(len(texts))
        metrics.tokens.inc(tokens)
        metrics.latency.observe(time.perf_counter() - start)
        return Response(response_body, media_type="application/json")

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) once it is over limit bytes: by its Content-Length before reading a byte
    (a client sending `Expect: 100-continue` then sends nothing), else as soon as the chunks read pass it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes is over the limit of {limit} bytes",
                       code="request_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # the rest is never read into memory
                raise APIError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client closed the connection before the body ended") from None
    return b"".join(chunks)


def parse_request(raw: bytes) -> EmbeddingRequest:
    """The request of a JSON body, or a 400 saying what is wrong with it (UTF-8, JSON, or the fields)."""
    try:
        text = raw.decode("utf-8")  # strict: overlong forms, encoded surrogates and stray bytes are refused
    except UnicodeDecodeError as err:
        raise APIError(400, f"request body is not valid UTF-8 (byte {err.start}: {err.reason})",
                       code="invalid_unicode") from None
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError) as err:  # RecursionError: nesting deeper than the parser goes
        raise APIError(400, f"request body is not valid JSON: {err}") from None
    try:
        return EmbeddingRequest.model_validate(payload)
    except ValidationError as err:
        errors = err.errors()
        param = ".".join(str(x) for x in errors[0]["loc"][:1]) or None
        message = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5])
        raise APIError(400, message, param) from None


def _validate(body: EmbeddingRequest, encoder, name: str, cfg: ServeConfig, token_limit: int) -> list[str]:
    """The request's texts, or an APIError saying what is wrong."""
    if INVALID_TEXT.search(body.model):
        raise APIError(400, "model is not valid Unicode text (a lone surrogate or NUL)", "model", "invalid_unicode")
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
    for i, text in enumerate(texts):
        bad = INVALID_TEXT.search(text)
        if bad:
            raise APIError(400, f"input[{i}] is not valid Unicode text: U+{ord(bad.group()):04X} at character "
                                f"{bad.start()} (a lone surrogate or NUL)", "input", "invalid_unicode")
        if not text.strip():
            raise APIError(400, f"input[{i}] is empty", "input")
        # A token takes at least one character: far longer strings are refused before anything tokenizes them.
        if len(text) > token_limit * MAX_CHARS_PER_TOKEN:
            raise _too_long(i, token_limit)
    if body.dimensions is not None:
        try:
            encoder.check_dim(body.dimensions)
        except ValueError as err:
            raise APIError(400, str(err), "dimensions") from None
    return texts


def _too_long(index: int, token_limit: int) -> APIError:
    return APIError(400, f"input[{index}] is longer than the model's limit of {token_limit} tokens", "input",
                    "context_length_exceeded")


def embeddings_response(name: str, encoding_format: str, vectors: np.ndarray, counts: list[int]) -> tuple[bytes, int]:
    """OpenAI's embeddings response body for vectors (in the batcher's thread), and its prompt tokens."""
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if encoding_format == "base64" else v}
            for i, v in enumerate(vectors)]
    tokens = sum(counts)
    return json_bytes({"object": "list", "data": data, "model": name,
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}), tokens
