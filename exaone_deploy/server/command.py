"""The ``serve`` command: ``exaone-deploy serve BUNDLE_DIR`` (or ``python -m exaone_deploy.server BUNDLE_DIR``).

Loads the bundle into an :class:`~.engine.AsyncEngine`, binds the socket itself (so ``--port 0`` can print the
port it got), prints one line ``serving NAME on http://HOST:PORT/v1 (...)`` once it listens (the line
:class:`~.launcher.ServerProcess` waits for), and runs uvicorn until SIGINT/SIGTERM. Load and bind failures, a
non-ASCII ``--api-key`` and a KV cache larger than the available memory are one-line click errors.

Slow clients are dropped, not held: HTTP/1.1 over h11 (:class:`HeaderTimeoutH11`: request headers must be complete
within ``--header-timeout`` s of the connection or of the previous response, which uvicorn does not bound;
``h11_max_incomplete_event_size`` bounds their size), idle keep-alive connections close after
``--keep-alive-timeout`` s, and a body must arrive within ``--body-timeout`` s (the app's Gate answers 408).

SIGTERM / SIGINT (:class:`DrainingServer`): the engine stops admitting at once (new requests get 503; uvicorn also
stops accepting connections), open streams run on and those still open when ``--shutdown-grace`` s are nearly
over end with an error event and ``[DONE]``; the process then exits. Rejected: uvicorn's own
``timeout_graceful_shutdown`` alone (it cancels the response tasks: a stream is cut without a terminal event).
"""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

import click
import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY_BYTES, create_app
from .engine import AsyncEngine

log = logging.getLogger(__name__)

__all__ = ["DrainingServer", "HeaderTimeoutH11", "serve_command"]

HEADER_LIMIT = 64 * 1024  # bytes of request line + headers


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for request headers: a connection whose next request's headers
    are not complete ``header_timeout`` s after the connection opened (or the previous response ended) is
    closed. uvicorn itself only times out a keep-alive connection that sends nothing at all."""

    header_timeout = 10.0
    _header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self._header_timer is not None:  # headers are in
            self._header_timer.cancel()
            self._header_timer = None

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("dropping %s: no complete request headers within %g s", self.client, self.header_timeout)
            self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's server; on the first SIGTERM/SIGINT it drains the engine (see the module docstring) before
    uvicorn's own graceful shutdown, which waits for the open connections at most ``grace`` s."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, grace: float):
        super().__init__(config)
        self.engine, self.grace = engine, grace

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            # streams still open at the deadline get their error event and [DONE] with time left to send them
            self.engine.drain(max(0.0, self.grace - min(1.0, self.grace / 2)))
        super().handle_exit(sig, frame)


def _is_head_bundle(bundle_dir: Path) -> bool:
    from ..bundle import load_manifest

    return not load_manifest(bundle_dir, verify=False).spec.head.is_lm


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port (0: any free port; the chosen one is printed).",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="KV-cache slots: requests decoded together.",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=0),
    default=256,
    show_default=True,
    help="Requests that may wait for a slot; more get HTTP 429.",
)
@click.option(
    "--context",
    type=click.IntRange(min=2),
    default=None,
    help="Tokens per slot, prompt plus completion (default: the bundle's max_seq_len, at most 4096).",
)
@click.option(
    "--prefill-chunk",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Prompt tokens per prefill call; long prompts are split so running streams keep going.",
)
@click.option(
    "--api-key",
    default=None,
    envvar="EXAONE_DEPLOY_API_KEY",
    help="Require `Authorization: Bearer KEY` on /v1/* (env EXAONE_DEPLOY_API_KEY).",
)
@click.option("--served-model-name", default=None, help="Model name in the API (default: the bundle dir name).")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=DEFAULT_MAX_BODY_BYTES, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--header-timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds for a request's headers to arrive; slower connections are closed.",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(min=0.1),
    default=DEFAULT_BODY_TIMEOUT,
    show_default=True,
    help="Seconds for a request's body to arrive; slower clients get HTTP 408.",
)
@click.option(
    "--keep-alive-timeout",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds an idle keep-alive connection stays open.",
)
@click.option(
    "--shutdown-grace",
    type=click.FloatRange(min=0.0),
    default=10.0,
    show_default=True,
    help="On SIGTERM: seconds open streams may run on; then they end with an error event and [DONE].",
)
@click.option("--access-log", is_flag=True, help="Log every HTTP request.")
@click.option("-v", "--verbose", count=True, help="More logging (as exaone-deploy -v): -v stages and client errors.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files at startup.")
# -- scale-out (server/ray_serve.py, docs/scale.md) --
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    default=None,
    help="Serve N engine replicas with Ray Serve (needs the 'scale' extra) instead of one process.",
)
@click.option("--ray-address", default=None, help="Ray cluster to deploy on (default: a local one on 127.0.0.1).")
@click.option("--no-prefix-cache", is_flag=True, help="Re-prefill every prompt (no reuse of cached prefixes).")
# --
def serve_command(
    bundle_dir: Path,
    host: str,
    port: int,
    max_batch: int,
    max_queue: int,
    context: int | None,
    prefill_chunk: int,
    api_key: str | None,
    served_model_name: str | None,
    max_body_bytes: int,
    device: str,
    header_timeout: float,
    body_timeout: float,
    keep_alive_timeout: float,
    shutdown_grace: float,
    access_log: bool,
    verbose: int,
    no_verify: bool,
    replicas: int | None,
    ray_address: str | None,
    no_prefix_cache: bool,
) -> None:
    """Serve BUNDLE_DIR over an OpenAI-compatible HTTP API with continuous batching."""
    if replicas:  # -- scale-out: Ray Serve --
        try:
            from .ray_serve import serve_cli
        except ImportError as e:
            raise click.ClickException(f"--replicas needs Ray Serve: pip install 'exaone-deploy[scale]' ({e})") from e
        return serve_cli(
            bundle_dir,
            replicas,
            ray_address,
            host=host,
            port=port,
            api_key=api_key,
            max_batch=max_batch,
            max_queue=max_queue,
            context=context,
            prefill_chunk=prefill_chunk,
            served_model_name=served_model_name,
            max_body_bytes=max_body_bytes,
            device=device,
            verify=not no_verify,
            prefix_cache=not no_prefix_cache,
        )
    if verbose:
        from ..commands.common import configure_logging

        configure_logging(verbose)
    from ..bundle import BundleError
    from ..commands.common import require_bundle
    from ..errors import ExaoneDeployError
    from ..runtime.backend import ContextLengthError

    if api_key is not None and (not api_key.isascii() or not api_key.isprintable() or not api_key.strip()):
        raise click.ClickException(
            "--api-key must be printable ASCII (HTTP headers carry it as ASCII): choose another key"
        )
    try:
        require_bundle(bundle_dir)
        if _is_head_bundle(bundle_dir):  # a classifier or QA model: server/pooling.py
            from .pooling import HeadEngine

            engine = HeadEngine.from_bundle(
                bundle_dir, max_batch=max_batch, model_name=served_model_name, device=device, verify=not no_verify
            )
        else:
            engine = AsyncEngine.from_bundle(
                bundle_dir,
                max_batch=max_batch,
                context=context,
                max_queue=max_queue,
                prefill_chunk=prefill_chunk,
                model_name=served_model_name,
                device=device,
                verify=not no_verify,
                prefix_cache=not no_prefix_cache,
            )
    except (BundleError, ContextLengthError, ExaoneDeployError, FileNotFoundError, ValueError, RuntimeError) as e:
        raise click.ClickException(str(e)) from e
    app = create_app(engine, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout=body_timeout)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    bound = sock.getsockname()[1]
    if not api_key and host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("listening on %s without --api-key: anyone who can reach it can use the model", host)
    verbose = logging.getLogger("exaone_deploy").getEffectiveLevel() <= logging.INFO
    protocol = type("HeaderTimeoutH11", (HeaderTimeoutH11,), {"header_timeout": header_timeout})
    config = uvicorn.Config(
        app,
        log_level="info" if verbose else "warning",
        access_log=access_log,
        http=protocol,
        h11_max_incomplete_event_size=HEADER_LIMIT,
        timeout_keep_alive=keep_alive_timeout,
        timeout_graceful_shutdown=shutdown_grace,
    )
    shown = f"[{host}]" if ":" in host else host
    click.echo(
        f"serving {engine.model_name} on http://{shown}:{bound}/v1 (max batch {engine.max_batch}, "
        f"context {engine.max_seq_len}, queue {max_queue})",
        nl=True,
    )
    sys.stdout.flush()
    log.info(
        "server started: %s, max batch %d, context %d, queue %d",
        engine.model_name,
        engine.max_batch,
        engine.max_seq_len,
        max_queue,
    )
    DrainingServer(config, engine, shutdown_grace).run(sockets=[sock])
