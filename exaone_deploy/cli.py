"""The ``exaone-deploy`` command line: small verbs, each doing one thing.

Heavy imports (torch, onnx) happen inside the commands that need them, so ``generate``/``chat``/
``serve`` run on an edge install with only onnxruntime, numpy and tokenizers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import click

from . import __version__

log = logging.getLogger("exaone_deploy")


class CLIError(click.ClickException):
    pass


def _fail(e: Exception) -> None:
    raise CLIError(str(e)) from e


def _known_errors():
    from .bundle import BundleError
    from .checkpoint import CheckpointError
    from .runtime.backend import ContextLengthError
    from .runtime.sampling import SamplingError
    from .spec import ConfigError

    return (BundleError, CheckpointError, ConfigError, ContextLengthError, SamplingError, FileNotFoundError,
            ValueError)


def _quiet_export_tooling() -> None:
    """torch.onnx prints progress and warnings; keep the CLI quiet unless -v."""
    import warnings

    import torch  # noqa: F401  (torch sets up its loggers on import; quiet them afterwards)

    warnings.filterwarnings("ignore")
    if not log.isEnabledFor(logging.INFO):
        for name in ("torch", "torch.onnx", "torch.onnx._internal.exporter._registration", "onnxscript"):
            logging.getLogger(name).setLevel(logging.ERROR)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="exaone-deploy")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Export EXAONE 4.0 checkpoints to ONNX Runtime and TensorRT, and run them."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# ---- checkpoints ----------------------------------------------------------------------------------

@main.command("make-tiny")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(["1.2b", "32b", "1.2b-full", "32b-full"]), default="1.2b",
              show_default=True,
              help="1.2b: all global, RoPE everywhere, tied; 32b: LLLG hybrid, NoPE global layers, untied; "
                   "*-full: the real models' sizes (random weights, for benchmarks).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--num-layers", type=int, default=None, help="Override the preset's layer count.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Storage dtype (default: the preset's).")
def make_tiny_cmd(out_dir: Path, preset: str, seed: int, num_layers: int | None, dtype: str | None) -> None:
    """Write a small random-weight EXAONE 4 checkpoint laid out like the real ones."""
    from .tiny.make import make_tiny

    try:
        path = make_tiny(out_dir, preset, seed, num_layers=num_layers, dtype=dtype)
    except (FileExistsError, ValueError, OSError) as e:
        _fail(e)
    click.echo(str(path))


@main.command()
@click.argument("model_dir")
@click.option("--json", "as_json", is_flag=True, help="Print the spec as JSON.")
def inspect(model_dir: str, as_json: bool) -> None:
    """Show the model spec (per-layer attention plan) parsed from MODEL_DIR/config.json ('tiny' allowed)."""
    from .checkpoint import resolve_model_dir
    from .spec import load_spec

    try:
        spec = load_spec(resolve_model_dir(model_dir))
    except _known_errors() as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(spec.to_json(), indent=2))
        return
    click.echo(f"layers {spec.num_layers}, hidden {spec.hidden_size}, heads {spec.num_heads}/{spec.num_kv_heads} "
               f"x {spec.head_dim}, vocab {spec.vocab_size}, tied {spec.tie_word_embeddings}, rope {spec.rope.rope_type}")
    for layer in spec.layers:
        click.echo(f"  {layer.index:3d} {layer.kind:7s} window={layer.window:<6d} rope={'on' if layer.rope else 'off'}")


# ---- export ---------------------------------------------------------------------------------------

@main.command()
@click.argument("model_dir")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path), help="Bundle directory.")
@click.option("--target", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option("--max-seq-len", type=click.IntRange(min=1), default=None,
              help="Longest context the bundle supports (default: the config's max_position_embeddings).")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--no-progress", is_flag=True)
def export(model_dir: str, out_dir: Path, target: str, dtype: str, max_seq_len: int | None, force: bool,
           no_progress: bool) -> None:
    """Export MODEL_DIR ('tiny' for the bundled model) into a self-contained bundle."""
    _quiet_export_tooling()
    from .exporter.export import ExportError, ExportOptions, export_bundle

    t = time.perf_counter()
    try:
        path = export_bundle(model_dir, out_dir, ExportOptions(target=target, dtype=dtype, max_seq_len=max_seq_len),
                             force=force, progress=not no_progress)
    except (ExportError, *_known_errors()) as e:
        _fail(e)
    click.echo(f"bundle written to {path} ({time.perf_counter() - t:.1f} s)")


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--reference", "model_dir", required=True, help="The checkpoint the bundle was exported from.")
@click.option("--steps", type=click.IntRange(min=0), default=32, show_default=True)
@click.option("--prompt-len", type=click.IntRange(min=1), default=None)
@click.option("--json", "as_json", is_flag=True)
def verify(bundle_dir: Path, model_dir: str, steps: int, prompt_len: int | None, as_json: bool) -> None:
    """Run BUNDLE_DIR in ONNX Runtime beside the PyTorch reference; non-zero exit past tolerance."""
    _quiet_export_tooling()
    from .validate.verify import verify_bundle

    try:
        report = verify_bundle(bundle_dir, model_dir, steps=steps, prompt_len=prompt_len)
    except _known_errors() as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"{'step':>5} {'max_abs':>10} {'max_rel':>10} {'greedy':>7} {'ok':>3}")
        for r in report["per_step"]:
            click.echo(f"{r['step']:>5} {r['max_abs']:>10.3g} {r['max_rel']:>10.3g} "
                       f"{'same' if r['greedy_match'] else 'DIFF':>7} {'yes' if r['within_tolerance'] else 'NO':>3}")
        click.echo(f"{report['dtype']}: max abs {report['max_abs']:.3g} (tolerance {report['tolerance']}), "
                   f"greedy agreement {report['greedy_agreement']:.0%}: {'PASS' if report['ok'] else 'FAIL'}")
    sys.exit(0 if report["ok"] else 1)


# ---- runtime --------------------------------------------------------------------------------------

def _sampling(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop):
    from .runtime.sampling import SamplingParams

    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                          min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop)).validate()


def _read_messages(path: Path) -> tuple[list, list | None]:
    try:
        body = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    tools = None
    if isinstance(body, dict):
        if "messages" not in body:
            raise ValueError(f"{path}: expected a list of messages or an object with 'messages'")
        tools = body.get("tools")
        body = body["messages"]
    if not isinstance(body, list) or not body:
        raise ValueError(f"{path}: 'messages' must be a non-empty list")
    for i, m in enumerate(body):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"{path}: message {i} must be an object with a string 'role'")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"{path}: message {i} has unknown role {m['role']!r}")
    if tools is not None and not isinstance(tools, list):
        raise ValueError(f"{path}: 'tools' must be a list")
    return body, tools


def _sampling_options(f):
    opts = [
        click.option("--max-new-tokens", type=int, default=128, show_default=True),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--top-k", type=int, default=0, show_default=True),
        click.option("--min-p", type=float, default=0.0, show_default=True),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
        click.option("--seed", type=int, default=None),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--input-ids", default=None, help="Comma-separated prompt token ids.")
@click.option("--messages", "messages_file", type=click.Path(path_type=Path), default=None,
              help="OpenAI-style request body {messages, tools} or a list of messages (JSON).")
@click.option("--chat", is_flag=True, help="Wrap --prompt in the chat template as a user turn.")
@click.option("--thinking", is_flag=True, help="Reasoning mode (enable_thinking).")
@_sampling_options
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def generate(bundle_dir, prompt, input_ids, messages_file, chat, thinking, max_new_tokens, temperature, top_p, top_k,
             min_p, repetition_penalty, seed, stop, device, stream, as_json):
    """Generate text from a bundle."""
    from .runtime.generate import Generator

    given = [x is not None for x in (prompt, input_ids, messages_file)]
    if sum(given) != 1:
        raise click.UsageError("give exactly one of --prompt, --input-ids, --messages")
    try:
        params = _sampling(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop)
        messages = tools = None
        if messages_file is not None:
            messages, tools = _read_messages(messages_file)
        ids = None
        if input_ids is not None:
            try:
                ids = [int(t) for t in input_ids.replace(" ", "").split(",") if t]
            except ValueError:
                raise ValueError(f"--input-ids must be comma-separated integers, got {input_ids!r}") from None
        gen = Generator.from_bundle(bundle_dir, device=device)
        if messages is None and chat:
            messages = [{"role": "user", "content": prompt}]
        chat_mode = messages is not None
        if chat_mode:
            ids = gen.chat_prompt(messages, tools=tools, enable_thinking=thinking)
        elif ids is None:
            ids = gen.encode(prompt)
        if stream and not as_json:
            for delta in gen.stream(ids, params):
                click.echo(delta, nl=False)
            click.echo()
            result = gen.last_result
        else:
            result = gen.generate([ids], params)[0]
    except _known_errors() as e:
        _fail(e)
    if as_json:
        parsed = result.parsed(reasoning_opened=thinking) if chat_mode else None
        click.echo(json.dumps({
            "token_ids": result.token_ids,
            "text": result.text if parsed is None else parsed.content,
            "raw_text": result.text,
            "reasoning": parsed.reasoning if parsed else None,
            "tool_calls": [c.to_openai() for c in parsed.tool_calls] if parsed else [],
            "errors": parsed.errors if parsed else [],
            "finish_reason": result.finish_reason,
            "usage": result.usage,
            "timings": result.timings,
        }, ensure_ascii=False))
    elif not stream:
        click.echo(result.text)


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="System prompt.")
@click.option("--thinking", is_flag=True, help="Start in reasoning mode (toggle with /think).")
@_sampling_options
def chat(bundle_dir, system, thinking, max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed,
         stop, device):
    """Interactive multi-turn chat (commands: /reset, /think, /exit)."""
    from .runtime.generate import Generator

    try:
        params = _sampling(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop)
        gen = Generator.from_bundle(bundle_dir, device=device)
    except _known_errors() as e:
        _fail(e)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
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
            history = [{"role": "system", "content": system}] if system else []
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
        except _known_errors() as e:
            history.pop()
            click.echo(f"error: {e}", err=True)
            continue
        parsed = gen.last_result.parsed(reasoning_opened=thinking)
        history.append({"role": "assistant", "content": parsed.content,
                        **({"reasoning_content": parsed.reasoning} if parsed.reasoning else {})})


def _cache_dir() -> Path:
    base = os.environ.get("EXAONE_DEPLOY_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "exaone-deploy"


@main.command()
@click.option("--prompt", default="ROMEO:\n", show_default=True)
@click.option("--max-new-tokens", type=int, default=200, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True)
@click.option("--top-k", type=int, default=40, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), default=None,
              help="Where to keep the exported bundle (default: the user cache).")
def demo(prompt, max_new_tokens, temperature, top_k, seed, bundle_dir):
    """Export the bundled model (cached after the first run), generate, print text and speed."""
    from .bundle import load_manifest
    from .runtime.generate import Generator
    from .runtime.sampling import SamplingParams

    bundle_dir = bundle_dir or _cache_dir() / f"tiny-ort-float32-{__version__}"
    try:
        load_manifest(bundle_dir)
        click.echo(f"using cached bundle {bundle_dir}")
    except Exception:
        _quiet_export_tooling()
        from .exporter.export import ExportOptions, export_bundle

        click.echo(f"exporting the bundled model to {bundle_dir} ...")
        export_bundle("tiny", bundle_dir, ExportOptions(), force=True, progress=True)
    gen = Generator.from_bundle(bundle_dir, verify=False)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    click.echo("-" * 60)
    click.echo(prompt, nl=False)
    for delta in gen.stream(prompt, params):
        click.echo(delta, nl=False)
    click.echo()
    click.echo("-" * 60)
    t = gen.last_result.timings
    click.echo(f"{len(gen.last_result.token_ids)} tokens; prefill {t['prefill_tokens_per_s']:.0f} tok/s, "
               f"decode {t['decode_tokens_per_s']:.0f} tok/s; bundle: {bundle_dir}")


def _register_optional_commands() -> None:
    """Commands that live with their stage (TensorRT in tensorrt/, quantization in calibration/, serving in
    runtime/). Each module imports its heavy dependencies only when the command runs."""
    from .tensorrt.cli import build_command, compare_command

    from .calibration.cli import eval_ppl_command, quantize_command, sensitivity_command

    main.add_command(build_command, "build")
    main.add_command(compare_command, "compare")
    main.add_command(quantize_command, "quantize")
    main.add_command(eval_ppl_command, "eval-ppl")
    main.add_command(sensitivity_command, "sensitivity")
    try:
        from .server.command import serve_command
    except ImportError as e:  # an edge install without the 'serve' extra
        missing = e.name or str(e)

        @main.command("serve", context_settings={"ignore_unknown_options": True})
        @click.argument("args", nargs=-1, type=click.UNPROCESSED)
        def serve_command(args):
            """OpenAI-compatible server (needs: pip install 'exaone-deploy[serve]')."""
            raise CLIError(f"`exaone-deploy serve` needs the '{missing}' package: pip install 'exaone-deploy[serve]'")
    else:
        main.add_command(serve_command, "serve")


_register_optional_commands()


def entry() -> None:
    """The ``exaone-deploy`` console script: restart once with huge-page ``malloc`` where that helps (weights in
    2 MiB pages: faster decode and load; see ``runtime/hugepages.py``), then run the command."""
    from .runtime.hugepages import reexec

    safe_path = ["-P"] if sys.version_info >= (3, 11) else []  # no cwd on sys.path: run the installed package
    reexec([sys.executable, *safe_path, "-m", "exaone_deploy", *sys.argv[1:]])
    main(prog_name="exaone-deploy")


if __name__ == "__main__":  # pragma: no cover
    entry()
