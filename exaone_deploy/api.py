"""The public Python API: ``from exaone_deploy import export, quantize, load``.

    export(checkpoint_dir, out_dir, **options) -> Path      a checkpoint ('tiny': the bundled model) -> a bundle
    quantize(model_dir, out_dir, scheme, **options) -> Path  a checkpoint or float32 bundle -> a quantized bundle
    load(bundle_dir, **options) -> Model                     a bundle, ready to generate, stream and chat

:class:`Model` is a small facade over :class:`~exaone_deploy.runtime.generate.Generator` that takes sampling
settings as keywords (``max_new_tokens=64, temperature=0.8, ...``: the fields of ``SamplingParams``) and returns
text. A bare string is always one prompt; a list of strings is a batch decoded together. ``Model.generator``
is the full runtime API (token ids, timings, finish reasons). Errors a caller can act on are
:class:`~exaone_deploy.errors.ExaoneDeployError`; an unknown keyword is a ``TypeError`` (a bug, not input).

Loading and generating import neither torch nor onnx; ``export`` and ``quantize`` need the 'export' extra.
Rejected: re-exporting ``Generator`` as the API (callers would build ``SamplingParams`` and token lists for a
one-line completion), and returning ``GenerationResult`` objects from ``generate`` (the common case wants text;
the detail stays one attribute away).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Model", "load", "export", "quantize"]


def _tuples(options: dict[str, Any], *names: str) -> dict[str, Any]:
    """``options`` with the named sequence fields as tuples (a bare string: a one-element tuple)."""
    return {k: ((v,) if isinstance(v, str) else tuple(v)) if k in names else v for k, v in options.items()}


def _params(sampling: dict[str, Any], generator=None, json_schema: dict | None = None, reasoning: bool = False):
    """SamplingParams from keywords; ``json_schema`` (with the generator's tokenizer) becomes a grammar."""
    from .runtime.sampling import SamplingParams

    if json_schema is not None:
        from .runtime.grammar import GrammarConstraint

        sampling["grammar"] = GrammarConstraint.json_schema(
            generator.tokenizer, json_schema, generator.backend.spec.vocab_size, reasoning
        ).grammar
    return SamplingParams(**_tuples(sampling, "stop", "stop_token_ids")).validate()


def _messages(messages: str | Sequence[dict]) -> list[dict]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)


class Model:
    """A loaded bundle. ``generate`` / ``stream`` complete raw text; ``chat`` applies the chat template and
    returns the assistant's message, split into content, reasoning and tool calls."""

    def __init__(self, generator):
        self.generator = generator

    def generate(self, prompt: str | Sequence[str], *, json_schema: dict | None = None, **sampling) -> str | list[str]:
        """The completion of ``prompt`` (a string: one prompt, returns a string) or of each prompt in a list
        (decoded as one batch, returns a list). ``json_schema``: the completion is JSON valid under it
        (grammar-constrained decoding; needs the 'grammar' extra); parse it with ``json.loads``."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        results = self.generator.generate(prompts, _params(sampling, self.generator, json_schema))
        texts = [r.text for r in results]
        return texts[0] if single else texts

    def stream(self, prompt: str, **sampling) -> Iterator[str]:
        """The completion of one prompt, piece by piece as it is generated."""
        if not isinstance(prompt, str):
            raise TypeError(f"stream takes one prompt string, got {type(prompt).__name__}")
        yield from self.generator.stream(prompt, _params(sampling))

    def chat(
        self,
        messages: str | Sequence[dict],
        *,
        tools: Sequence[dict] | None = None,
        thinking: bool = False,
        json_schema: dict | None = None,
        **sampling,
    ) -> dict[str, Any]:
        """The assistant's reply to ``messages`` (OpenAI-style dicts; a string is one user message) as an
        OpenAI-style message: ``{"role": "assistant", "content", "reasoning_content"?, "tool_calls"?}``, ready
        to append to the conversation. ``thinking=True`` turns on reasoning mode; ``json_schema``: the content
        is JSON valid under it (after the reasoning, when thinking)."""
        gen = self.generator
        ids = gen.chat_prompt(_messages(messages), tools=list(tools) if tools else None, enable_thinking=thinking)
        params = _params(sampling, gen, json_schema, reasoning=thinking)
        parsed = gen.generate([ids], params)[0].parsed(reasoning_opened=thinking)
        reply: dict[str, Any] = {"role": "assistant", "content": parsed.content}
        if parsed.reasoning:
            reply["reasoning_content"] = parsed.reasoning
        if parsed.tool_calls:
            reply["tool_calls"] = [call.to_openai() for call in parsed.tool_calls]
        return reply


def load(
    bundle_dir: str | Path, *, device: str = "cpu", max_batch: int = 1, capacity: int | None = None, verify: bool = True
) -> Model:
    """Open a bundle (ONNX Runtime, or a TensorRT engine bundle) for generation. ``max_batch``: most prompts
    decoded together; ``capacity``: KV-cache length (default: the bundle's context); ``verify``: check the
    files' sha256 against the manifest."""
    from .runtime.generate import Generator

    return Model(
        Generator.from_bundle(bundle_dir, device=device, max_batch=max_batch, capacity=capacity, verify=verify)
    )


def export(
    checkpoint_dir: str | Path, out_dir: str | Path, *, force: bool = False, progress: bool = False, **options
) -> Path:
    """Export a checkpoint directory ('tiny': the bundled model) into a bundle; returns its path. ``options``:
    the fields of ``ExportOptions`` (``target="ort"|"trt"``, ``dtype``, ``max_seq_len``, ...). The path is
    absolute, so it stays valid when the working directory changes."""
    from .exporter.export import ExportOptions, export_bundle

    return export_bundle(checkpoint_dir, out_dir, ExportOptions(**options), force=force, progress=progress).absolute()


def quantize(
    model_dir: str | Path, out_dir: str | Path, scheme: str, *, force: bool = False, progress: bool = False, **options
) -> Path:
    """Quantize a checkpoint or float32 bundle into a bundle (``scheme``: int8-sq, fp8, int4-awq, int4-rtn);
    returns its absolute path (the manifest's ``quantization`` record says what was done). ``options``: the fields of
    ``QuantOptions`` (``calib_data``, ``target``, ``keep_float``, ``block_size``, ...)."""
    from .calibration.quantize import QuantOptions
    from .calibration.quantize import quantize as quantize_bundle

    options = _tuples(options, "keep_float")
    if options.get("calib_data") is not None:
        options["calib_data"] = Path(options["calib_data"])
    quantize_bundle(model_dir, out_dir, QuantOptions(scheme=scheme, **options), force=force, progress=progress)
    return Path(out_dir).absolute()
