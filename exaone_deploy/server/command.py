"""The ``serve`` command: ``exaone-deploy serve BUNDLE_DIR`` (or ``python -m exaone_deploy.server BUNDLE_DIR``).

Loads the bundle into an :class:`~.engine.AsyncEngine`, binds the socket itself (so ``--port 0`` can print the
port it got), prints one line ``serving NAME on http://HOST:PORT/v1 (...)`` once it listens (the line
:class:`~.launcher.ServerProcess` waits for), and runs uvicorn until SIGINT/SIGTERM. Load and bind failures are
one-line click errors.
"""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

import click

from .app import DEFAULT_MAX_BODY_BYTES, create_app
from .engine import AsyncEngine

log = logging.getLogger(__name__)

__all__ = ["serve_command"]


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port (0: any free port; the chosen one is printed).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="KV-cache slots: requests decoded together.")
@click.option("--max-queue", type=click.IntRange(min=0), default=256, show_default=True,
              help="Requests that may wait for a slot; more get HTTP 429.")
@click.option("--context", type=click.IntRange(min=2), default=None,
              help="Tokens per slot, prompt plus completion (default: the bundle's max_seq_len, at most 4096).")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=512, show_default=True,
              help="Prompt tokens per prefill call; long prompts are split so running streams keep going.")
@click.option("--api-key", default=None, envvar="EXAONE_DEPLOY_API_KEY",
              help="Require `Authorization: Bearer KEY` on /v1/* (env EXAONE_DEPLOY_API_KEY).")
@click.option("--served-model-name", default=None, help="Model name in the API (default: the bundle dir name).")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=DEFAULT_MAX_BODY_BYTES, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--access-log", is_flag=True, help="Log every HTTP request.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files at startup.")
# -- scale-out (server/ray_serve.py, docs/scale.md) --
@click.option("--replicas", type=click.IntRange(min=1), default=None,
              help="Serve N engine replicas with Ray Serve (needs the 'scale' extra) instead of one process.")
@click.option("--ray-address", default=None, help="Ray cluster to deploy on (default: a local one on 127.0.0.1).")
@click.option("--no-prefix-cache", is_flag=True, help="Re-prefill every prompt (no reuse of cached prefixes).")
# --
def serve_command(bundle_dir: Path, host: str, port: int, max_batch: int, max_queue: int, context: int | None,
                  prefill_chunk: int, api_key: str | None, served_model_name: str | None, max_body_bytes: int,
                  device: str, access_log: bool, no_verify: bool, replicas: int | None, ray_address: str | None,
                  no_prefix_cache: bool) -> None:
    """Serve BUNDLE_DIR over an OpenAI-compatible HTTP API with continuous batching."""
    if replicas:  # -- scale-out: Ray Serve --
        try:
            from .ray_serve import serve_cli
        except ImportError as e:
            raise click.ClickException(f"--replicas needs Ray Serve: pip install 'exaone-deploy[scale]' ({e})") from e
        return serve_cli(bundle_dir, replicas, ray_address, host=host, port=port, api_key=api_key,
                         max_batch=max_batch, max_queue=max_queue, context=context, prefill_chunk=prefill_chunk,
                         served_model_name=served_model_name, max_body_bytes=max_body_bytes, device=device,
                         verify=not no_verify, prefix_cache=not no_prefix_cache)
    import uvicorn

    from ..bundle import BundleError
    from ..runtime.backend import ContextLengthError

    try:
        engine = AsyncEngine.from_bundle(bundle_dir, max_batch=max_batch, context=context, max_queue=max_queue,
                                         prefill_chunk=prefill_chunk, model_name=served_model_name, device=device,
                                         verify=not no_verify, prefix_cache=not no_prefix_cache)
    except (BundleError, ContextLengthError, FileNotFoundError, ValueError, RuntimeError) as e:
        raise click.ClickException(str(e)) from e
    app = create_app(engine, api_key=api_key, max_body_bytes=max_body_bytes)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    bound = sock.getsockname()[1]
    if not api_key and host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("listening on %s without --api-key: anyone who can reach it can use the model", host)
    verbose = logging.getLogger("exaone_deploy").getEffectiveLevel() <= logging.INFO
    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=access_log,
                            timeout_graceful_shutdown=5)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving {engine.model_name} on http://{shown}:{bound}/v1 (max batch {engine.max_batch}, "
               f"context {engine.max_seq_len}, queue {max_queue})", nl=True)
    sys.stdout.flush()
    uvicorn.Server(config).run(sockets=[sock])
