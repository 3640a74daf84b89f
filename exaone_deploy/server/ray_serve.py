"""Ray Serve: N replicas of the engine behind Serve's HTTP proxy, with the OpenAI-compatible routes of :mod:`.app`.

Two deployments:

- :class:`EngineReplica` (N replicas, fixed or autoscaled): each loads the bundle into its own
  :class:`~.engine.AsyncEngine` (its scheduler, its cache slots) and runs the very app of a single server,
  ``create_app(engine, api_key, max_body_bytes)``, in process: :func:`call_asgi` feeds it one forwarded request
  and yields the response (start, then body chunks, so server-sent events stream through). Validation, errors,
  the API key and per-replica metrics are therefore those of ``exaone-deploy serve`` exactly.
- :class:`Ingress` (one replica, behind Serve's HTTP proxy): the :class:`~.app.Gate` (API key, body limit) in
  front of a catch-all route that forwards each request to an engine replica through a deployment handle,
  with an *affinity key* (:class:`AffinityIndex`: which conversation the request continues), and answers ``/health`` and
  ``/metrics`` for the whole application from what every replica reports (:class:`Board`).

Routing (:class:`PrefixAffinityRouter`, the engine deployment's Serve request router): requests with the same
affinity key go to the same replica (rendezvous hashing over the live replicas: a replica's death moves only
its own keys), so a conversation's next turn meets its cached prefix (``runtime/scheduler.py``); if that
replica is at ``max_ongoing_requests``, the least loaded other replica takes it. Requests without a key go to
the least loaded of all.

Faults: when a replica dies, Serve restarts it (and ``check_health`` fails a replica whose scheduler thread
died, so Serve replaces it too). The ingress retries a request on another replica while nothing of its
response has reached the client (a non-streamed response is buffered whole, so it is always retried); a
stream cut after its first bytes ends with an OpenAI-shaped error event, code ``replica_unavailable``; when no
replica answers after the retries, the answer is HTTP 503 with ``Retry-After``. Nothing is lost silently.

Engine bundles (TensorRT) get one GPU per replica (``ray_actor_options={"num_gpus": 1}``); ONNX Runtime
replicas get ``threads`` CPUs each (``EXAONE_DEPLOY_THREADS``).

Rejected: the engine replicas as Serve's HTTP ingress with a router keyed on a session header (the proxy
streams the body to the replica, so a router cannot see the conversation; clients would have to send a
session id); Serve's model multiplexing as affinity (its ids are models to load, evicted by a per-replica LRU
of loaded models, not conversations); ``/health`` by sending probes through the handle (a handle cannot
address a given replica, so some replicas might never be asked).

Usage: ``serve run exaone_deploy.server.ray_serve:build_app bundle=B replicas=2`` (see :func:`build_app` and
docs/scale.md for a config file with autoscaling), or ``exaone-deploy serve B --replicas 2`` (:func:`serve_forever`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..errors import ExaoneDeployError
from .app import DEFAULT_MAX_BODY_BYTES, Gate, create_app, error_response
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .protocol import APIError

log = logging.getLogger(__name__)

__all__ = [
    "EngineReplica",
    "Ingress",
    "PrefixAffinityRouter",
    "RayServeError",
    "AffinityIndex",
    "build_app",
    "call_asgi",
    "serve_cli",
    "serve_forever",
]

NAMESPACE = "exaone-deploy"
REPORT_EVERY_S = 0.5  # replicas report their stats to the board this often
STALE_AFTER_S = 3.0  # a replica silent this long is gone from /health and /metrics
RETRIES = 3  # attempts of a request whose replica died before any of its response was sent


class RayServeError(ExaoneDeployError, RuntimeError):
    """Bad Ray Serve arguments (``build_app``) or a cluster that cannot be reached."""


# ---- affinity ---------------------------------------------------------------------------------------


class AffinityIndex:
    """Names each request's conversation (its *affinity key*) so that its turns meet their cached prefix.

    A prompt is cut into units (chat: one per message; completions: 64 characters of a string prompt, 16 ids
    of a token-id prompt; a trailing partial unit is not counted) and hashed cumulatively. Each request records
    its last unit prefix as an *end* under its key. The key of a request is the key of the longest end among
    its own unit prefixes: turn k+1 starts with turn k's prompt, so it finds turn k's end; a new conversation
    that shares only a system prompt finds no end (no earlier prompt ended there) and gets a new key, the hash
    of its prompt. An end recorded under two keys names no conversation and is ignored. The OpenAI ``user``
    field, when given, is the key. Bounded: the ``capacity`` most recent ends. (Ray Serve LLM's
    PrefixCacheAffinityRouter keeps a character prefix tree per replica instead; keys keep the router a pure
    function of key and live replicas.)"""

    SHARED = ""

    def __init__(self, capacity: int = 200_000):
        self.capacity = capacity
        self.ends: OrderedDict[str, str] = OrderedDict()  # unit-prefix hash -> key (or SHARED)

    @staticmethod
    def units(path: str, data: dict) -> list[str] | None:
        if path.endswith("/chat/completions") and isinstance(data.get("messages"), list):
            return [json.dumps(m, sort_keys=True) for m in data["messages"]]
        p = data.get("prompt")
        if isinstance(p, str):
            return [p[i : i + 64] for i in range(0, len(p) - 63, 64)]
        if isinstance(p, list) and all(isinstance(t, int) for t in p):
            return [json.dumps(p[i : i + 16]) for i in range(0, len(p) - 15, 16)]
        return None

    def key(self, path: str, body: bytes) -> str | None:
        """The affinity key of a request body (None: not a JSON object with messages or a prompt of a unit)."""
        try:
            data = json.loads(body or b"null")
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        if isinstance(data.get("user"), str) and data["user"]:
            return "user:" + data["user"]
        units = self.units(path, data)
        if not units:
            return None
        chain, h = [], hashlib.sha1()
        for u in units:
            h.update(u.encode() + b"\0")
            chain.append(h.hexdigest())
        key = next((k for k in map(self.ends.get, reversed(chain)) if k), None) or chain[-1]
        prev = self.ends.pop(chain[-1], None)
        self.ends[chain[-1]] = key if prev in (None, key) else self.SHARED
        while len(self.ends) > self.capacity:
            self.ends.popitem(last=False)
        return key


class PrefixAffinityRouter(RequestRouter):
    """Serve request router: the replica that rendezvous-hashes highest with the request's ``affinity`` keyword
    first, then (when it is full) the least loaded of the others; without a key, the least loaded of all."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        key = pending_request.kwargs.get("affinity") if pending_request is not None else None
        if not key or len(candidate_replicas) < 2:
            return [list(candidate_replicas)]

        def score(r: RunningReplica) -> bytes:
            return hashlib.sha1(f"{key}:{r.replica_id.unique_id}".encode()).digest()

        ranked = sorted(candidate_replicas, key=score, reverse=True)
        return [ranked[:1], ranked[1:]]


# ---- the replicas' reports ------------------------------------------------------------------------


@ray.remote(num_cpus=0)
class Board:
    """Latest stats and Prometheus exposition of each engine replica (a named actor per application)."""

    def __init__(self):
        self.entries: dict[str, tuple[float, dict, str]] = {}

    def report(self, replica: str, stats: dict, metrics: str) -> None:
        self.entries[replica] = (time.monotonic(), stats, metrics)

    def snapshot(self) -> dict[str, tuple[dict, str]]:
        now = time.monotonic()
        self.entries = {k: v for k, v in self.entries.items() if now - v[0] < STALE_AFTER_S}
        return {k: (stats, metrics) for k, (_, stats, metrics) in self.entries.items()}


def _board(app_name: str):
    """The application's board (detached: it outlives whichever replica created it; gone with the cluster)."""
    return Board.options(
        name=f"board:{app_name}", namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()


# ---- one request through an in-process ASGI app ----------------------------------------------------


async def call_asgi(
    app, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> AsyncIterator[Any]:
    """Run one HTTP request through ``app`` in this process. Yields ``(status, headers)`` once, then the body
    chunks (bytes) as the app sends them. Closing the iterator early tells the app the client disconnected."""
    out: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
    }
    task = asyncio.ensure_future(app(scope, receive, out.put))
    task.add_done_callback(lambda _: out.put_nowait(None))
    try:
        while (message := await out.get()) is not None:
            if message["type"] == "http.response.start":
                yield (
                    message["status"],
                    [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", ())],
                )
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
    finally:
        gone.set()
        try:
            await asyncio.wait_for(task, 10)
        except BaseException:  # noqa: BLE001 - the response is complete (or abandoned); errors were logged
            log.debug("the app ended with an error after its response", exc_info=True)


# ---- deployments --------------------------------------------------------------------------------------


class EngineReplica:
    """One engine: bundle, scheduler, slots, and the single-server app over them."""

    def __init__(
        self, bundle: str, engine_options: dict, api_key: str | None, max_body_bytes: int, threads: int | None
    ):
        from .engine import AsyncEngine

        if threads:
            os.environ["EXAONE_DEPLOY_THREADS"] = str(threads)
        self.engine = AsyncEngine.from_bundle(bundle, **engine_options)
        self.app = create_app(self.engine, api_key=api_key, max_body_bytes=max_body_bytes)
        self.engine.start()  # (the app's lifespan is not run: requests enter through call_asgi)
        ctx = serve.get_replica_context()
        self.replica, self.app_name = ctx.replica_id.unique_id, ctx.app_name
        self._stop = threading.Event()
        threading.Thread(target=self._report_loop, name="exaone-report", daemon=True).start()

    async def handle(
        self, method: str, path: str, query: bytes, headers: list, body: bytes, affinity: str | None = None
    ) -> AsyncIterator[Any]:
        """One forwarded HTTP request (``affinity`` is read by the router only)."""
        async for item in call_asgi(self.app, method, path, query, headers, body):
            yield item

    def check_health(self) -> None:
        if not self.engine.scheduler.alive:
            raise RuntimeError(f"the scheduler is not running: {self.engine.scheduler.error}")

    def _report_loop(self) -> None:
        board = None
        while not self._stop.wait(REPORT_EVERY_S):
            try:
                board = board or _board(self.app_name)
                stats = dict(self.engine.stats(), model=self.engine.model_name, pid=os.getpid())
                ray.get(board.report.remote(self.replica, stats, self.engine.metrics.exposition().decode()), timeout=5)
            except Exception:  # noqa: BLE001 - the board is recreated by whoever comes next
                log.debug("could not report to the board", exc_info=True)
                board = None

    def __del__(self):
        self._stop.set()
        self.engine.scheduler.stop(10)


def _merge_expositions(per_replica: dict[str, str]) -> bytes:
    """Prometheus text of every replica's metrics, each sample labelled ``replica``."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, list] = {}
    heads: dict[str, str] = {}
    for replica, text in sorted(per_replica.items()):
        for fam in text_string_to_metric_families(text):
            heads[fam.name] = f"# HELP {fam.name} {fam.documentation}\n# TYPE {fam.name} {fam.type}\n"
            for s in fam.samples:
                labels = dict(s.labels, replica=replica)
                body = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
                families.setdefault(fam.name, []).append(f"{s.name}{{{body}}} {s.value!r}\n")
    return "".join(heads[name] + "".join(lines) for name, lines in families.items()).encode()


_SUMMED = (
    "slots_total",
    "slots_used",
    "queue_depth",
    "queue_max",
    "running",
    "decoding",
    "cache_tokens",
    "prefix_cached_slots",
    "prefix_cached_tokens",
    "prefix_lookups",
    "prefix_hits",
    "prefix_tokens_reused",
    "steps",
    "finished",
    "cancelled",
    "failed",
)


class Ingress:
    """Forwards /v1/* to engine replicas (affinity-routed, retried while nothing was sent) and answers /health
    and /metrics for all replicas."""

    def __init__(self, engine, api_key: str | None, max_body_bytes: int):
        self.engine = engine
        self.api_key, self.max_body_bytes = api_key, max_body_bytes
        self.board = _board(serve.get_replica_context().app_name)
        self.affinity = AffinityIndex()

    def __serve_build_asgi_app__(self):
        from fastapi import FastAPI

        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

        @app.get("/health")
        async def health():
            return await self.health()

        @app.get("/metrics")
        async def metrics():
            snap = await self.board.snapshot.remote()
            return Response(_merge_expositions({r: m for r, (_, m) in snap.items()}), media_type=CONTENT_TYPE_LATEST)

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
        async def forward(request: HTTPRequest):
            return await self.forward(request)

        # the gate only counts requests at the ingress (the replicas' metrics are what /metrics shows)
        return Gate(app, api_key=self.api_key, max_body_bytes=self.max_body_bytes, metrics=Metrics())

    async def health(self) -> JSONResponse:
        snap = await self.board.snapshot.remote()
        stats = {r: s for r, (s, _) in snap.items()}
        alive = [s for s in stats.values() if s.get("alive")]
        body = {
            "status": "ok" if alive else "unavailable",
            "replicas": len(stats),
            "replicas_alive": len(alive),
            "model": next((s["model"] for s in stats.values()), None),
            "alive": bool(alive),
            **{k: sum(int(s.get(k, 0)) for s in stats.values()) for k in _SUMMED},
            "per_replica": stats,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    async def forward(self, request: HTTPRequest) -> Response:
        body = await request.body()
        key = self.affinity.key(request.url.path, body) if request.method == "POST" else None
        args = (request.method, request.url.path, request.url.query.encode(), request.headers.raw, body)
        for attempt in range(RETRIES):
            gen = self.engine.options(stream=True).handle.remote(*args, affinity=key)
            status, headers = 500, []
            try:
                status, headers = await gen.__anext__()
                if not dict(headers).get("content-type", "").startswith("text/event-stream"):
                    chunks = [c async for c in gen]  # buffered whole: retried if the replica dies meanwhile
                    return Response(b"".join(chunks), status_code=status, headers=_plain(headers))
                first = await gen.__anext__()
            except StopAsyncIteration:
                return Response(b"", status_code=status, headers=_plain(headers))
            except ray.exceptions.RayError as e:
                log.warning("replica failed on attempt %d of %s %s: %s", attempt + 1, *args[:2], e)
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            return StreamingResponse(_rest(first, gen), status_code=status, headers=_plain(headers))
        return error_response(
            APIError(
                503,
                "No model replica could take the request (a replica restarted); retry shortly.",
                code="replica_unavailable",
                headers={"Retry-After": "1"},
            )
        )


def _plain(headers: list[tuple[str, str]]) -> dict[str, str]:
    return {k: v for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")}


async def _rest(first: bytes, gen) -> AsyncIterator[bytes]:
    yield first
    try:
        async for chunk in gen:
            yield chunk
    except ray.exceptions.RayError as e:
        log.warning("a replica died mid-stream: %s", e)
        err = APIError(
            503, "The model replica serving this stream stopped; retry the request.", code="replica_unavailable"
        )
        yield f"data: {json.dumps(err.body().model_dump())}\n\n".encode()


# ---- the application ---------------------------------------------------------------------------------


def _options(args: dict[str, Any]) -> dict[str, Any]:
    """Typed options from ``build_app``'s string arguments (``serve run ... key=value``)."""
    known = {
        "bundle": str,
        "replicas": int,
        "min_replicas": int,
        "max_replicas": int,
        "threads": int,
        "max_batch": int,
        "context": int,
        "max_queue": int,
        "prefill_chunk": int,
        "served_model_name": str,
        "device": str,
        "api_key": str,
        "max_body_bytes": int,
        "prefix_cache": str,
        "verify": str,
    }
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise RayServeError(f"build_app: unknown argument(s) {', '.join(unknown)} (known: {', '.join(known)})")
    if "bundle" not in args:
        raise RayServeError("build_app: argument 'bundle' (the bundle directory) is required")
    out = {}
    for k, v in args.items():
        if v is None:
            continue
        try:
            out[k] = known[k](v)
        except (TypeError, ValueError):
            raise RayServeError(f"build_app: argument {k!r}: expected {known[k].__name__}, got {v!r}") from None
    for k in ("prefix_cache", "verify"):
        if k in out:
            out[k] = out[k].lower() not in ("0", "false", "no", "off")
    return out


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application: ``bundle`` (required), ``replicas`` (default 1) or ``min_replicas`` /
    ``max_replicas`` (autoscaling on ongoing requests per replica), ``threads`` (CPU threads per ONNX Runtime
    replica, default 1), engine options as the ``serve`` command's (``max_batch``, ``context``, ``max_queue``,
    ``prefill_chunk``, ``served_model_name``, ``device``, ``prefix_cache``, ``verify``) and ``api_key``,
    ``max_body_bytes``."""
    from ..bundle import load_manifest

    o = _options(args)
    bundle = str(Path(o["bundle"]).absolute())
    manifest = load_manifest(bundle, verify=o.get("verify", True))
    max_batch = o.get("max_batch", 8)
    threads = o.get("threads", 1)
    engine_options = {
        "max_batch": max_batch,
        "context": o.get("context"),
        "max_queue": o.get("max_queue", 256),
        "prefill_chunk": o.get("prefill_chunk", 512),
        "device": o.get("device", "cpu"),
        "model_name": o.get("served_model_name") or Path(bundle).name,
        "verify": False,
        "prefix_cache": o.get("prefix_cache", True),
    }  # verified once, here
    gpu = manifest.target == "tensorrt" or engine_options["device"] == "cuda"
    actor = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": threads}
    if "min_replicas" in o or "max_replicas" in o:
        lo, hi = o.get("min_replicas", 1), o.get("max_replicas", max(1, o.get("min_replicas", 1)))
        if not 0 <= lo <= hi or hi < 1:
            raise RayServeError(f"build_app: need 0 <= min_replicas <= max_replicas, max_replicas >= 1; got {lo}, {hi}")
        scaling: dict[str, Any] = {
            "autoscaling_config": {"min_replicas": lo, "max_replicas": hi, "target_ongoing_requests": max_batch}
        }
    else:
        replicas = o.get("replicas", 1)
        if replicas < 1:
            raise RayServeError(f"build_app: replicas must be >= 1, got {replicas}")
        scaling = {"num_replicas": replicas}
    from ray.serve.config import RequestRouterConfig

    engine = serve.deployment(
        EngineReplica,
        name="ExaoneEngine",
        ray_actor_options=actor,
        max_ongoing_requests=2 * max_batch,
        health_check_period_s=2,
        request_router_config=RequestRouterConfig(request_router_class=f"{__name__}:PrefixAffinityRouter"),
        **scaling,
    )
    ingress = serve.deployment(
        serve.ingress()(Ingress), name="ExaoneIngress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000
    )
    api_key = o.get("api_key") or None
    max_body = o.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES)
    return ingress.bind(
        engine.bind(bundle, engine_options, api_key, max_body, None if gpu else threads), api_key, max_body
    )


def start_local_ray(address: str | None, num_cpus: int) -> None:
    """Connect to ``address`` (``auto`` or ``ray://`` or ``host:port``), or start a one-node cluster on
    127.0.0.1 with ``num_cpus`` logical CPUs."""
    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        else:
            ray.init(
                address="local",
                _node_ip_address="127.0.0.1",
                num_cpus=num_cpus,
                include_dashboard=False,
                namespace=NAMESPACE,
                log_to_driver=False,
                configure_logging=False,
            )
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayServeError(f"cannot start or reach the Ray cluster {address or '(local)'}: {e}") from e


def serve_forever(
    args: dict[str, Any],
    *,
    host: str,
    port: int,
    ray_address: str | None,
    on_ready=None,
    stop: threading.Event | None = None,
) -> None:
    """``exaone-deploy serve B --replicas N``: start (or join) Ray, run :func:`build_app` behind Serve's proxy
    on host:port, call ``on_ready(url)`` once it answers, block until ``stop`` is set (or SIGINT/SIGTERM),
    then shut Serve down (and the cluster, if it was started here)."""
    import signal

    o = _options(args)
    per = o.get("threads", 1)
    count = o.get("max_replicas", o.get("replicas", 1))
    start_local_ray(ray_address, num_cpus=max(os.cpu_count() or 1, count * per + 1))
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port}, detached=False)
        serve.run(build_app(args), name="exaone", route_prefix="/", blocking=False)
        if on_ready:
            on_ready(f"http://{host}:{port}")
        stop.wait()
    finally:
        serve.shutdown()
        if not ray_address:
            ray.shutdown()


def serve_cli(bundle_dir, replicas: int, ray_address: str | None, *, host: str, port: int, **options) -> None:
    """The ``serve`` command's ``--replicas`` path: prints the line ``serving NAME on http://HOST:PORT/v1 (...)``
    (what :class:`~.launcher.ServerProcess` waits for) once the application answers; errors are one line."""
    import socket
    import sys

    import click

    from ..bundle import BundleError

    if port == 0:  # Serve's proxy binds by itself: find a free port first
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
    threads = int(os.environ.get("EXAONE_DEPLOY_THREADS") or 0) or max(1, (os.cpu_count() or 1) // replicas)
    args = {"bundle": str(bundle_dir), "replicas": replicas, "threads": threads, **options}
    name = options.get("served_model_name") or Path(bundle_dir).name

    def ready(url: str) -> None:
        click.echo(
            f"serving {name} on {url}/v1 (ray serve: {replicas} replicas of max batch "
            f"{options.get('max_batch')}, {threads} threads each)"
        )
        sys.stdout.flush()

    try:
        serve_forever(args, host=host, port=port, ray_address=ray_address, on_ready=ready)
    except (BundleError, RayServeError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
