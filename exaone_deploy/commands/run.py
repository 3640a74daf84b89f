"""Verbs that run a bundle: ``generate``, ``chat``, ``demo``. They need no torch (an edge install runs them).

exaone-deploy generate BUNDLE_DIR (--prompt TEXT | --input-ids 1,2,3 | --messages FILE) [--chat] [--thinking]
                       [--json-schema FILE] [sampling options] [--device cpu|cuda] [--stream] [--json]
exaone-deploy chat BUNDLE_DIR [--system TEXT] [--thinking] [sampling options] [--device cpu|cuda]
exaone-deploy demo [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--top-k K] [--seed N] [--bundle DIR]
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import click

from .. import __version__
from ..errors import ExaoneDeployError
from .common import device_option, quiet_export_tooling, require_bundle, sampling_options

__all__ = ["generate_command", "chat_command", "demo_command"]

_ROLES = ("system", "user", "assistant", "tool")


def _read_messages(ctx, param, path: Path | None) -> tuple[list, list | None] | None:
    """``--messages FILE``: an OpenAI-style request body ``{messages, tools}`` or a list of messages."""
    if path is None:
        return None

    def bad(problem: str):
        return click.BadParameter(f"{path}: {problem}", ctx=ctx, param=param)

    try:
        body = json.loads(path.read_text())
    except OSError as e:
        raise bad(f"cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise bad(f"invalid JSON ({e})") from None
    tools = None
    if isinstance(body, dict):
        if "messages" not in body:
            raise bad("expected a list of messages or an object with 'messages'")
        tools = body.get("tools")
        body = body["messages"]
    if not isinstance(body, list) or not body:
        raise bad("'messages' must be a non-empty list")
    for i, m in enumerate(body):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"message {i} must be an object with a string 'role'")
        if m["role"] not in _ROLES:
            raise bad(f"message {i} has unknown role {m['role']!r}")
        if not _is_text(m.get("content")):
            raise bad(
                f"message {i}: content must be text (a string or a list of {{'type': 'text', 'text': ...}} "
                f"parts), got {json.dumps(m.get('content'))[:80]}"
            )
    if tools is not None and not isinstance(tools, list):
        raise bad("'tools' must be a list")
    return body, tools


def _read_schema(ctx, param, path: Path | None) -> dict | None:
    """``--json-schema FILE``: a JSON schema object (the output is constrained to match it)."""
    if path is None:
        return None
    try:
        schema = json.loads(path.read_text())
    except OSError as e:
        raise click.BadParameter(f"{path}: cannot read ({e.strerror})", ctx=ctx, param=param) from None
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"{path}: invalid JSON ({e})", ctx=ctx, param=param) from None
    if not isinstance(schema, dict):
        raise click.BadParameter(f"{path}: a JSON schema must be an object", ctx=ctx, param=param)
    return schema


def _is_text(content) -> bool:
    """A message content the chat template renders: a string, null, or a list of text parts (what the server's
    protocol accepts; the template silently drops anything else)."""
    if content is None or isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    )


def _parse_ids(ctx, param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(t) for t in value.replace(" ", "").split(",") if t]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}", ctx=ctx, param=param) from None


@click.command("generate")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--input-ids", "ids", default=None, callback=_parse_ids, help="Comma-separated prompt token ids.")
@click.option(
    "--messages",
    "request",
    type=click.Path(path_type=Path),
    default=None,
    callback=_read_messages,
    help="OpenAI-style request body {messages, tools} or a list of messages (JSON).",
)
@click.option("--chat", is_flag=True, help="Wrap --prompt in the chat template as a user turn.")
@click.option("--thinking", is_flag=True, help="Reasoning mode (enable_thinking).")
@click.option(
    "--json-schema",
    "schema",
    type=click.Path(path_type=Path),
    default=None,
    callback=_read_schema,
    help="Constrain the output to JSON valid under this schema (file); after </think> with --thinking.",
)
@sampling_options
@device_option
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def generate_command(
    bundle_dir: Path,
    prompt: str | None,
    ids: list[int] | None,
    request,
    chat: bool,
    thinking: bool,
    schema: dict | None,
    params,
    device: str,
    stream: bool,
    as_json: bool,
) -> None:
    """Generate text from a bundle."""
    from ..runtime.generate import Generator
    from ..runtime.grammar import GrammarConstraint

    if sum(x is not None for x in (prompt, ids, request)) != 1:
        raise click.UsageError("give exactly one of --prompt, --input-ids, --messages")
    require_bundle(bundle_dir)
    gen = Generator.from_bundle(bundle_dir, device=device)
    messages, tools = request or (None, None)
    if messages is None and chat:
        messages = [{"role": "user", "content": prompt}]
    chat_mode = messages is not None
    if chat_mode:
        ids = gen.chat_prompt(messages, tools=tools, enable_thinking=thinking)
    elif ids is None:
        ids = gen.encode(prompt)
    if schema is not None:
        grammar = GrammarConstraint.json_schema(
            gen.tokenizer, schema, gen.backend.spec.vocab_size, reasoning=chat_mode and thinking
        ).grammar
        params = dataclasses.replace(params, grammar=grammar)
    if stream and not as_json:
        for delta in gen.stream(ids, params):
            click.echo(delta, nl=False)
        click.echo()
        result = gen.last_result
    else:
        result = gen.generate([ids], params)[0]
    if as_json:
        parsed = result.parsed(reasoning_opened=thinking) if chat_mode else None
        click.echo(
            json.dumps(
                {
                    "token_ids": result.token_ids,
                    "text": result.text if parsed is None else parsed.content,
                    "raw_text": result.text,
                    "reasoning": parsed.reasoning if parsed else None,
                    "tool_calls": [c.to_openai() for c in parsed.tool_calls] if parsed else [],
                    "errors": parsed.errors if parsed else [],
                    "finish_reason": result.finish_reason,
                    "usage": result.usage,
                    "timings": result.timings,
                },
                ensure_ascii=False,
            )
        )
    elif not stream:
        click.echo(result.text)


@click.command("chat")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="System prompt.")
@click.option("--thinking", is_flag=True, help="Start in reasoning mode (toggle with /think).")
@sampling_options
@device_option
def chat_command(bundle_dir: Path, system: str | None, thinking: bool, params, device: str) -> None:
    """Interactive multi-turn chat (commands: /reset, /think, /exit)."""
    from ..runtime.generate import Generator

    require_bundle(bundle_dir)
    gen = Generator.from_bundle(bundle_dir, device=device)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    click.echo("exaone-deploy chat: /reset clears the conversation, /think toggles reasoning, /exit quits.")
    while True:
        try:
            line = click.prompt("you", prompt_suffix="> ", default="", show_default=False)
        except (EOFError, click.Abort):
            click.echo()
            return
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return
        if cmd == "/reset":
            history = list(start)
            click.echo("(conversation cleared)")
            continue
        if cmd == "/think":
            thinking = not thinking
            click.echo(f"(reasoning {'on' if thinking else 'off'})")
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        try:
            ids = gen.chat_prompt(history, enable_thinking=thinking)
            click.echo("assistant> ", nl=False)
            for delta in gen.stream(ids, params):
                click.echo(delta, nl=False)
            click.echo()
        except ExaoneDeployError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            history.pop()
            click.echo(f"error: {e}", err=True)
            continue
        parsed = gen.last_result.parsed(reasoning_opened=thinking)
        history.append(
            {
                "role": "assistant",
                "content": parsed.content,
                **({"reasoning_content": parsed.reasoning} if parsed.reasoning else {}),
            }
        )


def _cache_dir() -> Path:
    base = os.environ.get("EXAONE_DEPLOY_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "exaone-deploy"


@click.command("demo")
@click.option("--prompt", default="ROMEO:\n", show_default=True)
@click.option("--max-new-tokens", type=int, default=200, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True)
@click.option("--top-k", type=int, default=40, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--bundle",
    "bundle_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to keep the exported bundle (default: the user cache).",
)
def demo_command(
    prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int, bundle_dir: Path | None
) -> None:
    """Export the bundled model (cached after the first run), generate, print text and speed."""
    from ..bundle import BundleError, load_manifest
    from ..runtime.generate import Generator
    from ..runtime.sampling import SamplingParams

    bundle_dir = bundle_dir or _cache_dir() / f"tiny-ort-float32-{__version__}"
    try:
        load_manifest(bundle_dir)
        click.echo(f"using cached bundle {bundle_dir}")
    except BundleError:  # absent, partial or stale: export it again
        quiet_export_tooling()
        from ..exporter.export import ExportOptions, export_bundle

        click.echo(f"exporting the bundled model to {bundle_dir} ...")
        export_bundle("tiny", bundle_dir, ExportOptions(), force=True, progress=True)
    gen = Generator.from_bundle(bundle_dir, verify=False)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed).validate()
    click.echo("-" * 60)
    click.echo(prompt, nl=False)
    for delta in gen.stream(prompt, params):
        click.echo(delta, nl=False)
    click.echo()
    click.echo("-" * 60)
    t = gen.last_result.timings
    click.echo(
        f"{len(gen.last_result.token_ids)} tokens; prefill {t['prefill_tokens_per_s']:.0f} tok/s, "
        f"decode {t['decode_tokens_per_s']:.0f} tok/s; bundle: {bundle_dir}"
    )
