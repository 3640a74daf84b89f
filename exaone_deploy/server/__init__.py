"""The OpenAI-compatible HTTP server, in the shape of vLLM's entrypoint (downstream of ``runtime``, which never
imports it):

- :mod:`.protocol`: the wire format: request models, typed response / stream-chunk / error models, and
  :class:`~.protocol.APIError`.
- :mod:`.engine`: :class:`~.engine.AsyncEngine`, the async facade over the scheduler thread
  (``generate(prompts, params) -> AsyncIterator[event]``, cancelled when the consumer closes it).
- :mod:`.serving`: requests -> prompts and sampling parameters, and the one event pump that chat and text
  completions share (stream or collect), with per-endpoint formatting of choices.
- :mod:`.app`: ``create_app(engine, ...)``: thin routes, the ASGI gate (API key, body limit), error handlers.
- :mod:`.metrics`: Prometheus metrics, fed by the scheduler's observer hooks.
- :mod:`.command`: the ``serve`` click command (``python -m exaone_deploy.server BUNDLE`` runs it too).
- :mod:`.launcher`: :class:`~.launcher.ServerProcess`, a server in a subprocess for tests, benchmarks and
  scripts (not used by the server itself).

This ``__init__`` imports nothing, so the launcher works without the 'serve' extra installed.
"""
