"""The HTTP application: ``create_app(engine, ...)`` (vLLM's ``api_server`` / router part).

Routes are thin: parse the body into a :mod:`.protocol` request model, hand it to :mod:`.serving`, return what
that answers. Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (server-sent events when
``stream``), ``GET /v1/models[/{id}]``, ``GET /health`` (200 while the scheduler runs and the server is not
shutting down, else 503, with its stats) and ``GET /metrics`` (Prometheus).

Every error is OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``): 400 for malformed JSON,
wrong types, out-of-range values and prompts that do not fit the context, 401 without the API key (on
``/v1/*`` only), 404 for an unknown model or path, 413 for an oversized body, 429 when the queue is full, 500
for a failed generation or a bug (logged with its traceback), 503 while the server shuts down. Every 4xx is
logged as one line (INFO: ``-v``), never with a traceback; a body that does not arrive within the body timeout is
a 408. Sampling defaults follow the OpenAI API
(temperature 1, top_p 1), overridden by the bundle's ``generation_config.json`` (as vLLM does).

The :class:`Gate` is pure ASGI middleware (rejected: FastAPI dependencies, which run after the body has been
read, so they cannot bound it). The scheduler thread starts and stops with the app's lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from .engine import AsyncEngine
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .pooling import add_pooling_routes
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    HealthResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    parse_request,
)
from .serving import ServingChat, ServingCompletion, ServingTokenization

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_BODY_TIMEOUT", "DEFAULT_MAX_BODY_BYTES", "Gate", "create_app"]

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
DEFAULT_BODY_TIMEOUT = 30.0  # seconds for a whole request body to arrive


def error_response(e: APIError) -> JSONResponse:
    """The response of an error; a client error (4xx) is logged here as one line (its text clipped and escaped:
    it may quote what the client sent)."""
    if e.status < 500:
        text = e.message if len(e.message) <= 300 else e.message[:300] + "..."
        log.info("client error %d %s: %s", e.status, e.code or e.type, text.encode("unicode_escape").decode())
    return JSONResponse(e.body().model_dump(), status_code=e.status, headers=e.headers)


class Gate:
    """Pure ASGI middleware: checks the API key on /v1/*, bounds request bodies in size and in time (a client
    that sends its body slower than ``body_timeout`` seconds in all gets a 408 and is dropped), counts requests by
    status."""

    def __init__(
        self,
        app,
        *,
        api_key: str | None,
        max_body_bytes: int,
        metrics: Metrics,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
    ):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.body_timeout = body_timeout

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 0}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.api_key and scope["path"].startswith("/v1/") and not self._authorized(scope):
                err = APIError(
                    401,
                    "Missing or invalid API key: send `Authorization: Bearer <key>`.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await error_response(err)(scope, receive, send_counted)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                receive = await self._buffer_body(scope, receive, send_counted)
                if receive is None:
                    return
            await self.app(scope, receive, send_counted)
        except Exception:  # answered 500 by the outermost error handler
            status["code"] = status["code"] or 500
            raise
        finally:
            self.metrics.http_requests.labels(self.metrics.endpoint(scope["path"]), str(status["code"])).inc()

    async def _buffer_body(self, scope, receive, send):
        """Read the body (at most max_body_bytes) and return a receive that replays it, or None after a 413."""

        def too_large(*args):
            return error_response(
                APIError(413, f"The request body exceeds {self.max_body_bytes} bytes.", code="request_too_large")
            )(*args)

        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_body_bytes:
                    await too_large(scope, receive, send)
                    return None
        chunks, size = [], 0
        deadline = time.monotonic() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                err = APIError(
                    408,
                    f"The request body did not arrive within {self.body_timeout:g} s.",
                    code="request_timeout",
                    headers={"Connection": "close"},
                )
                await error_response(err)(scope, receive, send)
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await too_large(scope, receive, send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


def create_app(
    engine: AsyncEngine,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
) -> FastAPI:
    """The FastAPI app serving ``engine``, behind the :class:`Gate`."""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="exaone-deploy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.add_middleware(
        Gate, api_key=api_key, max_body_bytes=max_body_bytes, metrics=engine.metrics, body_timeout=body_timeout
    )
    add_pooling_routes(app, engine, api_key=api_key)  # task-head bundles (before the LM routes: they take precedence)
    chat, completion = ServingChat(engine), ServingCompletion(engine)

    @app.exception_handler(APIError)
    async def _api_error(_request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e: StarletteHTTPException):
        return error_response(
            APIError(
                e.status_code,
                str(e.detail),
                type="invalid_request_error",
                code="not_found" if e.status_code == 404 else None,
            )
        )

    @app.exception_handler(Exception)
    async def _internal_error(_request, e: Exception):
        log.exception("unhandled error")
        return error_response(APIError(500, f"internal server error: {type(e).__name__}: {e}"))

    def model_card() -> ModelCard:
        return ModelCard(id=engine.model_name, created=engine.created, max_model_len=engine.max_seq_len)

    @app.get("/v1/models")
    async def models():
        return JSONResponse(ModelList(data=[model_card()]).model_dump())

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        chat.check_model(model)
        return JSONResponse(model_card().model_dump())

    @app.get("/health")
    async def health():
        stats = engine.stats()
        ok = stats["alive"] and not engine.draining  # draining (SIGTERM): load balancers should stop sending
        body = HealthResponse(status="ok" if ok else "unavailable", model=engine.model_name, **stats)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body, raw = parse_request(await request.body(), ChatCompletionRequest)
        return await chat.create(body, raw, request)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body, raw = parse_request(await request.body(), CompletionRequest)
        return await completion.create(body, raw, request)

    tokenization = ServingTokenization(engine)

    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest):
        body, raw = parse_request(await request.body(), TokenizeRequest)
        return JSONResponse((await tokenization.tokenize(body, raw)).model_dump())

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest):
        body, _ = parse_request(await request.body(), DetokenizeRequest)
        return JSONResponse((await tokenization.detokenize(body)).model_dump())

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return JSONResponse(tokenization.info().model_dump())

    return app
