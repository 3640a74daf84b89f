"""Serving task-head bundles: vLLM's pooling endpoints (``/classify``, ``/score``) and an extractive-QA endpoint.

``serve`` on a head bundle (``graph_io.HeadIO``) runs a :class:`HeadEngine` (a
:class:`~exaone_deploy.runtime.head_backend.HeadModel` called from worker threads; there is no decoding, hence no
scheduler) behind the same app, Gate and error shape as the causal LM (:func:`.app.create_app` calls
:func:`add_pooling_routes`). Endpoints:

* ``POST /classify`` (also ``/v1/classify``), vLLM's ``ClassificationRequest``: ``{"model"?, "input": str |
  [str]}`` -> ``{"id", "object": "list", "created", "model", "data": [{"index", "object": "classify", "label",
  "probs", "num_classes"}], "usage"}``; ``probs`` in label-id order as vLLM (the probabilities of
  transformers' text-classification pipeline). A token-classification bundle answers ``data[i].entities``
  (transformers' ``aggregation_strategy="simple"`` groups, character spans) instead of ``label``/``probs``.
* ``POST /score`` (also ``/v1/score``), vLLM's ``ScoreRequest`` for a one-label classifier (a cross-encoder or
  reward model): ``{"text_1": str | [str], "text_2": str | [str]}`` (one against many, or pairwise) ->
  ``data[i] = {"index", "object": "score", "score"}``, the sigmoid of the logit of the pair (``HeadModel.score``).
* ``POST /v1/qa`` (ours): ``{"question", "context", "top_k"?, "max_seq_len"?, "doc_stride"?,
  "max_answer_len"?}`` -> ``data[i] = {"index", "object": "qa.answer", "answer", "score", "start", "end"}``, the
  ``top_k`` best spans, as ``exaone-deploy qa``.
* ``GET /v1/models`` reports ``task`` (and ``labels``); the text-generation endpoints answer 422.

Errors (OpenAI-shaped, as the LM's): 400 malformed body or values (strict types), an empty input or one longer
than the bundle's max_seq_len; 401 without the API key (``--api-key``; the root-level ``/classify`` and
``/score`` are checked too, which vLLM leaves open); 404 unknown model; 413 oversized body (the Gate); 422 an
endpoint this model's task cannot answer (``/v1/qa`` on a classifier, ``/score`` on a multi-label one).
Rejected: a second app for heads (its Gate, error handlers and metrics would be copies) and batching across
requests (one call runs one request's inputs batched; ONNX Runtime sessions run calls concurrently).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse

from ..errors import ExaoneDeployError
from ..runtime import heads as rh
from ..runtime.head_backend import HeadModel
from .metrics import Metrics
from .protocol import APIError, ModelCard, ModelList, _Strict, parse_request
from .serving import OpenAIServing

__all__ = ["HeadEngine", "add_pooling_routes", "ClassificationRequest", "ScoreRequest", "QARequest"]

MAX_INPUTS = 256  # inputs per request


class HeadEngine:
    """What the app needs of an engine (name, metrics, start/stop, stats), over a :class:`HeadModel`."""

    def __init__(self, model: HeadModel, *, model_name: str, max_batch: int = 8):
        self.model = model
        self.task = model.task
        self.model_name = model_name
        self.max_seq_len = model.max_seq_len
        self.max_batch = max_batch
        self.created = int(time.time())
        self.metrics = Metrics()
        self.running = 0
        self.draining = False  # SIGTERM (server/command.py): /health says 503, new requests are refused
        self.counters = {"requests": 0, "inputs": 0, "failed": 0}
        self._slots = asyncio.Semaphore(max_batch)
        self.metrics.bind(self.stats, max_batch)

    @classmethod
    def from_bundle(
        cls,
        bundle_dir: str | Path,
        *,
        max_batch: int = 8,
        model_name: str | None = None,
        device: str = "cpu",
        verify: bool = True,
    ) -> HeadEngine:
        model = HeadModel(bundle_dir, device=device, verify=verify, batch_size=max_batch)
        return cls(model, model_name=model_name or Path(model.manifest.root).name, max_batch=max_batch)

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def drain(self, grace: float) -> None:
        """Stop admitting; requests in flight (one batched forward pass each) finish well within ``grace``."""
        self.draining = True

    def stats(self) -> dict:
        return {
            "alive": True,
            "task": self.task,
            "queue_depth": 0,
            "running": self.running,
            "slots_used": self.running,
            "max_batch": self.max_batch,
            **self.counters,
        }

    async def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on a worker thread, at most ``max_batch`` at once; project errors -> 400."""
        if self.draining:
            raise APIError(503, "server shutting down", code="unavailable")
        async with self._slots:
            self.running += 1
            try:
                return await asyncio.to_thread(fn, *args, **kwargs)
            except ExaoneDeployError as e:
                self.counters["failed"] += 1
                raise APIError(400, str(e), code="invalid_value") from None
            finally:
                self.running -= 1


# ---- requests and responses --------------------------------------------------------------------------


class ClassificationRequest(_Strict):
    model: str | None = None
    input: str | list[str] = Field(min_length=1, max_length=MAX_INPUTS)


class ScoreRequest(_Strict):
    model: str | None = None
    text_1: str | list[str] = Field(min_length=1, max_length=MAX_INPUTS)
    text_2: str | list[str] = Field(min_length=1, max_length=MAX_INPUTS)


class QARequest(_Strict):
    model: str | None = None
    question: str = Field(min_length=1)
    context: str = Field(min_length=1)
    top_k: int = Field(1, ge=1, le=20)
    max_seq_len: int | None = Field(None, ge=2)
    doc_stride: int | None = Field(None, ge=0)
    max_answer_len: int = Field(15, ge=1)


class PoolingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class PoolingResponse(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[dict[str, Any]]
    usage: PoolingUsage


class HeadModelCard(ModelCard):
    task: str
    labels: list[str]


# ---- serving -----------------------------------------------------------------------------------------


class ServingPooling(OpenAIServing):
    """Request -> the head model's results -> a vLLM-shaped response."""

    engine: HeadEngine

    def need(self, tasks: tuple[str, ...], endpoint: str) -> None:
        if self.engine.task not in tasks:
            raise APIError(
                422,
                f"{endpoint} needs a {' or '.join(tasks)} model; `{self.engine.model_name}` is "
                f"a {self.engine.task} model",
                code="unsupported_task",
            )

    def respond(self, prefix: str, data: list[dict], prompt_tokens: int) -> JSONResponse:
        self.engine.counters["requests"] += 1
        self.engine.counters["inputs"] += len(data)
        body = PoolingResponse(
            id=f"{prefix}-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.engine.model_name,
            data=data,
            usage=PoolingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
        )
        return JSONResponse(body.model_dump())

    def _tokens(self, texts: list[str]) -> int:
        return sum(len(rh.encode_text(self.engine.model.tokenizer, t).ids) for t in texts)

    async def classify(self, body: ClassificationRequest) -> JSONResponse:
        self.check_model(body.model)
        self.need(("sequence-classification", "token-classification"), "/classify")
        texts = [body.input] if isinstance(body.input, str) else body.input
        results = await self.engine.run(self.engine.model.classify, texts)
        labels = self.engine.model.labels
        data = []
        for i, r in enumerate(results):
            if "entities" in r:
                data.append({"index": i, "object": "classify", "entities": r["entities"]})
            else:
                data.append(
                    {
                        "index": i,
                        "object": "classify",
                        "label": r["label"],
                        "probs": [r["probs"][label] for label in labels],
                        "num_classes": len(labels),
                    }
                )
        return self.respond("classify", data, self._tokens(texts))

    async def score(self, body: ScoreRequest) -> JSONResponse:
        self.check_model(body.model)
        self.need(("sequence-classification",), "/score")
        if self.engine.model.head.num_labels != 1:
            raise APIError(
                422,
                f"/score needs a one-label classifier (cross-encoder or reward model); "
                f"`{self.engine.model_name}` has {self.engine.model.head.num_labels} labels: use /classify",
                code="unsupported_task",
            )
        first = [body.text_1] if isinstance(body.text_1, str) else body.text_1
        second = [body.text_2] if isinstance(body.text_2, str) else body.text_2
        if len(first) == 1:
            first = first * len(second)
        if len(first) != len(second):
            raise APIError(
                400,
                f"text_1 has {len(first)} items and text_2 {len(second)}: give one text_1, or as many as text_2",
                param="text_1",
                code="invalid_value",
            )
        scores = await self.engine.run(self.engine.model.score, first, second)
        data = [{"index": i, "object": "score", "score": x} for i, x in enumerate(scores)]
        return self.respond("score", data, self._tokens([*first, *second]))

    async def qa(self, body: QARequest) -> JSONResponse:
        self.check_model(body.model)
        self.need(("question-answering",), "/v1/qa")
        answers = await self.engine.run(
            self.engine.model.answer,
            body.question,
            body.context,
            top_k=body.top_k,
            max_seq_len=body.max_seq_len,
            doc_stride=body.doc_stride,
            max_answer_len=body.max_answer_len,
        )
        data = [{"index": i, "object": "qa.answer", **a} for i, a in enumerate(answers)]
        return self.respond("qa", data, self._tokens([body.question, body.context]))


def add_pooling_routes(app: FastAPI, engine, *, api_key: str | None = None) -> None:
    """Register the head endpoints on ``app`` when ``engine`` is a :class:`HeadEngine` (else nothing). Called by
    ``create_app`` before the LM routes, so a head engine's ``/v1/models`` and its refusals of text generation
    take precedence."""
    if not isinstance(engine, HeadEngine):
        return
    from .app import Gate

    serving = ServingPooling(engine)
    gate = Gate(None, api_key=api_key, max_body_bytes=0, metrics=engine.metrics)

    def authorize(request: HTTPRequest) -> None:  # /v1/* is checked by the Gate already
        if api_key and not request.url.path.startswith("/v1/") and not gate._authorized(request.scope):
            raise APIError(
                401,
                "Missing or invalid API key: send `Authorization: Bearer <key>`.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def card() -> HeadModelCard:
        return HeadModelCard(
            id=engine.model_name,
            created=engine.created,
            max_model_len=engine.max_seq_len,
            task=engine.task,
            labels=list(engine.model.labels),
        )

    @app.get("/v1/models")
    async def models():
        return JSONResponse({**ModelList(data=[]).model_dump(), "data": [card().model_dump()]})

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        serving.check_model(model)
        return JSONResponse(card().model_dump())

    for path in ("/classify", "/v1/classify"):

        @app.post(path)
        async def classify(request: HTTPRequest):
            authorize(request)
            body, _ = parse_request(await request.body(), ClassificationRequest)
            return await serving.classify(body)

    for path in ("/score", "/v1/score"):

        @app.post(path)
        async def score(request: HTTPRequest):
            authorize(request)
            body, _ = parse_request(await request.body(), ScoreRequest)
            return await serving.score(body)

    @app.post("/v1/qa")
    async def qa(request: HTTPRequest):
        body, _ = parse_request(await request.body(), QARequest)
        return await serving.qa(body)

    for path in ("/v1/chat/completions", "/v1/completions"):

        @app.post(path)
        async def generation(request: HTTPRequest):
            raise APIError(
                422,
                f"`{engine.model_name}` is a {engine.task} model and generates no text; use "
                + ("/v1/qa" if engine.task == "question-answering" else "/classify"),
                code="unsupported_task",
            )
